"""HQQ: data-free scales and zero points by half-quadratic optimization (Badri & Shaji, 2023).

RTN maps each block's min..max onto the integer range, so one outlier coarsens the step for the
whole block. HQQ instead minimises a robust (l_p, p < 1) norm of the rounding error, which lets
a few weights take a large error so the rest are represented finely. Half-quadratic splitting
alternates: the codes for the current parameters, the sparse error E = shrink_p(W - dequant(codes))
(a generalised soft threshold), and the parameters that best fit W - E. The original fits only a
float zero point; our canonical form (DequantizeLinear, OpenVINO u4/u8) stores integer zero
points, so here the fit is the closed-form least squares of W - E ≈ s * (codes - z) for the scale
and the zero point together, the zero point rounded and clipped to the integer range. Asymmetric
only: a scale-only variant for symmetric weights lowered the l_p error but raised SmolLM2's INT4
sym g64 perplexity (34.98 -> 36.36: the robust norm clips the large weights an LLM needs). Per
(block, column) the parameters with the lowest l_p error over the
iterations are kept, RTN's included, so HQQ never does worse than RTN by its own objective.
"""

from __future__ import annotations

import numpy as np

from qcompiler.weight_formats import (
    SMALLEST_SCALE,
    CompressedWeight,
    WeightFormat,
    code_units,
    encode,
    from_blocks,
    integer_range,
    rtn_scales,
    to_blocks,
)

LP_NORM = 0.7
BETA = 10.0
KAPPA = 1.01
ITERATIONS = 20
"""HQQ's published defaults (l_0.7, beta 10 growing by 1 % per iteration, 20 iterations)."""


def _shrink(error: np.ndarray, beta: float, p: float) -> np.ndarray:
    """The l_p proximal step: sign(e) * max(|e| - |e|^(p-1) / beta, 0)."""
    magnitude = np.abs(error)
    return np.sign(error) * np.maximum(magnitude - np.power(magnitude + 1e-8, p - 1.0) / beta, 0.0)


def _lp_error(
    blocks: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None, fmt: WeightFormat, p: float
) -> np.ndarray:
    """Mean |W - dequant(W)|^p per (block, column)."""
    units = code_units(blocks, scales, zeros, fmt)
    return np.mean(np.power(np.abs(blocks - units * scales[:, None, :]), p), axis=1)


def hqq(
    weight: np.ndarray,
    fmt: WeightFormat,
    block_size: int,
    *,
    iterations: int = ITERATIONS,
    p: float = LP_NORM,
    beta: float = BETA,
    kappa: float = KAPPA,
) -> CompressedWeight:
    """Codes, scales and integer zero points of W [K, N] by HQQ (asymmetric integer formats)."""
    if not fmt.is_integer:
        raise ValueError(f"HQQ fits integer codes; {fmt.value} has its own scale grid")
    weight = np.asarray(weight, np.float32)
    blocks = to_blocks(weight, block_size).astype(np.float32)  # [n_blocks, B, N]
    qmin, qmax = integer_range(fmt.bits, False)
    scales, zeros = rtn_scales(blocks, fmt, symmetric=False)
    assert zeros is not None
    best_scales, best_zeros = scales.copy(), zeros.copy()
    best_error = _lp_error(blocks, scales, zeros, fmt, p)
    for _ in range(iterations):
        offset = zeros[:, None, :].astype(np.float32)
        codes = np.clip(np.rint(blocks / scales[:, None, :] + offset), qmin, qmax)
        target = blocks - _shrink(blocks - (codes - offset) * scales[:, None, :], beta, p)
        # target ≈ a * codes + b with a = s, b = -s * z: least squares per (block, column)
        mean_codes, mean_target = codes.mean(axis=1), target.mean(axis=1)
        spread = np.mean((codes - mean_codes[:, None, :]) ** 2, axis=1)
        covariance = np.mean((codes - mean_codes[:, None, :]) * (target - mean_target[:, None, :]), axis=1)
        slope = np.where(spread > 0, covariance / np.maximum(spread, 1e-12), scales)
        scales = np.maximum(np.where(slope > 0, slope, scales), SMALLEST_SCALE).astype(np.float32)
        zeros = np.clip(np.rint(mean_codes - mean_target / scales), qmin, qmax).astype(np.uint8)
        error = _lp_error(blocks, scales, zeros, fmt, p)
        better = error < best_error
        best_error = np.where(better, error, best_error)
        best_scales = np.where(better, scales, best_scales)
        best_zeros = np.where(better, zeros, best_zeros)
        beta *= kappa
    codes = from_blocks(encode(blocks, best_scales, best_zeros, fmt), weight.shape[0])
    return CompressedWeight(fmt, codes, best_scales.astype(np.float32), best_zeros, block_size)
