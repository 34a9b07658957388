"""Every measurement runs in the target's runtime (regressions of the Backend-interface issue).

Before the Backend / Runner interface, `--max-drop`'s proxy (`StaticCandidates.proxy`) and the size
budget's sensitivity (`measure_sensitivity`) always ran in onnxruntime. An OpenVINO IR input keeps
the ops the loader does not lift (here Relu, Softmax) as OpenVINO ops, which onnxruntime cannot
run: both searches failed on such a model. Here onnxruntime is forbidden outright.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import openvino as ov
import pytest

import qcompiler
from qcompiler.backends.onnxruntime import session as ort_session
from qcompiler.frontends.openvino_ir import DOMAIN
from qcompiler.options import CompileOptions, CompressionOptions, WeightFormat
from tests.graphs import random_feeds
from tests.test_compression import tiny_decoder
from tests.test_fallback import _harmful_options, _outlier_model


def _as_openvino_ir(model: ir.Model, folder) -> ir.Model:
    """`model` converted by OpenVINO and saved as IR, then loaded as users load it."""
    onnx_path = qcompiler.save(model, folder / "m.onnx")
    ov.save_model(ov.convert_model(str(onnx_path)), str(folder / "m.xml"), compress_to_fp16=False)
    return qcompiler.load(folder / "m.xml")


@pytest.fixture
def openvino_only(monkeypatch, openvino_runs):
    """Fail any onnxruntime session; the models OpenVINO runners were made for."""

    def refuse(*args, **kwargs):
        raise AssertionError("an onnxruntime session was created for an openvino-* compile")

    monkeypatch.setattr(ort_session, "create_session", refuse)
    return openvino_runs


def test_max_drop_on_openvino_ir_with_openvino_only_ops_measures_in_openvino(tmp_path, openvino_only):
    """W8A8 --max-drop on an IR input keeping an OpenVINO Relu: float run, proxy runs and every trial
    in OpenVINO; the budget is met."""
    model = _as_openvino_ir(_outlier_model(relu=True), tmp_path)
    assert any(node.domain == DOMAIN and node.op_type == "Relu" for node in model.graph)
    feeds = random_feeds(_outlier_model(relu=True), batches=4, batch=16)
    options = _harmful_options(max_drop=0.001)
    result = qcompiler.compile(model, "openvino-cpu", options, data=feeds, validation=feeds, progress=False)
    fallback = result.report.fallback
    assert fallback["met"] and fallback["drop"] <= 0.001
    # float model, the proxy's float and quantized runs, the ranking's and the search's trials
    assert len(openvino_only) >= 3 + fallback["evaluations"] - 1
    assert any(g["format"] != g["ladder"][0] for g in fallback["groups"].values())  # the search moved a group


def test_effective_bits_on_openvino_ir_with_openvino_only_ops_measures_in_openvino(tmp_path, openvino_only):
    """--effective-bits on an IR decoder keeping OpenVINO ops: calibration and the per-group
    sensitivity runs in OpenVINO; the size budget holds."""
    model = _as_openvino_ir(tiny_decoder(), tmp_path)
    kept = {node.op_type for node in model.graph if node.domain == DOMAIN}
    assert kept, "the IR should keep OpenVINO-only ops"
    rng = np.random.default_rng(1)
    feeds = [{"ids": rng.integers(0, 40, (2, 12))} for _ in range(4)]
    options = CompileOptions(
        compression=CompressionOptions(
            format=WeightFormat.INT4, symmetric=True, group_size=32, scale_estimation=True
        ),
        accuracy=qcompiler.AccuracyOptions(effective_bits=6.0),
    )
    result = qcompiler.compile(model, "openvino-cpu", options, data=feeds, progress=False)
    budget = result.report.mixed_precision
    assert budget["achieved_effective_bits"] <= 6.0
    assert budget["final_effective_bits"] <= 6.0
    # the sensitivity runner: the float model with the weights as graph inputs besides ids
    assert any(isinstance(made, ir.Model) and len(made.graph.inputs) > 1 for made in openvino_only)
    assert result.artifact is not None
