"""The onnx package's backend test models (140: old opsets, IR < 4, single ops) through ort-cpu.

Each is calibrated on its own test inputs with every op type ort-cpu quantizes, saved, and run on
those inputs: a model with a quantizable node compiles and its outputs have the expected shapes;
one without gets the named no-op error; nothing crashes.
"""

from __future__ import annotations

import collections

import onnx
import pytest

import qcompiler
from qcompiler.models import onnx_backend
from qcompiler.targets import get_target

pytestmark = pytest.mark.slow


def test_backend_test_models_compile_or_get_a_named_error(tmp_path):
    target = get_target("ort-cpu")
    options = qcompiler.CompileOptions(op_types=tuple(sorted(target.quantizable_ops)))
    outcomes = []
    for folder in onnx_backend.case_folders():
        case = onnx_backend.load_case(folder)
        outcomes.append(onnx_backend.compile_case(case, "ort-cpu", options, tmp_path))
        has_quantizable = any(
            node.op_type in target.quantizable_ops
            for node in onnx.load(case.model, load_external_data=False).graph.node
        )
        outcome = outcomes[-1]
        assert outcome.kind in ("compiled", "named error"), outcome
        if outcome.kind == "named error" and not has_quantizable:
            assert "nothing to quantize or compress for ort-cpu" in outcome.detail, outcome
    kinds = collections.Counter(outcome.kind for outcome in outcomes)
    assert len(outcomes) == 140
    assert kinds["crash"] == kinds["wrong shapes"] == 0
    assert (
        kinds["compiled"] >= 41
    )  # every model holding a MatMul / Gemm / Conv / Add / Mul / Softmax that calibrates
    assert (
        sum(outcome.upgraded_from is not None for outcome in outcomes) >= 20
    )  # old opsets upgraded, not refused
