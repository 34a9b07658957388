"""Low-bit weight formats: scales, encoding and decoding of a weight W [K, N], in one place.

W is MatMul's B (K input channels, N outputs). It is split along K into blocks of `block_size`
rows (the last one shorter when K does not divide; `block_size == K` is per-channel) and each
(block, column) gets a scale, and for asymmetric integers a zero point:

- INT8 / INT4: codes are integers, value = (code - zero_point) * scale.
- NF4: codes index the QLoRA NormalFloat table in [-1, 1], value = table[code] * scale.
- MXFP4: FP4 E2M1 codes, blocks of 32, scales powers of two (E8M0).
- NVFP4: FP4 E2M1 codes, blocks of 16, scales in FP8 E4M3 times one FP32 tensor scale.
- FP8: E4M3 codes, one scale per output channel.

Everything here is numpy on arrays shaped [n_blocks, block_size, N] ("blocked"), so the
algorithms (AWQ, scale estimation, GPTQ) can call `fake_quantize` on whole layers at once.
Rounding follows the ONNX / OCP definitions (round half to even, saturating casts through
ml_dtypes); tests check the results bit-exactly against onnxruntime where it has a kernel.
"""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np

from qcompiler.errors import OptionError
from qcompiler.numerics import SMALLEST_SCALE
from qcompiler.options import WeightFormat

NF4_TABLE = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    np.float32,
)
"""QLoRA's NormalFloat4 values (bitsandbytes, OpenVINO nf4 and MatMulBnb4 use the same table)."""

FP4_TABLE = np.arange(16, dtype=np.uint8).view(ml_dtypes.float4_e2m1fn).astype(np.float32)
"""E2M1 value of each 4-bit code (code 8 is -0)."""
FP4_MAX = 6.0
FP8_MAX = 448.0


@dataclasses.dataclass(frozen=True)
class CompressedWeight:
    """A weight [K, N] in a low-bit format.

    Attributes:
        format: the format.
        codes: [K, N]; int8 in [-2^(b-1), 2^(b-1)-1] for symmetric integers, uint8 for
            asymmetric ones, the 4-bit code (table index / E2M1 bits) for NF4 and FP4, the E4M3
            bits (uint8) for FP8.
        scales: float32 [n_blocks, N], the effective scale of each block (NVFP4: the FP8 block
            scale already multiplied by `global_scale`).
        zero_points: uint8 [n_blocks, N] for asymmetric integers, else None.
        block_size: rows of K per block (K for per-channel).
        global_scale: NVFP4's FP32 tensor scale (block scales are FP8 multiples of it).
    """

    format: WeightFormat
    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    block_size: int
    global_scale: float | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """(K, N)."""
        return (int(self.codes.shape[0]), int(self.codes.shape[1]))

    @property
    def symmetric(self) -> bool:
        """No zero point."""
        return self.zero_points is None

    def dequantize(self) -> np.ndarray:
        """Float32 [K, N] (DequantizeLinear semantics)."""
        values = decode(to_blocks(self.codes, self.block_size), self.scales, self.zero_points, self.format)
        return from_blocks(values, self.shape[0])


def resolve_block_size(fmt: WeightFormat, group_size: int, rows: int) -> int:
    """Rows per block for a weight with `rows` input channels.

    The format's own block, else the user's group (0 = per-channel); a group at least as large
    as the weight is per-channel.
    """
    fixed = fmt.fixed_block
    size = group_size if fixed is None else fixed
    if size < 0:
        raise OptionError(f"--group-size {group_size}: must be 0 (per-channel) or positive")
    return rows if size == 0 or size >= rows else size


def to_blocks(array: np.ndarray, block_size: int) -> np.ndarray:
    """[K, N] -> [n_blocks, block_size, N], the last block zero-padded."""
    rows, columns = array.shape
    n_blocks = -(-rows // block_size)
    if n_blocks * block_size == rows:
        return array.reshape(n_blocks, block_size, columns)
    padded = np.zeros((n_blocks * block_size, columns), dtype=array.dtype)
    padded[:rows] = array
    return padded.reshape(n_blocks, block_size, columns)


def from_blocks(blocks: np.ndarray, rows: int) -> np.ndarray:
    """Inverse of `to_blocks`."""
    return blocks.reshape(-1, blocks.shape[-1])[:rows]


def integer_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """The codes of a `bits`-bit integer format: signed when symmetric, else unsigned."""
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)


