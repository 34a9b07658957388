"""Quantize / dequantize arithmetic, numpy only, matching ONNX QuantizeLinear semantics.

ONNX rounds half to even and saturates to the element type's range; `quantize` does the same, so
a graph's QuantizeLinear and this module agree bit for bit (tested against onnxruntime). FP8
(E4M3FN) codes are ml_dtypes' float8_e4m3fn: x / scale saturated to +-448, then rounded to the
nearest E4M3 value, ties to even (QuantizeLinear with ``saturate=1``, the default).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from qcompiler.options import QuantType

NUMPY_TYPES: dict[QuantType, np.dtype] = {
    QuantType.INT8: np.dtype(np.int8),
    QuantType.UINT8: np.dtype(np.uint8),
    QuantType.FP8: np.dtype(ml_dtypes.float8_e4m3fn),
}
FP8_MAX = 448.0
"""The largest finite FLOAT8E4M3FN value."""

SMALLEST_SCALE = float(np.finfo(np.float32).tiny) * 1e8
"""Floor for scales so an all-zero tensor still gets a valid (positive, finite) scale."""


def weight_type_beside(activation_type: QuantType, integer: QuantType = QuantType.INT8) -> QuantType:
    """The W8A8 weight type paired with `activation_type`: FP8 with FP8, else the integer type."""
    return QuantType.FP8 if activation_type.is_float else integer


def type_range(qtype: QuantType, *, symmetric: bool = False) -> tuple[int, int]:
    """The code range a quantizer uses; symmetric INT8 drops -128 so zero maps to 0 exactly.

    FP8: +-448 (its codes are not evenly spaced; the range is what saturates).
    """
    if qtype is QuantType.FP8:
        return (-int(FP8_MAX), int(FP8_MAX))
    if qtype is QuantType.INT8:
        return (-127, 127) if symmetric else (-128, 127)
    return (0, 255)


def activation_params(lo: float, hi: float, qtype: QuantType, *, symmetric: bool) -> tuple[np.float32, int]:
    """Scale and zero point for a per-tensor activation quantizer covering [lo, hi].

    The range always includes 0 (so zero padding and ReLU zeros are exact).
    """
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    qmin, qmax = type_range(qtype, symmetric=symmetric)
    if symmetric or qtype.is_float:
        absmax = max(-lo, hi)
        scale = max(2.0 * absmax / (qmax - qmin), SMALLEST_SCALE)
        zero_point = (qmin + qmax + 1) // 2 if qtype is QuantType.UINT8 else 0
        return np.float32(scale), int(zero_point)
    scale = max((hi - lo) / (qmax - qmin), SMALLEST_SCALE)
    zero_point = int(np.clip(np.round(qmin - lo / scale), qmin, qmax))
    return np.float32(scale), zero_point


def off_midpoint(
    lo: float, hi: float, scale: np.float32, zero_point: int, qtype: QuantType
) -> tuple[np.float32, int]:
    """An asymmetric uint8 quantizer moved off zero point 128, still covering [lo, hi].

    A uint8 range with zero point 128 is [-128 s, 127 s], which OpenVINO's low-precision
    transformations read as signed int8 (i8 x i8 MatMuls, slower on x86 than u8 x i8). Zero point
    127 or 129, whichever needs the smaller scale (at most 1 % larger).
    """
    if qtype is not QuantType.UINT8 or zero_point != 128:
        return scale, zero_point
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    choices = [(max(-lo / zp, hi / (255 - zp), SMALLEST_SCALE), zp) for zp in (127, 129)]
    best, zero = min(choices)
    return np.float32(best), zero


def symmetric_weight_scales(
    weight: np.ndarray, axis: int | None, qtype: QuantType = QuantType.INT8
) -> np.ndarray:
    """Per-channel (along `axis`) or per-tensor (axis None) scales mapping max|w| to the type's edge."""
    _, qmax = type_range(qtype, symmetric=True)
    if axis is None:
        absmax = np.max(np.abs(weight)) if weight.size else 0.0
        return np.asarray(max(float(absmax) / qmax, SMALLEST_SCALE), dtype=np.float32)
    reduce_axes = tuple(i for i in range(weight.ndim) if i != axis % weight.ndim)
    absmax = np.max(np.abs(weight), axis=reduce_axes)
    return np.maximum(absmax / qmax, SMALLEST_SCALE).astype(np.float32)


def _broadcast(param: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    param = np.asarray(param)
    if axis is None or param.ndim == 0:
        return param
    shape = [1] * ndim
    shape[axis % ndim] = param.size
    return param.reshape(shape)


def quantize(
    x: np.ndarray,
    scale: np.ndarray | np.floating | float,
    zero_point: np.ndarray | int,
    qtype: QuantType,
    axis: int | None = None,
) -> np.ndarray:
    """ONNX QuantizeLinear: saturate(round_half_even(x / scale) + zero_point) (FP8: see the module)."""
    s = _broadcast(np.asarray(scale, dtype=np.float32), x.ndim, axis)
    if qtype.is_float:
        return np.clip(x.astype(np.float32) / s, -FP8_MAX, FP8_MAX).astype(NUMPY_TYPES[qtype])
    info = np.iinfo(NUMPY_TYPES[qtype])
    z = _broadcast(np.asarray(zero_point, dtype=np.int32), x.ndim, axis)
    q = np.rint(x.astype(np.float32) / s) + z
    return np.clip(q, info.min, info.max).astype(NUMPY_TYPES[qtype])


def dequantize(
    q: np.ndarray,
    scale: np.ndarray | np.floating | float,
    zero_point: np.ndarray | int,
    axis: int | None = None,
) -> np.ndarray:
    """ONNX DequantizeLinear: (q - zero_point) * scale, in float32 (integer or FP8 codes)."""
    s = _broadcast(np.asarray(scale, dtype=np.float32), q.ndim, axis)
    if q.dtype == NUMPY_TYPES[QuantType.FP8]:
        return (q.astype(np.float32) * s).astype(np.float32)
    z = _broadcast(np.asarray(zero_point, dtype=np.int32), q.ndim, axis)
    return ((q.astype(np.int32) - z) * s).astype(np.float32)


def int32_bias(
    bias: np.ndarray, input_scale: float, weight_scales: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Quantize a bias to int32 with scale = input_scale * weight_scale (ORT's QLinearConv/QGemm form)."""
    scales = (np.float32(input_scale) * np.asarray(weight_scales, dtype=np.float32)).astype(np.float32)
    scales = np.broadcast_to(scales, bias.shape).astype(np.float32)
    info = np.iinfo(np.int32)
    q = np.clip(np.rint(bias.astype(np.float64) / scales), info.min, info.max).astype(np.int32)
    return q, scales
