"""``MatMulFP4``: our packed-FP4 MatMul, an onnxruntime-extensions custom op onnxruntime loads.

onnxruntime has no float4e2m1 DequantizeLinear kernel (NOT_IMPLEMENTED), so MXFP4 / NVFP4
weights lower to this op instead of the canonical DQ -> MatMul::

    MatMulFP4(A [..., K] float32, B [N, ceil(K / 2)] uint8, scales [N, K / block] uint8,
              global_scale [1] float32) -> Y [..., N] = A @ dequantize(B)ᵀ

B holds two E2M1 codes per byte along K, element 2i in the low nibble (ONNX's float4e2m1
packing, and OpenVINO's). Scales are stored in their own formats: ``scale_type`` 0 = E8M0 biased
exponents (MXFP4, blocks of 32: 2^(byte - 127); global scale 1), 1 = FP8 E4M3 bits times the
FP32 global scale (NVFP4, blocks of 16). The op is written in numpy and registered with onnxruntime-extensions'
Python op interface (``ai.onnx.contrib``): a session needs this module imported and the
extensions library registered (`register`; `session.create_session` does both). The weight is
decoded on every call, a few hundred output channels at a time (a byte-pair table lookup and one
multiply), so the model keeps its 4.25 / 4.5 bits per weight in memory; the cost is measured
against FP32 MatMul in ``benchmarks/fp4_matmul.py``.
"""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np

from qcompiler.weight_formats import FP4_TABLE, CompressedWeight, WeightFormat, pack_nibbles

DOMAIN = "ai.onnx.contrib"
"""onnxruntime-extensions' custom-op domain (Python ops are registered there)."""
OP_TYPE = "MatMulFP4"
E8M0, E4M3 = 0, 1
"""`scale_type` values."""

_PAIRS = np.stack([FP4_TABLE[np.arange(256) & 0x0F], FP4_TABLE[np.arange(256) >> 4]], axis=1)
"""Byte -> its two E2M1 values (low nibble first): [256, 2] float32."""
_PAIR_WORDS = np.ascontiguousarray(_PAIRS).view(np.uint64).reshape(256)
"""The same pairs, one uint64 word per byte."""


@dataclasses.dataclass(frozen=True)
class PackedFP4:
    """The MatMulFP4 inputs and attributes of one weight."""

    packed: np.ndarray
    scales: np.ndarray
    global_scale: np.ndarray
    K: int  # noqa: N815 - the op's attribute names
    N: int  # noqa: N815
    block_size: int
    scale_type: int


def pack_fp4(weight: CompressedWeight) -> PackedFP4:
    """A canonical MXFP4 / NVFP4 weight [K, N] in MatMulFP4's layout."""
    if weight.format not in (WeightFormat.MXFP4, WeightFormat.NVFP4):
        raise ValueError(f"MatMulFP4 takes MXFP4 / NVFP4 weights, not {weight.format.value}")
    rows, columns = weight.shape
    packed = pack_nibbles(np.ascontiguousarray(weight.codes.T))  # [N, K/2]
    scales = np.ascontiguousarray(weight.scales.T)  # [N, blocks]
    if weight.format is WeightFormat.MXFP4:
        exponents = np.rint(np.log2(scales)).astype(np.int32) + 127
        encoded, global_scale, scale_type = exponents.astype(np.uint8), np.ones(1, np.float32), E8M0
    else:
        assert weight.global_scale is not None
        relative = (scales / weight.global_scale).astype(ml_dtypes.float8_e4m3fn)
        encoded = relative.view(np.uint8)
        global_scale, scale_type = np.array([weight.global_scale], np.float32), E4M3
    return PackedFP4(packed, encoded, global_scale, rows, columns, weight.block_size, scale_type)


def _scale_factors(scales: np.ndarray, global_scale: np.ndarray, scale_type: int) -> np.ndarray:
    """The float32 block scales [rows, blocks] of the stored E8M0 / E4M3 bytes."""
    if scale_type == E8M0:
        return np.ldexp(np.float32(1.0), scales.astype(np.int32) - 127).astype(np.float32)
    return scales.view(ml_dtypes.float8_e4m3fn).astype(np.float32) * np.float32(global_scale.reshape(()))


def dequantize(
    packed: np.ndarray,
    scales: np.ndarray,
    global_scale: np.ndarray,
    k: int,
    block_size: int,
    scale_type: int,
) -> np.ndarray:
    """The float32 weight [rows, K] of MatMulFP4's inputs (the op's numpy reference)."""
    rows = packed.shape[0]
    # each byte -> its two float32 values as one 8-byte word: np.take on uint64 is ~3x faster
    # than fancy-indexing a [256, 2] table
    values = np.take(_PAIR_WORDS, packed).view(np.float32).reshape(rows, -1)
    blocks = scales.shape[1]
    padded = blocks * block_size
    if values.shape[1] < padded:
        values = np.concatenate([values, np.zeros((rows, padded - values.shape[1]), np.float32)], axis=1)
    blocked = values[:, :padded].reshape(rows, blocks, block_size)
    blocked *= _scale_factors(scales, global_scale, scale_type)[:, :, None]
    return blocked.reshape(rows, padded)[:, :k]


CHUNK_ROWS = 256
"""Output channels decoded at once: a few MB of float weights stay in cache (4096 x 4096, M=1:
105 -> 19 ms per call) and the full float weight never exists."""


def matmul_fp4(
    a: np.ndarray,
    packed: np.ndarray,
    scales: np.ndarray,
    global_scale: np.ndarray,
    *,
    K: int,  # noqa: N803
    block_size: int,
    scale_type: int,
) -> np.ndarray:
    """Y = A @ dequantize(B)ᵀ in float32, decoded CHUNK_ROWS output channels at a time."""
    columns = packed.shape[0]
    flat = np.ascontiguousarray(a, np.float32).reshape(-1, K)
    out = np.empty((flat.shape[0], columns), np.float32)
    for start in range(0, columns, CHUNK_ROWS):
        stop = min(start + CHUNK_ROWS, columns)
        weight = dequantize(packed[start:stop], scales[start:stop], global_scale, K, block_size, scale_type)
        np.matmul(flat, weight.T, out=out[:, start:stop])
    return out.reshape(*a.shape[:-1], columns)


_registered = False


def register() -> str:
    """Define the Python op with onnxruntime-extensions (once); return the library to register."""
    global _registered
    from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op

    if not _registered:
        onnx_op(
            op_type=OP_TYPE,
            domain=DOMAIN,
            inputs=[
                PyCustomOpDef.dt_float,
                PyCustomOpDef.dt_uint8,
                PyCustomOpDef.dt_uint8,
                PyCustomOpDef.dt_float,
            ],
            outputs=[PyCustomOpDef.dt_float],
            attrs={name: PyCustomOpDef.dt_int64 for name in ("K", "N", "block_size", "scale_type")},
        )(_compute)
        _registered = True
    return get_library_path()


def _compute(
    a: np.ndarray, packed: np.ndarray, scales: np.ndarray, global_scale: np.ndarray, **attributes: int
) -> np.ndarray:
    return matmul_fp4(
        a,
        packed,
        scales,
        global_scale,
        K=int(attributes["K"]),
        block_size=int(attributes["block_size"]),
        scale_type=int(attributes["scale_type"]),
    )
