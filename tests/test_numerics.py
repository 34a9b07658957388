import numpy as np
import onnx_ir as ir
import pytest

from qcompiler import numerics
from qcompiler.options import QuantType
from tests.graphs import const, model_of, run


def _ort_quantize(x, scale, zero_point, axis=None):
    """QuantizeLinear as onnxruntime computes it."""
    xin = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(x.shape))
    graph = ir.Graph([xin], [], nodes=[], name="q")
    node = ir.node(
        "QuantizeLinear",
        [xin, const(graph, "s", scale), const(graph, "z", zero_point)],
        {"axis": axis} if axis is not None else None,
    )
    graph.append(node)
    graph.outputs.append(node.outputs[0])
    node.outputs[0].name = "y"
    return run(model_of(graph), {"x": x})[0]


def test_quantize_matches_onnxruntime_per_tensor_uint8():
    """Rounding half to even and saturation agree bit for bit with ORT."""
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(1000) * 3, np.array([0.05, 0.15, -0.05, 100, -100])]).astype(
        np.float32
    )
    scale, zero = np.float32(0.1), np.uint8(128)
    ours = numerics.quantize(x, scale, zero, QuantType.UINT8)
    assert ours.dtype == np.uint8
    np.testing.assert_array_equal(ours, _ort_quantize(x, scale, zero))


def test_quantize_matches_onnxruntime_per_channel_int8():
    """Per-axis scales broadcast along the right axis, as ORT's QuantizeLinear(axis=1)."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((16, 8)).astype(np.float32)
    scales = numerics.symmetric_weight_scales(w, axis=1)
    zeros = np.zeros(8, np.int8)
    np.testing.assert_array_equal(
        numerics.quantize(w, scales, zeros, QuantType.INT8, axis=1), _ort_quantize(w, scales, zeros, axis=1)
    )


def test_symmetric_weight_scales_closed_form():
    """Each channel's max |w| maps to 127; the extreme value quantizes to +-127 exactly."""
    w = np.array([[1.0, -4.0], [-2.0, 0.5], [0.0, 2.0]], np.float32)
    scales = numerics.symmetric_weight_scales(w, axis=1)
    np.testing.assert_allclose(scales, [2.0 / 127, 4.0 / 127])
    q = numerics.quantize(w, scales, 0, QuantType.INT8, axis=1)
    assert q[1, 0] == -127 and q[0, 1] == -127 and q[2, 1] == 64
    assert numerics.symmetric_weight_scales(w, axis=None) == pytest.approx(4.0 / 127)


def test_activation_params_closed_form():
    """Asymmetric uint8 over [-1, 3]: scale 4/255, zero point round(255/4) = 64; range always holds 0."""
    scale, zero = numerics.activation_params(-1.0, 3.0, QuantType.UINT8, symmetric=False)
    assert scale == pytest.approx(4 / 255) and zero == 64
    scale, zero = numerics.activation_params(2.0, 5.0, QuantType.UINT8, symmetric=False)
    assert zero == 0 and scale == pytest.approx(5 / 255)
    scale, zero = numerics.activation_params(-2.0, 1.0, QuantType.INT8, symmetric=True)
    assert zero == 0 and scale == pytest.approx(4 / 254)
    scale, zero = numerics.activation_params(0.0, 0.0, QuantType.UINT8, symmetric=False)
    assert scale > 0 and np.isfinite(scale)


def test_dequantize_inverts_quantize_within_half_step():
    """|x - DQ(Q(x))| <= scale / 2 inside the range."""
    x = np.linspace(-1, 3, 1001, dtype=np.float32)
    scale, zero = numerics.activation_params(-1.0, 3.0, QuantType.UINT8, symmetric=False)
    back = numerics.dequantize(numerics.quantize(x, scale, zero, QuantType.UINT8), scale, zero)
    assert np.abs(back - x).max() <= scale / 2 + 1e-6


def test_int32_bias_scale_is_product():
    """Bias scale = input scale * weight scale per channel; values round to the nearest step."""
    q, scales = numerics.int32_bias(np.array([1.0, -2.0], np.float32), 0.5, np.array([0.1, 0.2], np.float32))
    np.testing.assert_allclose(scales, [0.05, 0.1])
    np.testing.assert_array_equal(q, [20, -20])
    assert q.dtype == np.int32


def test_off_midpoint_moves_zero_point_128_and_still_covers_the_range():
    """A uint8 range that would read as signed int8 moves to 127 or 129, scale at most 1 % up."""
    from qcompiler.numerics import activation_params, off_midpoint
    from qcompiler.options import QuantType

    for lo, hi in ((-1.1413862, 1.1394718), (-1.0, 1.0), (-2.0, 1.99)):
        scale, zero = activation_params(lo, hi, QuantType.UINT8, symmetric=False)
        assert zero == 128
        moved, moved_zero = off_midpoint(lo, hi, scale, zero, QuantType.UINT8)
        assert moved_zero in (127, 129)
        assert -moved_zero * moved <= lo and (255 - moved_zero) * moved >= hi
        assert scale <= moved <= 1.01 * scale
    assert off_midpoint(-1.0, 3.0, np.float32(0.0157), 64, QuantType.UINT8) == (np.float32(0.0157), 64)
