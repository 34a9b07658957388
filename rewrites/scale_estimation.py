"""Scale estimation: refit each block's scale against the activation-weighted output error.

For one block of rows of a weight (B input channels, one output column) with values w, codes
u (in code units: code - zero point, or the table value) and scale s, the layer-output error
over the calibration rows X_b of those channels is

    || X_b (w - s u) ||² / rows = (w - s u)ᵀ H_b (w - s u) = c0 - 2 s uᵀH_b w + s² uᵀH_b u,

with H_b the block's diagonal block of the Gram matrix H = XᵀX / rows. For fixed codes the best
scale is closed-form, s* = uᵀH_b w / uᵀH_b u. The search tries codes rounded at a grid of
shrunk RTN scales (clipping outliers), refits s* for each, and keeps per (block, column) the
(codes, scale) with the least error. Cross-block terms of H are ignored (GPTQ handles those).
One batched matmul per grid point; no loop over blocks or columns.
"""

from __future__ import annotations

import numpy as np

from qcompiler.reducers import Gram
from qcompiler.weight_formats import (
    CompressedWeight,
    WeightFormat,
    decode,
    encode,
    from_blocks,
    nvfp4_global_scale,
    rtn_scales,
    snap_scales,
    to_blocks,
)

SHRINK_GRID = tuple(float(m) for m in np.round(np.linspace(0.5, 1.0, 11), 3))


def diagonal_blocks(matrix: np.ndarray, block_size: int) -> np.ndarray:
    """The [n_blocks, B, B] diagonal blocks of a [K, K] matrix (the ragged last one zero-padded)."""
    rows = matrix.shape[0]
    n_blocks = -(-rows // block_size)
    blocks = np.zeros((n_blocks, block_size, block_size), np.float32)
    for index in range(n_blocks):
        start = index * block_size
        stop = min(start + block_size, rows)
        blocks[index, : stop - start, : stop - start] = matrix[start:stop, start:stop]
    return blocks


def weighted_error(error: np.ndarray, gram: np.ndarray) -> float:
    """tr(Eᵀ H E): the mean squared layer-output error caused by a weight error E [K, N]."""
    return float(np.sum((gram @ error) * error))


def estimate_scales(
    weight: np.ndarray,
    gram: Gram,
    fmt: WeightFormat,
    block_size: int,
    *,
    symmetric: bool,
    shrink: tuple[float, ...] = SHRINK_GRID,
) -> CompressedWeight:
    """Codes and scales of W [K, N] minimising the Gram-weighted error per (block, column)."""
    weight = np.asarray(weight, np.float32)
    symmetric = symmetric or not fmt.is_integer
    global_scale = nvfp4_global_scale(weight) if fmt is WeightFormat.NVFP4 else None
    blocks = to_blocks(weight, block_size)
    h_blocks = diagonal_blocks(gram.matrix, block_size)
    base, zero_points = rtn_scales(blocks, fmt, symmetric=symmetric, global_scale=global_scale)
    ones = np.ones_like(base)
    constant = np.sum(np.matmul(h_blocks, blocks) * blocks, axis=1)  # wᵀ H_b w per (block, column)
    best_error = np.full(base.shape, np.inf, np.float64)
    best_scales = base.copy()
    best_codes: np.ndarray | None = None
    for factor in shrink:
        scales = snap_scales(base * factor, fmt, global_scale)
        codes = encode(blocks, scales, zero_points, fmt)
        best_codes = codes if best_codes is None else best_codes
        units = decode(codes, ones, zero_points, fmt)
        h_units = np.matmul(h_blocks, units)
        cross = np.sum(h_units * blocks, axis=1)
        energy = np.sum(h_units * units, axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            fitted = np.where((energy > 0) & (cross > 0), cross / energy, scales)
        fitted = snap_scales(fitted, fmt, global_scale)
        for candidate in (scales, fitted):
            error = constant - 2 * candidate * cross + candidate**2 * energy
            better = error < best_error
            best_error = np.where(better, error, best_error)
            best_scales = np.where(better, candidate, best_scales)
            best_codes = np.where(better[:, None, :], codes, best_codes)
    assert best_codes is not None
    codes = from_blocks(best_codes, weight.shape[0])
    return CompressedWeight(fmt, codes, best_scales.astype(np.float32), zero_points, block_size, global_scale)
