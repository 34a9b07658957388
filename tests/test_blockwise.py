"""INT4 block quantization against closed form and onnxruntime's own kernels."""

import numpy as np
import onnx_ir as ir
import pytest

from qcompiler import blockwise
from tests.graphs import const, float_input, model_of, run


def test_int4_closed_form():
    """Symmetric: max|w| -> +-7; asymmetric: [min, max] -> [0, 15] with a zero point holding 0."""
    w = np.array([[7.0, -1.0], [-3.5, 2.0], [0.0, 4.0], [1.0, 0.5]], np.float32)
    sym = blockwise.quantize_int4(w, block_size=4, symmetric=True)
    np.testing.assert_allclose(sym.scales, [[1.0, 4.0 / 7]])
    assert sym.codes[0, 0] == 7 and sym.codes[1, 0] in (-4, -3) and sym.codes[2, 1] == 7
    asym = blockwise.quantize_int4(w, block_size=4, symmetric=False)
    np.testing.assert_allclose(asym.scales, [[10.5 / 15, 5.0 / 15]], rtol=1e-6)
    assert asym.zero_points[0, 0] == 5 and asym.codes.max() <= 15
    for quantized in (sym, asym):
        assert np.abs(blockwise.dequantize(quantized) - w).max() <= quantized.scales.max() / 2 + 1e-6


@pytest.mark.parametrize("symmetric", [True, False])
def test_blocked_dequantize_linear_matches_onnxruntime(symmetric):
    """Our dequantize equals ORT's DequantizeLinear(int4/uint4, axis=0, block_size) at opset 21."""
    w = np.random.default_rng(0).standard_normal((64, 24)).astype(np.float32)
    quantized = blockwise.quantize_int4(w, block_size=32, symmetric=symmetric)
    graph = ir.Graph([], [], nodes=[], name="dq")
    dtype = ir.DataType.INT4 if symmetric else ir.DataType.UINT4
    codes = ir.Value(name="codes", const_value=ir.tensor(quantized.codes, dtype=dtype, name="codes"))
    graph.register_initializer(codes)
    inputs = [codes, const(graph, "scales", quantized.scales)]
    if not symmetric:
        zero = ir.Value(name="zero", const_value=ir.tensor(quantized.zero_points, dtype=dtype, name="zero"))
        graph.register_initializer(zero)
        inputs.append(zero)
    node = ir.node("DequantizeLinear", inputs, {"axis": 0, "block_size": 32}, name="dq")
    node.outputs[0].name = "w"
    graph.append(node)
    graph.outputs.append(node.outputs[0])
    np.testing.assert_array_equal(run(model_of(graph, opset=21), {})[0], blockwise.dequantize(quantized))


@pytest.mark.parametrize("symmetric, rows", [(True, 96), (False, 96), (False, 80), (True, 80)])
def test_matmul_nbits_packing_matches_onnxruntime(symmetric, rows):
    """ORT's MatMulNBits on our packing computes A @ dequantize(W), ragged last block included."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((rows, 40)).astype(np.float32)
    a = rng.standard_normal((3, rows)).astype(np.float32)
    quantized = blockwise.quantize_int4(w, block_size=32, symmetric=symmetric)
    weights = blockwise.pack_matmul_nbits(quantized)
    assert weights.packed.shape == (40, 3, 16)
    x = float_input("a", [3, rows])
    graph = ir.Graph([x], [], nodes=[], name="nbits")
    inputs = [x, const(graph, "packed", weights.packed), const(graph, "scales", weights.scales)]
    if weights.zero_points is not None:
        inputs.append(const(graph, "zero_points", weights.zero_points))
    node = ir.node(
        "MatMulNBits",
        inputs,
        {"K": weights.K, "N": weights.N, "bits": 4, "block_size": 32, "accuracy_level": 0},
        domain="com.microsoft",
        name="mm",
    )
    node.outputs[0].name = "y"
    graph.append(node)
    graph.outputs.append(node.outputs[0])
    model = model_of(graph)
    model.opset_imports["com.microsoft"] = 1
    got = run(model, {"a": a})[0]
    np.testing.assert_allclose(got, a @ blockwise.dequantize(quantized), rtol=1e-4, atol=1e-4)