def rtn_scales(
    blocks: np.ndarray, fmt: WeightFormat, *, symmetric: bool, global_scale: float | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Round-to-nearest scales (and zero points) of blocked weights [n_blocks, B, N].

    The block's range maps onto the format's full range.
    """
    if fmt.is_integer and not symmetric:
        lo = np.minimum(blocks.min(axis=1), 0.0)
        hi = np.maximum(blocks.max(axis=1), 0.0)
        qmin, qmax = integer_range(fmt.bits, False)
        scales = np.maximum((hi - lo) / (qmax - qmin), SMALLEST_SCALE).astype(np.float32)
        zero_points = np.clip(np.rint(qmin - lo / scales), qmin, qmax).astype(np.uint8)
        return scales, zero_points
    if fmt.is_integer:
        # The extreme of larger magnitude lands exactly on its own end of the signed range, so
        # a negative one uses -8 (-128): 8/7 finer steps than max|w| / 7 for those blocks, no
        # clipping (SmolLM2 INT4 g64 RTN perplexity 36.0 vs 38.8 on 8 windows).
        upper, lower = blocks.max(axis=1), blocks.min(axis=1)
        qmin, qmax = integer_range(fmt.bits, True)
        return snap_scales(np.where(-lower > upper, lower / qmin, upper / qmax), fmt), None
    absmax = np.abs(blocks).max(axis=1)
    if fmt is WeightFormat.MXFP4:  # the power of two at or above: the block maximum is not clipped
        return np.exp2(np.ceil(np.log2(np.maximum(absmax / FP4_MAX, SMALLEST_SCALE)))).astype(
            np.float32
        ), None
    return snap_scales(absmax / _format_max(fmt), fmt, global_scale), None


def _format_max(fmt: WeightFormat) -> float:
    if fmt.is_integer:
        return float(2 ** (fmt.bits - 1) - 1)
    return {WeightFormat.NF4: 1.0, WeightFormat.FP8: FP8_MAX}.get(fmt, FP4_MAX)


def nvfp4_global_scale(weight: np.ndarray) -> float:
    """NVFP4's tensor scale: the largest block scale lands on FP8 E4M3's maximum."""
    return max(float(np.abs(weight).max()) / (FP4_MAX * FP8_MAX), SMALLEST_SCALE)


def snap_scales(scales: np.ndarray, fmt: WeightFormat, global_scale: float | None = None) -> np.ndarray:
    """The nearest scales the format can store (MXFP4: the nearest power of two), never zero."""
    scales = np.maximum(np.asarray(scales, np.float32), SMALLEST_SCALE)
    if fmt is WeightFormat.MXFP4:
        return np.exp2(np.round(np.log2(scales))).astype(np.float32)
    if fmt is WeightFormat.NVFP4:
        if global_scale is None:
            raise ValueError("NVFP4 scales need the tensor's global scale")
        relative = np.clip(scales / global_scale, 2.0**-9, FP8_MAX)
        return (relative.astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * global_scale).astype(np.float32)
    return scales.astype(np.float32)


def encode(
    blocks: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, fmt: WeightFormat
) -> np.ndarray:
    """Codes of blocked weights [n_blocks, B, N] given per-(block, column) scales [n_blocks, N]."""
    scaled = blocks / scales[:, None, :]
    if fmt.is_integer:
        symmetric = zero_points is None
        qmin, qmax = integer_range(fmt.bits, symmetric)
        if not symmetric:
            scaled = scaled + zero_points[:, None, :]  # type: ignore[index]
        return np.clip(np.rint(scaled), qmin, qmax).astype(np.int8 if symmetric else np.uint8)
    if fmt is WeightFormat.NF4:
        midpoints = (NF4_TABLE[1:] + NF4_TABLE[:-1]) / 2
        return np.searchsorted(midpoints, np.clip(scaled, -1.0, 1.0)).astype(np.uint8)
    if fmt is WeightFormat.FP8:
        return np.clip(scaled, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    return np.clip(scaled, -FP4_MAX, FP4_MAX).astype(ml_dtypes.float4_e2m1fn).view(np.uint8)


def decode(
    codes: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, fmt: WeightFormat
) -> np.ndarray:
    """Float32 values of blocked codes (the inverse of `encode` up to rounding)."""
    if fmt.is_integer:
        values = codes.astype(np.float32)
        if zero_points is not None:
            values -= zero_points[:, None, :].astype(np.float32)
    elif fmt is WeightFormat.NF4:
        values = NF4_TABLE[codes]
    elif fmt is WeightFormat.FP8:
        values = codes.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    else:
        values = FP4_TABLE[codes]
    return (values * scales[:, None, :]).astype(np.float32)


def code_units(
    blocks: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, fmt: WeightFormat
) -> np.ndarray:
    """The rounded values in units of the scale (code - zero point, or the table value), float32.

    decode(encode(...)) / scale, computed in place for integers: the algorithms' inner loop.
    """
    if not fmt.is_integer:
        ones = np.ones_like(scales)
        return decode(encode(blocks, scales, zero_points, fmt), ones, zero_points, fmt)
    symmetric = zero_points is None
    qmin, qmax = integer_range(fmt.bits, symmetric)
    units = blocks / scales[:, None, :]
    if symmetric:
        np.rint(units, out=units)
        return np.minimum(np.maximum(units, qmin, out=units), qmax, out=units)
    zero = zero_points[:, None, :].astype(np.float32)  # type: ignore[index]
    units += zero
    np.rint(units, out=units)
    np.minimum(np.maximum(units, qmin, out=units), qmax, out=units)
    units -= zero
    return units


def fake_quantize(
    blocks: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, fmt: WeightFormat
) -> np.ndarray:
    """decode(encode(...)): what the runtime will compute with, blocked."""
    return code_units(blocks, scales, zero_points, fmt) * scales[:, None, :]


SLICE_BYTES = 16 * 2**20
"""Float32 bytes of weight the algorithms take at once (`column_slice`)."""


def column_slice(shape: tuple[int, ...]) -> int:
    """Columns of a [K, N] weight to process at once: all of them unless over twice `SLICE_BYTES`.

    Every algorithm here treats output columns independently (blocks run along K), so a large
    weight is done in slices and joined (`join_columns`), bounding the temporaries.
    """
    rows, columns = int(shape[0]), int(shape[1])
    step = max(1, SLICE_BYTES // (4 * max(rows, 1)))
    return columns if columns <= 2 * step else step


def join_columns(parts: list[CompressedWeight]) -> CompressedWeight:
    """The weight whose column slices are `parts`, in order (same format, blocks, global scale)."""
    first = parts[0]
    zeros = None
    if first.zero_points is not None:
        zeros = np.concatenate([part.zero_points for part in parts], axis=1)  # type: ignore[misc]
    return CompressedWeight(
        first.format,
        np.concatenate([part.codes for part in parts], axis=1),
        np.concatenate([part.scales for part in parts], axis=1),
        zeros,
        first.block_size,
        first.global_scale,
    )


def quantize(
    weight: np.ndarray,
    fmt: WeightFormat,
    block_size: int,
    *,
    symmetric: bool = True,
    scales: np.ndarray | None = None,
    zero_points: np.ndarray | None = None,
    global_scale: float | None = None,
) -> CompressedWeight:
    """Compress W [K, N]; round-to-nearest scales unless `scales` (and zero points) are given.

    Formats other than asymmetric integers are symmetric by definition (`symmetric` is ignored).
    Columns are independent: a large weight (an LLM's embedding table) is done in slices of
    columns, so the temporaries stay a few times `SLICE_BYTES` rather than a few times the weight.
    """
    weight = np.asarray(weight, np.float32)
    symmetric = symmetric or not fmt.is_integer
    if fmt is WeightFormat.NVFP4 and global_scale is None:
        global_scale = nvfp4_global_scale(weight)
    step = column_slice(weight.shape)
    if scales is None and step < weight.shape[1]:
        return join_columns(
            [
                quantize(
                    weight[:, start : start + step],
                    fmt,
                    block_size,
                    symmetric=symmetric,
                    global_scale=global_scale,
                )
                for start in range(0, weight.shape[1], step)
            ]
        )
    blocks = to_blocks(weight, block_size)
    if scales is None:
        scales, zero_points = rtn_scales(blocks, fmt, symmetric=symmetric, global_scale=global_scale)
    codes = from_blocks(encode(blocks, scales, zero_points, fmt), weight.shape[0])
    return CompressedWeight(fmt, codes, scales, zero_points, block_size, global_scale)


def fake_quantize_matrix(
    weight: np.ndarray, fmt: WeightFormat, block_size: int, *, symmetric: bool = True
) -> np.ndarray:
    """W [K, N] rounded to the format with RTN scales, as float32 [K, N]."""
    symmetric = symmetric or not fmt.is_integer
    global_scale = nvfp4_global_scale(weight) if fmt is WeightFormat.NVFP4 else None
    blocks = to_blocks(np.asarray(weight, np.float32), block_size)
    scales, zero_points = rtn_scales(blocks, fmt, symmetric=symmetric, global_scale=global_scale)
    return from_blocks(fake_quantize(blocks, scales, zero_points, fmt), weight.shape[0])


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """4-bit codes two per byte along the last axis, the even element in the low nibble.

    The layout of ONNX's 4-bit types, OpenVINO's u4 / i4 / f4e2m1 constants, MatMulNBits and our
    FP4 MatMul. Any integer dtype (a signed code keeps its two's-complement low nibble); an odd
    last axis is padded with a zero code.
    """
    codes = np.asarray(codes)
    nibbles = (codes.view(np.uint8) if codes.dtype.itemsize == 1 else codes.astype(np.uint8)) & 0x0F
    if nibbles.shape[-1] % 2:
        nibbles = np.concatenate([nibbles, np.zeros(nibbles.shape[:-1] + (1,), np.uint8)], axis=-1)
    return (nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)).astype(np.uint8)


def stored_bits(weight: CompressedWeight) -> int:
    """Bits the weight occupies stored: codes, scales and zero points (what size budgets count)."""
    bits = weight.codes.size * weight.format.bits
    bits += weight.scales.size * weight.format.spec.scale_bits
    if weight.zero_points is not None:
        bits += weight.zero_points.size * weight.format.bits
    if weight.global_scale is not None:
        bits += 32
    return int(bits)
