"""Block-wise low-bit weight quantization (INT4 now) and onnxruntime's MatMulNBits packing.

A weight W [K, N] (MatMul's B: K input channels, N outputs) is split along K into blocks of
`block_size` rows; each (block, output column) gets a scale and, asymmetric, a zero point. This
is the layout of ONNX DequantizeLinear with ``axis=0, block_size=B`` (opset 21) and, transposed
and bit-packed, of ``com.microsoft.MatMulNBits``:

- B: uint8 [N, n_blocks, block_size * bits / 8], codes along K packed low nibble first;
- scales: [N * n_blocks], float;
- zero_points: uint8 [N * ceil(n_blocks * bits / 8)], codes packed low nibble first per column
  (absent means 8 for 4-bit: symmetric codes are stored offset by 8).

A K that does not divide into blocks gets a shorter last block (padded with zero codes when
packed), which both forms accept. numpy only; tests check both forms against onnxruntime.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from qcompiler.numerics import SMALLEST_SCALE


@dataclasses.dataclass(frozen=True)
class BlockQuantized:
    """Codes and parameters of a block-quantized weight [K, N].

    Attributes:
        codes: int8 in [-8, 7] when symmetric, uint8 in [0, 15] when asymmetric; shape [K, N].
        scales: float32 [n_blocks, N].
        zero_points: uint8 [n_blocks, N] (asymmetric) or None (symmetric: zero point 0).
        block_size: rows of K per block.
    """

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    block_size: int

    def unsigned_codes(self) -> np.ndarray:
        """Codes as MatMulNBits stores them: uint8 0..15 (symmetric ones offset by 8)."""
        if self.zero_points is None:
            return (self.codes.astype(np.int16) + 8).astype(np.uint8)
        return self.codes


def _blocks(array: np.ndarray, block_size: int) -> tuple[np.ndarray, int]:
    """[K, N] -> [n_blocks, block_size, N] (zero-padded), and K."""
    rows = array.shape[0]
    n_blocks = -(-rows // block_size)
    padded = np.zeros((n_blocks * block_size, array.shape[1]), dtype=array.dtype)
    padded[:rows] = array
    return padded.reshape(n_blocks, block_size, array.shape[1]), rows


def quantize_int4(weight: np.ndarray, block_size: int, *, symmetric: bool) -> BlockQuantized:
    """Round-to-nearest INT4 per (block, column).

    Symmetric: scale = max|w| / 7, codes in [-7, 7] (ONNX int4, zero point 0).
    Asymmetric: scale = (max - min) / 15 over a range holding 0, uint4 codes with a zero point.
    """
    blocks, rows = _blocks(weight.astype(np.float32), block_size)
    if symmetric:
        scales = np.maximum(np.abs(blocks).max(axis=1) / 7.0, SMALLEST_SCALE).astype(np.float32)
        codes = np.clip(np.rint(blocks / scales[:, None, :]), -8, 7).astype(np.int8)
        zero_points = None
    else:
        lo = np.minimum(blocks.min(axis=1), 0.0)
        hi = np.maximum(blocks.max(axis=1), 0.0)
        scales = np.maximum((hi - lo) / 15.0, SMALLEST_SCALE).astype(np.float32)
        zero_points = np.clip(np.rint(-lo / scales), 0, 15).astype(np.uint8)
        codes = np.clip(np.rint(blocks / scales[:, None, :]) + zero_points[:, None, :], 0, 15).astype(
            np.uint8
        )
    return BlockQuantized(codes.reshape(-1, weight.shape[1])[:rows], scales, zero_points, block_size)


def dequantize(quantized: BlockQuantized) -> np.ndarray:
    """(codes - zero_point) * scale per block, float32 [K, N] (ONNX DequantizeLinear semantics)."""
    blocks, rows = _blocks(quantized.codes.astype(np.int32), quantized.block_size)
    zero = 0 if quantized.zero_points is None else quantized.zero_points.astype(np.int32)[:, None, :]
    values = ((blocks - zero) * quantized.scales[:, None, :]).astype(np.float32)
    return values.reshape(-1, quantized.codes.shape[1])[:rows]


def _pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """Pack uint8 values 0..15 along the last axis, two per byte, first value in the low nibble."""
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros(codes.shape[:-1] + (1,), dtype=codes.dtype)], axis=-1)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class MatMulNBitsWeights:
    """The constant inputs and attributes of one ``com.microsoft.MatMulNBits`` node."""

    packed: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    K: int  # noqa: N815 - the attribute's name
    N: int  # noqa: N815
    block_size: int
    bits: int = 4


def pack_matmul_nbits(quantized: BlockQuantized) -> MatMulNBitsWeights:
    """MatMulNBits' layout of a 4-bit block-quantized W [K, N] (zero points omitted if symmetric)."""
    rows, columns = quantized.codes.shape
    blocks, _ = _blocks(quantized.unsigned_codes(), quantized.block_size)  # [n_blocks, B, N]
    packed = _pack_nibbles(np.transpose(blocks, (2, 0, 1)))  # [N, n_blocks, B / 2]
    scales = np.ascontiguousarray(quantized.scales.T).reshape(-1)
    zero_points = None
    if quantized.zero_points is not None:
        zero_points = _pack_nibbles(np.ascontiguousarray(quantized.zero_points.T)).reshape(-1)
    return MatMulNBitsWeights(packed, scales, zero_points, rows, columns, quantized.block_size)
