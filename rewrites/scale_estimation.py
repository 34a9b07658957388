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
    code_units,
    encode,
    from_blocks,
    nvfp4_global_scale,
    rtn_scales,
    snap_scales,
    to_blocks,
)

SHRINK_GRID = tuple(float(m) for m in np.round(np.linspace(0.6, 1.0, 9), 3))


def _column_dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per (block, column) dot products over the rows of two blocked arrays [n, B, N] -> [n, N]."""
    return np.einsum("kbn,kbn->kn", a, b)


def _sum_blocks(terms: np.ndarray, ratio: int) -> np.ndarray:
    """Sum consecutive groups of `ratio` statistic blocks into quantization blocks (axis 0)."""
    if ratio == 1:
        return terms
    return np.add.reduceat(terms, np.arange(0, terms.shape[0], ratio), axis=0)


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
    rows = weight.shape[0]
    symmetric = symmetric or not fmt.is_integer
    global_scale = nvfp4_global_scale(weight) if fmt is WeightFormat.NVFP4 else None
    # Statistics blocks: the quantization blocks themselves from a full Gram, else the Gram's
    # own blocks, which must tile each quantization block.
    stat_size = block_size if gram.is_full else gram.block_size
    if block_size < rows and block_size % stat_size:
        raise ValueError(
            f"quantization blocks of {block_size} rows are not tiled by Gram blocks of {stat_size}"
        )
    ratio = block_size // stat_size if block_size < rows else -(-rows // stat_size)
    h_blocks = gram.diagonal_blocks(stat_size)
    blocks = to_blocks(weight, block_size)
    sub = to_blocks(weight, stat_size)
    base, zero_points = rtn_scales(blocks, fmt, symmetric=symmetric, global_scale=global_scale)
    constant = _sum_blocks(_column_dot(np.matmul(h_blocks, sub), sub), ratio)  # wᵀ H_b w
    best_error = np.full(base.shape, np.inf, np.float64)
    best_scales = base.copy()
    best_rounding = base.copy()  # the scale the winning codes were rounded with
    for factor in shrink:
        scales = snap_scales(base * factor, fmt, global_scale)
        units = code_units(blocks, scales, zero_points, fmt)
        if stat_size != block_size:
            units = to_blocks(from_blocks(units, rows), stat_size)
        h_units = np.matmul(h_blocks, units)
        cross = _sum_blocks(_column_dot(h_units, sub), ratio)
        energy = _sum_blocks(_column_dot(h_units, units), ratio)
        with np.errstate(divide="ignore", invalid="ignore"):
            fitted = np.where((energy > 0) & (cross > 0), cross / energy, scales)
        fitted = snap_scales(fitted, fmt, global_scale)
        for candidate in (scales, fitted):
            error = constant - 2 * candidate * cross + candidate**2 * energy
            better = error < best_error
            best_error = np.where(better, error, best_error)
            best_scales = np.where(better, candidate, best_scales)
            best_rounding = np.where(better, scales, best_rounding)
    codes = from_blocks(encode(blocks, best_rounding, zero_points, fmt), rows)
    return CompressedWeight(fmt, codes, best_scales.astype(np.float32), zero_points, block_size, global_scale)
