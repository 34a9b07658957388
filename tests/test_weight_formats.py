"""Weight formats against closed-form cases and onnxruntime's DequantizeLinear."""

import ml_dtypes
import numpy as np
import onnx_ir as ir
import pytest

from qcompiler.weight_formats import (
    FP4_TABLE,
    NF4_TABLE,
    WeightFormat,
    fake_quantize_matrix,
    quantize,
    resolve_block_size,
)
from tests.graphs import const, model_of, run


def test_int4_closed_form():
    """Symmetric: max|w| -> 7; asymmetric: [min, max] -> [0, 15] with a zero point holding 0."""
    w = np.array([[7.0, -1.0], [-3.5, 2.0], [0.0, 4.0], [1.0, 0.5]], np.float32)
    sym = quantize(w, WeightFormat.INT4, 4, symmetric=True)
    np.testing.assert_allclose(sym.scales, [[1.0, 4.0 / 7]])
    assert sym.codes[0, 0] == 7 and sym.codes[1, 0] == -4 and sym.codes[2, 1] == 7  # -3.5 rounds to even
    asym = quantize(w, WeightFormat.INT4, 4, symmetric=False)
    np.testing.assert_allclose(asym.scales, [[10.5 / 15, 5.0 / 15]], rtol=1e-6)
    assert asym.zero_points[0, 0] == 5 and asym.codes.max() <= 15
    for compressed in (sym, asym):
        assert np.abs(compressed.dequantize() - w).max() <= compressed.scales.max() / 2 + 1e-6


def test_int8_per_channel_error_bound():
    w = np.random.default_rng(0).standard_normal((50, 7)).astype(np.float32)
    compressed = quantize(w, WeightFormat.INT8, 50, symmetric=True)
    assert compressed.scales.shape == (1, 7)
    # The larger-magnitude extreme lands on its own end: -128 when negative, 127 when positive.
    expected = np.where(-w.min(axis=0) > w.max(axis=0), w.min(axis=0) / -128, w.max(axis=0) / 127)
    np.testing.assert_allclose(compressed.scales[0], expected, rtol=1e-6)
    assert np.all(np.abs(compressed.dequantize() - w) <= compressed.scales / 2 + 1e-7)


def test_nf4_codes_are_nearest_table_entries():
    w = np.array([[1.0], [-0.5], [0.3], [0.0]], np.float32)
    compressed = quantize(w, WeightFormat.NF4, 4)
    assert compressed.scales[0, 0] == 1.0
    expected = [np.argmin(np.abs(NF4_TABLE - value)) for value in w[:, 0]]
    assert compressed.codes[:, 0].tolist() == expected


def test_mxfp4_scales_are_powers_of_two_and_never_clip():
    w = (np.random.default_rng(1).standard_normal((64, 8)) * 3).astype(np.float32)
    compressed = quantize(w, WeightFormat.MXFP4, resolve_block_size(WeightFormat.MXFP4, 128, 64))
    assert compressed.block_size == 32
    exponents = np.log2(compressed.scales)
    np.testing.assert_array_equal(exponents, np.round(exponents))
    blocks = np.abs(w).reshape(2, 32, 8).max(axis=1)
    assert np.all(blocks / compressed.scales <= 6.0) and np.all(blocks / compressed.scales > 3.0)
    assert set(np.unique(compressed.dequantize() / np.repeat(compressed.scales, 32, 0))) <= set(FP4_TABLE)


def test_nvfp4_block_scales_are_fp8_multiples_of_the_global_scale():
    w = np.random.default_rng(2).standard_normal((32, 4)).astype(np.float32)
    compressed = quantize(w, WeightFormat.NVFP4, 16)
    relative = compressed.scales / compressed.global_scale
    np.testing.assert_allclose(
        relative.astype(ml_dtypes.float8_e4m3fn).astype(np.float32), relative, rtol=1e-6
    )
    assert compressed.global_scale == pytest.approx(np.abs(w).max() / (6 * 448))
    assert np.abs(compressed.dequantize() - w).max() < 0.25 * np.abs(w).max()


def test_group_larger_than_weight_is_per_channel():
    assert resolve_block_size(WeightFormat.INT4, 128, 64) == 64
    assert resolve_block_size(WeightFormat.INT4, 0, 576) == 576
    assert resolve_block_size(WeightFormat.FP8, 64, 576) == 576


def _dequantize_linear(codes: ir.Tensor, scales: np.ndarray, zero: ir.Tensor | None, attributes, opset):
    graph = ir.Graph([], [], nodes=[], name="dq")
    inputs = []
    for name, tensor in (("codes", codes), ("scales", None), ("zero", zero)):
        if name == "scales":
            inputs.append(const(graph, "scales", scales))
        elif tensor is not None:
            value = ir.Value(name=name, const_value=tensor)
            graph.register_initializer(value)
            inputs.append(value)
    node = ir.node("DequantizeLinear", inputs, attributes, name="dq")
    node.outputs[0].name = "w"
    graph.append(node)
    graph.outputs.append(node.outputs[0])
    return run(model_of(graph, opset=opset), {})[0]


@pytest.mark.parametrize("symmetric", [True, False])
def test_blocked_int4_matches_onnxruntime_dequantize_linear(symmetric):
    """Our dequantize equals ORT's DequantizeLinear(int4/uint4, axis=0, block_size) at opset 21."""
    w = np.random.default_rng(0).standard_normal((64, 24)).astype(np.float32)
    compressed = quantize(w, WeightFormat.INT4, 32, symmetric=symmetric)
    dtype = ir.DataType.INT4 if symmetric else ir.DataType.UINT4
    zero = None if symmetric else ir.tensor(compressed.zero_points, dtype=dtype)
    got = _dequantize_linear(
        ir.tensor(compressed.codes, dtype=dtype), compressed.scales, zero, {"axis": 0, "block_size": 32}, 21
    )
    np.testing.assert_array_equal(got, compressed.dequantize())


def test_fp8_matches_onnxruntime_dequantize_linear():
    """FP8 E4M3 per output channel equals ORT's DequantizeLinear(float8e4m3fn, axis=1)."""
    w = np.random.default_rng(3).standard_normal((40, 6)).astype(np.float32)
    compressed = quantize(w, WeightFormat.FP8, 40)
    codes = ir.tensor(compressed.codes.view(ml_dtypes.float8_e4m3fn), dtype=ir.DataType.FLOAT8E4M3FN)
    got = _dequantize_linear(codes, compressed.scales[0], None, {"axis": 1}, 19)
    np.testing.assert_array_equal(got, compressed.dequantize())
    assert np.abs(got - w).max() <= np.abs(w).max() / 16


@pytest.mark.parametrize("fmt", list(WeightFormat))
@pytest.mark.parametrize("symmetric", [True, False])
def test_fast_fake_quantize_equals_encode_then_decode(fmt, symmetric):
    """The algorithms' in-place rounding (`fake_quantize_matrix`) is exactly quantize + dequantize."""
    w = np.random.default_rng(4).standard_normal((96, 10)).astype(np.float32)
    block = resolve_block_size(fmt, 32, 96)
    np.testing.assert_array_equal(
        fake_quantize_matrix(w, fmt, block, symmetric=symmetric),
        quantize(w, fmt, block, symmetric=symmetric).dequantize(),
    )
