"""A model's float precision, as a property of the model (FP32, FP16, BF16), and what follows from it.

Passes emit every new float tensor (scales, smoothing vectors, dequantized values) in the type of
the tensor it stands beside, so an FP16 model comes out FP16. Statistics are accumulated in FP32
whatever the model computes in (`as_float32`). Weights stored below the compute type are handled
in `qcompiler.decompression`.
"""

from __future__ import annotations

import collections

import ml_dtypes
import numpy as np
import onnx_ir as ir

FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16})
"""The float element types every pass handles."""

REDUCED_TYPES = frozenset({ir.DataType.FLOAT16, ir.DataType.BFLOAT16})
"""Float types whose Q/DQ scales need QuantizeLinear / DequantizeLinear 19."""

REDUCED_SCALE_OPSET = 19
"""The first opset whose QuantizeLinear / DequantizeLinear take FP16 / BF16 scales."""

STORED_TYPE_KEY = "qcompiler.stored_dtype"
"""`ir.Value.meta` key: the element type a lifted weight was stored in (`decompression.lift_decompression`)."""

PRECISION_KEY = "qcompiler.precision"
"""`ir.Model.metadata_props` key: the source model's precision (``float32``, ``float16``, ``bfloat16``)."""


def numpy_type(dtype: ir.DataType) -> np.dtype:
    """The numpy dtype arrays of `dtype` are held in (ml_dtypes' bfloat16 for BF16)."""
    if dtype == ir.DataType.BFLOAT16:
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(dtype.numpy())


def as_type(array: np.ndarray | np.generic | float, dtype: ir.DataType | None) -> np.ndarray:
    """`array` in the float type `dtype` (FP32 when None or not a float type), rounded once."""
    target = numpy_type(dtype) if dtype in FLOAT_TYPES else np.dtype(np.float32)
    array = np.asarray(array)
    return array if array.dtype == target else array.astype(target)


def as_scale(array: np.ndarray | np.generic | float, dtype: ir.DataType | None) -> np.ndarray:
    """Positive scales in the float type `dtype`, kept inside its range (FP16: [9.5e-7, 65504]).

    A scale that underflows to 0 would divide by zero in QuantizeLinear; the floor keeps 4 bits of
    an FP16 subnormal's mantissa.
    """
    target = numpy_type(dtype) if dtype in FLOAT_TYPES else np.dtype(np.float32)
    info = ml_dtypes.finfo(target)
    clipped = np.clip(np.asarray(array, np.float32), float(info.smallest_normal) / 64, float(info.max))
    return clipped.astype(target)


def as_float32(array: np.ndarray) -> np.ndarray:
    """A runtime's output as FP32, the precision every statistic and metric is computed in."""
    if array.dtype.kind == "f" and array.dtype != np.float32 or array.dtype == ml_dtypes.bfloat16:
        return array.astype(np.float32)
    return array


def float_type_of(value: ir.Value | None) -> ir.DataType:
    """The float type a tensor computes in (FP32 for a value without one)."""
    if value is not None and value.dtype in FLOAT_TYPES:
        return value.dtype  # type: ignore[return-value]
    return ir.DataType.FLOAT


def model_precision(model: ir.Model) -> ir.DataType:
    """The precision the model's weights are stored in: the float type holding most weight bytes.

    A lifted weight counts in its stored type, so an FP16-compressed OpenVINO IR is FP16. A model
    without float weights is FP32.
    """
    sizes: collections.Counter[ir.DataType] = collections.Counter()
    for value in model.graph.initializers.values():
        stored = value.meta.get(STORED_TYPE_KEY, value.dtype)
        if stored in FLOAT_TYPES and value.const_value is not None:
            sizes[stored] += int(np.prod(value.const_value.shape.numpy() or (1,)))
    return sizes.most_common(1)[0][0] if sizes else ir.DataType.FLOAT


def precision_name(dtype: ir.DataType) -> str:
    """``float32``, ``float16`` or ``bfloat16``: how the report and the model's metadata name it."""
    return {ir.DataType.FLOAT16: "float16", ir.DataType.BFLOAT16: "bfloat16"}.get(dtype, "float32")


def reduced_activations(model: ir.Model) -> bool:
    """Whether the graph computes any activation in FP16 / BF16 (its Q/DQ scales then need opset 19)."""
    return any(output.dtype in REDUCED_TYPES for node in model.graph for output in node.outputs) or any(
        value.dtype in REDUCED_TYPES for value in model.graph.inputs
    )
