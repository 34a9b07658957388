"""onnxruntime's packed weight layouts: ``com.microsoft.MatMulNBits`` and ``MatMulBnb4``.

MatMulNBits (INT4 / INT8, blocks along K):
- B: uint8 [N, n_blocks, block_size * bits / 8], codes along K, low bits first;
- scales: [N * n_blocks], float;
- zero_points: uint8 [N * ceil(n_blocks * bits / 8)], packed the same way per column (absent
  means 2^(bits-1): symmetric codes are stored offset by it).
`block_size` must be a power of two >= 16; a K that does not divide gets a zero-padded last
block; a per-channel weight is tiled by equal-scale blocks (see `nbits_block_size`).

MatMulBnb4 (NF4): B transposed to [N, K], flattened, two codes per byte; absmax [N * K / block].

GatherBlockQuantized (embedding tables [V, H], blocks along H): data uint8 [V, H] (8 bits) or
[V, H / 2] (4 bits, low nibble first), unsigned (symmetric codes offset by 2^(bits-1), the
kernel's default zero point); scales [V, H / B]; zero points like data.

Tests check both against the runtime's kernels.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from qcompiler.errors import UnsupportedModelError
from qcompiler.weight_formats import CompressedWeight, WeightFormat, pack_nibbles, to_blocks


def nbits_block_size(weight: CompressedWeight) -> int:
    """MatMulNBits' block size for `weight`.

    Its own block size; for a per-channel weight, the largest power-of-two block (16..256) that
    tiles K, each block repeating the column's scale (same values, no padding), else one padded
    power-of-two block.
    """
    rows = weight.shape[0]
    size = weight.block_size
    if size >= rows:
        for candidate in (256, 128, 64, 32, 16):
            if rows % candidate == 0:
                return candidate
        return max(16, 1 << (rows - 1).bit_length())
    if size < 16 or size & (size - 1):
        raise UnsupportedModelError(
            f"MatMulNBits needs a power-of-two block size >= 16, got group size {size}"
        )
    return size


@dataclasses.dataclass(frozen=True)
class MatMulNBitsWeights:
    """The constant inputs and attributes of one ``com.microsoft.MatMulNBits`` node."""

    packed: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    K: int  # noqa: N815 - the attribute's name
    N: int  # noqa: N815
    block_size: int
    bits: int


def pack_matmul_nbits(weight: CompressedWeight) -> MatMulNBitsWeights:
    """MatMulNBits' layout of an INT4 / INT8 weight [K, N] (zero points omitted if symmetric)."""
    if not weight.format.is_integer:
        raise ValueError(f"MatMulNBits holds integer weights, not {weight.format.value}")
    bits = weight.format.bits
    rows, columns = weight.shape
    block_size = nbits_block_size(weight)
    codes = weight.codes
    if weight.symmetric:
        codes = (codes.astype(np.int16) + 2 ** (bits - 1)).astype(np.uint8)
    blocks = np.transpose(to_blocks(codes, block_size), (2, 0, 1))  # [N, n_blocks, B]
    packed = pack_nibbles(blocks) if bits == 4 else np.ascontiguousarray(blocks, dtype=np.uint8)
    repeat = blocks.shape[1] // weight.scales.shape[0]  # > 1 when a per-channel scale is tiled
    scales = np.ascontiguousarray(np.repeat(weight.scales, repeat, axis=0).T).reshape(-1)
    zero_points = None
    if weight.zero_points is not None:
        zero_columns = np.ascontiguousarray(np.repeat(weight.zero_points, repeat, axis=0).T)
        zero_points = (pack_nibbles(zero_columns) if bits == 4 else zero_columns).reshape(-1)
    return MatMulNBitsWeights(packed, scales, zero_points, rows, columns, block_size, bits)


@dataclasses.dataclass(frozen=True)
class MatMulBnb4Weights:
    """The constant inputs and attributes of one ``com.microsoft.MatMulBnb4`` node (NF4)."""

    packed: np.ndarray
    absmax: np.ndarray
    K: int  # noqa: N815
    N: int  # noqa: N815
    block_size: int


def pack_matmul_bnb4(weight: CompressedWeight) -> MatMulBnb4Weights:
    """MatMulBnb4's layout of an NF4 weight whose blocks tile K exactly (power of two >= 16)."""
    rows, columns = weight.shape
    size = weight.block_size
    if weight.format is not WeightFormat.NF4:
        raise ValueError(f"MatMulBnb4 holds NF4 weights here, not {weight.format.value}")
    if rows % size or size < 16 or size & (size - 1):
        raise UnsupportedModelError(
            f"MatMulBnb4 needs a power-of-two block size >= 16 dividing K={rows}, got {size}"
        )
    flat = np.ascontiguousarray(weight.codes.T).reshape(-1)
    packed = ((flat[0::2] << 4) | flat[1::2]).astype(np.uint8)
    absmax = np.ascontiguousarray(weight.scales.T).reshape(-1)
    return MatMulBnb4Weights(packed, absmax, rows, columns, size)


@dataclasses.dataclass(frozen=True)
class GatherBlockQuantizedWeights:
    """The constant inputs and attributes of one ``com.microsoft.GatherBlockQuantized`` node."""

    data: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    block_size: int
    bits: int


def pack_gather_block_quantized(table: CompressedWeight) -> GatherBlockQuantizedWeights:
    """GatherBlockQuantized's layout of an INT4 / INT8 table given as [H, V] (blocks along H)."""
    size = table.block_size
    if not table.format.is_integer or size < 16 or size & (size - 1):
        raise UnsupportedModelError(
            f"GatherBlockQuantized needs INT4/INT8 in power-of-two row blocks >= 16, got {table.format.value} "
            f"in blocks of {size}"
        )
    bits = table.format.bits
    codes = table.codes.T  # [V, H]
    if table.symmetric:
        codes = (codes.astype(np.int16) + 2 ** (bits - 1)).astype(np.uint8)
    data = pack_nibbles(codes) if bits == 4 else np.ascontiguousarray(codes, np.uint8)
    zero_points = None
    if table.zero_points is not None:
        zeros = np.ascontiguousarray(table.zero_points.T)
        zero_points = pack_nibbles(zeros) if bits == 4 else zeros
    return GatherBlockQuantizedWeights(data, np.ascontiguousarray(table.scales.T), zero_points, size, bits)
