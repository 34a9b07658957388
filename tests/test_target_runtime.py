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
from qcompiler.backends.openvino.backend import OpenVINOBackend
from qcompiler.frontends.openvino_ir import DOMAIN
from qcompiler.options import CompileOptions, CompressionOptions, Preset, WeightFormat
from tests.graphs import add, const, float_input, model_of, random_feeds
from tests.test_compression import tiny_decoder


def _as_openvino_ir(model: ir.Model, folder) -> ir.Model:
    """`model` converted by OpenVINO and saved as IR, then loaded as users load it."""
    onnx_path = qcompiler.save(model, folder / "m.onnx")
    ov.save_model(ov.convert_model(str(onnx_path)), str(folder / "m.xml"), compress_to_fp16=False)
    return qcompiler.load(folder / "m.xml")


def _outliers_through_relu() -> ir.Model:
    """x -> MatMul -> Add(one huge channel) -> Relu -> MatMul: the last MatMul's per-tensor input
    quantizer spends its range on the outlier channel; Relu stays an OpenVINO op when read from IR."""
    rng = np.random.default_rng(3)
    x = float_input("x", ["batch", 8])
    graph = ir.Graph([x], [], nodes=[], name="outliers")
    h = add(graph, "MatMul", [x, const(graph, "w1", rng.standard_normal((8, 8)).astype(np.float32))], "fc1")
    big = np.zeros(8, np.float32)
    big[0] = 1000.0
    r = add(graph, "Add", [h, const(graph, "shift", big)], "shift_add")
    r = add(graph, "Relu", [r], "relu")
    w2 = rng.standard_normal((8, 4)).astype(np.float32)
    w2[0] = 0.0  # the outlier channel does not reach the output: only the others' noise shows
    y = add(graph, "MatMul", [r, const(graph, "w2", w2)], "fc2")
    y.name = "scores"
    graph.outputs.append(y)
    return model_of(graph)


@pytest.fixture
def openvino_only(monkeypatch):
    """Fail any onnxruntime session; count the models OpenVINO runners are made for."""

    def refuse(*args, **kwargs):
        raise AssertionError("an onnxruntime session was created for an openvino-* compile")

    monkeypatch.setattr(ort_session, "create_session", refuse)
    made = []
    original = OpenVINOBackend.runner

    def counting(self, model, **settings):
        made.append(model)
        return original(self, model, **settings)

    monkeypatch.setattr(OpenVINOBackend, "runner", counting)
    return made


def test_max_drop_on_openvino_ir_with_openvino_only_ops_measures_in_openvino(tmp_path, openvino_only):
    """W8A8 --max-drop on an IR input keeping an OpenVINO Relu: float run, proxy runs and every trial
    in OpenVINO; the budget is met."""
    model = _as_openvino_ir(_outliers_through_relu(), tmp_path)
    assert any(node.domain == DOMAIN and node.op_type == "Relu" for node in model.graph)
    feeds = random_feeds(_outliers_through_relu(), batches=4, batch=16)
    options = CompileOptions(
        preset=Preset.DEFAULT,
        op_types=("MatMul", "Add"),
        count_fusion=False,
        accuracy=qcompiler.AccuracyOptions(metric="cosine", metric_output="scores", max_drop=0.001),
    )
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
