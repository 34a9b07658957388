"""onnxruntime's packed weight layouts against the runtime's own kernels."""

import numpy as np
import onnx_ir as ir
import pytest

from qcompiler.backends.onnxruntime import packing
from qcompiler.errors import UnsupportedModelError
from qcompiler.weight_formats import WeightFormat, quantize
from tests.graphs import const, float_input, model_of, run


def _run_contrib(op: str, a: np.ndarray, constants: dict[str, np.ndarray], attributes: dict) -> np.ndarray:
    x = float_input("a", list(a.shape))
    graph = ir.Graph([x], [], nodes=[], name=op)
    inputs = [x] + [const(graph, name, array) for name, array in constants.items()]
    node = ir.node(op, inputs, attributes, domain="com.microsoft", name="mm")
    node.outputs[0].name = "y"
    graph.append(node)
    graph.outputs.append(node.outputs[0])
    model = model_of(graph)
    model.opset_imports["com.microsoft"] = 1
    return run(model, {"a": a})[0]


@pytest.mark.parametrize(
    "fmt, symmetric, rows, group",
    [
        (WeightFormat.INT4, True, 96, 32),
        (WeightFormat.INT4, False, 96, 32),
        (WeightFormat.INT4, False, 80, 32),  # ragged last block
        (WeightFormat.INT4, True, 80, 32),
        (WeightFormat.INT4, True, 72, 0),  # per-channel: one padded block of 128
        (WeightFormat.INT4, False, 96, 0),  # per-channel: 3 blocks of 32 repeating the scale
        (WeightFormat.INT8, True, 96, 32),
        (WeightFormat.INT8, False, 72, 0),
        (WeightFormat.INT8, False, 96, 32),
        (WeightFormat.INT8, False, 576, 0),
    ],
)
def test_matmul_nbits_packing_matches_onnxruntime(fmt, symmetric, rows, group):
    """ORT's MatMulNBits on our packing computes A @ dequantize(W) (accuracy_level 0: exact float)."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((rows, 40)).astype(np.float32)
    a = rng.standard_normal((3, rows)).astype(np.float32)
    compressed = quantize(w, fmt, group or rows, symmetric=symmetric)
    weights = packing.pack_matmul_nbits(compressed)
    n_blocks = -(-rows // weights.block_size)
    assert weights.packed.shape == (40, n_blocks, weights.block_size * fmt.bits // 8)
    constants = {"packed": weights.packed, "scales": weights.scales}
    if weights.zero_points is not None:
        constants["zero_points"] = weights.zero_points
    attributes = {"K": rows, "N": 40, "bits": fmt.bits, "block_size": weights.block_size, "accuracy_level": 0}
    got = _run_contrib("MatMulNBits", a, constants, attributes)
    np.testing.assert_allclose(got, a @ compressed.dequantize(), rtol=1e-4, atol=1e-4)


def test_matmul_bnb4_packing_matches_onnxruntime():
    """ORT's MatMulBnb4 (quant_type 1 = NF4) on our packing computes A @ dequantize(W)."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal((64, 24)).astype(np.float32)
    a = rng.standard_normal((5, 64)).astype(np.float32)
    compressed = quantize(w, WeightFormat.NF4, 32)
    weights = packing.pack_matmul_bnb4(compressed)
    attributes = {"K": 64, "N": 24, "block_size": 32, "quant_type": 1}
    got = _run_contrib("MatMulBnb4", a, {"packed": weights.packed, "absmax": weights.absmax}, attributes)
    np.testing.assert_allclose(got, a @ compressed.dequantize(), rtol=1e-4, atol=1e-4)


def test_block_size_rules():
    """Non-power-of-two groups are refused with the size named; per-channel pads to a power of two."""
    w = np.ones((96, 4), np.float32)
    with pytest.raises(UnsupportedModelError, match="group size 48"):
        packing.pack_matmul_nbits(quantize(w, WeightFormat.INT4, 48))
    assert packing.nbits_block_size(quantize(w, WeightFormat.INT4, 96)) == 32
    assert packing.nbits_block_size(quantize(np.ones((72, 4), np.float32), WeightFormat.INT4, 72)) == 128


@pytest.mark.parametrize(
    "fmt, symmetric", [(WeightFormat.INT8, False), (WeightFormat.INT4, True), (WeightFormat.INT4, False)]
)
def test_gather_block_quantized_packing_matches_onnxruntime(fmt, symmetric):
    """ORT's GatherBlockQuantized on our layout returns the dequantized rows of the table."""
    table = np.random.default_rng(3).standard_normal((50, 64)).astype(np.float32)  # [V, H]
    compressed = quantize(table.T, fmt, 32, symmetric=symmetric)  # blocks along H
    packed = packing.pack_gather_block_quantized(compressed)
    ids = ir.Value(name="ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([4]))
    graph = ir.Graph([ids], [], nodes=[], name="gather")
    inputs = [const(graph, "data", packed.data), ids, const(graph, "scales", packed.scales)]
    if packed.zero_points is not None:
        inputs.append(const(graph, "zero_points", packed.zero_points))
    attributes = {"bits": packed.bits, "block_size": 32, "gather_axis": 0, "quantize_axis": 1}
    node = ir.node("GatherBlockQuantized", inputs, attributes, domain="com.microsoft", name="gather")
    node.outputs[0].name = "rows"
    graph.append(node)
    graph.outputs.append(node.outputs[0])
    model = model_of(graph)
    model.opset_imports["com.microsoft"] = 1
    chosen = np.array([0, 7, 49, 7])
    np.testing.assert_array_equal(run(model, {"ids": chosen})[0], compressed.dequantize().T[chosen])
