"""GPTQ: round a weight row by row, feeding each row's error into the rows not yet rounded.

The error is spread by the inverse Hessian of the layer's output error (H = XᵀX / rows).

W is [K, N] (input channels first): the loop runs over the K input channels, each step a vector
operation over all N output columns at once (and over every layer sharing the input, when their
columns are concatenated); updates are applied lazily per block of 128 rows as in the paper.
Activation order (largest H diagonal first) with static groups: each block of `block_size` rows
keeps the scales computed up front (RTN or scale estimation) from the unmodified weight, so the
stored scales and the codes agree whatever the processing order.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import scipy.linalg

from qcompiler.reducers import Gram
from qcompiler.weight_formats import CompressedWeight, decode, encode

LAZY_BLOCK = 128


def _inverse_hessian_factor(gram: np.ndarray, damping: float) -> np.ndarray:
    """Upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU) after relative diagonal damping."""
    hessian = gram.astype(np.float64)
    hessian[np.diag_indices_from(hessian)] += damping * float(np.mean(np.diag(hessian)))
    inverse = scipy.linalg.cho_solve(scipy.linalg.cho_factor(hessian), np.eye(len(hessian)))
    return np.linalg.cholesky(inverse).T.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class PreparedHessian:
    """What GPTQ derives from a Gram matrix alone (shared by the layers reading one input)."""

    order: np.ndarray
    """Processing order of the rows (activation order: largest H diagonal first)."""
    factor: np.ndarray
    """Upper Cholesky factor of the damped, permuted H⁻¹."""
    dead: np.ndarray
    """Rows whose input channel never fired (their weights are zeroed)."""


def prepare_hessian(gram: Gram, *, damping: float = 0.01, act_order: bool = True) -> PreparedHessian:
    """Dead channels, activation order and the inverse Hessian factor of one input."""
    hessian = gram.matrix.astype(np.float64).copy()
    dead = np.diag(hessian) <= 0
    hessian[dead, dead] = 1.0
    rows = len(hessian)
    order = np.argsort(-np.diag(hessian), kind="stable") if act_order else np.arange(rows)
    return PreparedHessian(order, _inverse_hessian_factor(hessian[np.ix_(order, order)], damping), dead)


def gptq(
    weight: np.ndarray,
    gram: Gram,
    initial: CompressedWeight,
    *,
    damping: float = 0.01,
    act_order: bool = True,
    prepared: PreparedHessian | None = None,
) -> CompressedWeight:
    """GPTQ codes for W [K, N] with the block scales (and zero points) of `initial`.

    `prepared` reuses `prepare_hessian(gram, ...)` across layers that share the input.
    """
    rows, columns = weight.shape
    block_size = initial.block_size
    prepared = prepared or prepare_hessian(gram, damping=damping, act_order=act_order)
    order, factor = prepared.order, prepared.factor
    work = np.array(weight, np.float32)
    work[prepared.dead] = 0.0
    work = work[order]
    row_block = order // block_size  # static groups: each row keeps its own block's scale
    scales = initial.scales[row_block]  # [K, N]
    zeros = None if initial.zero_points is None else initial.zero_points[row_block]
    codes = np.empty_like(initial.codes)
    for start in range(0, rows, LAZY_BLOCK):
        stop = min(start + LAZY_BLOCK, rows)
        errors = np.zeros((stop - start, columns), np.float32)
        local = factor[start:stop, start:stop]
        for offset in range(stop - start):
            row = start + offset
            zero = None if zeros is None else zeros[row][None, :]
            code = encode(work[row][None, None, :], scales[row][None, :], zero, initial.format)
            rounded = decode(code, scales[row][None, :], zero, initial.format)[0, 0]
            codes[row] = code[0, 0]
            error = (work[row] - rounded) / local[offset, offset]
            work[row + 1 : stop] -= np.outer(local[offset, offset + 1 :], error)
            errors[offset] = error
        work[stop:] -= factor[start:stop, stop:].T @ errors
    restored = np.empty_like(codes)
    restored[order] = codes
    return CompressedWeight(
        initial.format, restored, initial.scales, initial.zero_points, block_size, initial.global_scale
    )
