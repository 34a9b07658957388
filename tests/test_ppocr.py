"""PP-OCRv5 rec (a real Paddle2ONNX CNN + SVTR neck, opset 11) through W8A8 on rendered text lines."""

import numpy as np
import onnx_ir as ir
import pytest

import qcompiler
from qcompiler.models import ppocr
from qcompiler.opset import upgrade_opset
from qcompiler.rewrites.normalize import NormalizePass
from tests.graphs import run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lines():
    return ppocr.rec_lines(64, "calib"), ppocr.rec_lines(120)


def _cer(model: ir.Model, evaluation) -> float:
    outputs = np.concatenate([run(model, feed)[0] for feed in ppocr.batches(evaluation.inputs, 24)])
    return ppocr.rec_metrics(ppocr.ctc_decode(outputs, ppocr.characters()), evaluation.labels)["cer"]


def test_normalized_rec_folds_conv_biases_and_computes_the_same(lines):
    """Every Conv's bias Add / affine block is folded; the logits stay equal to 1e-4."""
    model = qcompiler.load(ppocr.model_path("rec"))
    original = qcompiler.load(ppocr.model_path("rec"))
    upgrade_opset(model, 13)
    NormalizePass()(model)
    convs = [node for node in model.graph if node.op_type == "Conv"]
    assert all(len(node.inputs) == 3 and node.inputs[2] is not None for node in convs)
    assert not any(
        use.node.op_type in ("Add", "Mul") and use.node.inputs[1 - use.idx].const_value is not None
        for node in convs
        for use in node.outputs[0].uses()
    )
    feed = {"x": lines[1].inputs[:4]}
    np.testing.assert_allclose(run(model, feed)[0], run(original, feed)[0], atol=1e-4)


def test_rec_w8a8_character_error_rate(lines):
    """CER of the ort-cpu W8A8 artifact (FP32 0.5 % here), bias correction on: MinMax under 2.5 %
    (measured 1.21 %; 6.5 % without bias correction, 16 % before the Conv biases were folded), MSE
    ranges under 1.2 % (measured 0.68 %; 0.82 % without)."""
    calibration, evaluation = lines
    feeds = list(ppocr.batches(calibration.inputs, 8))
    source = ppocr.model_path("rec")
    assert _cer(qcompiler.load(source), evaluation) < 0.01
    cers = {}
    for method in (qcompiler.RangeMethod.MINMAX, qcompiler.RangeMethod.MSE):
        options = qcompiler.CompileOptions(
            count_fusion=False, activations=qcompiler.ActivationOptions(range_method=method)
        )
        cers[method] = _cer(
            qcompiler.compile(source, "ort-cpu", options, data=feeds, progress=False).model, evaluation
        )
    assert cers[qcompiler.RangeMethod.MINMAX] < 0.025
    assert cers[qcompiler.RangeMethod.MSE] < 0.012
