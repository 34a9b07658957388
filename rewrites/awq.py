"""AWQ: activation-aware per-channel weight scaling before low-bit rounding.

For the linear layers reading one activation X (Q/K/V after a norm; gate and up), scaling input
channel c of every weight by s_c and X's channel by 1/s_c is exact in float (SmoothQuant's
identity) but changes what rounding loses: channels with large activations get finer effective
steps. Following AWQ, s = importance^alpha (importance = RMS of X per channel, normalised so
the scales' geometric range is centred on 1) and alpha is searched on a grid by the Gram-weighted
output error tr(Eᵀ H E) of the rounded, unscaled weights. alpha = 0 (no scaling) is always a
candidate, so AWQ never makes a group worse by this measure. `rewrites/smoothing.py` folds the
chosen 1/s into X's producer; groups whose producer cannot absorb it are left alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from qcompiler.reducers import Gram
from qcompiler.weight_formats import WeightFormat, fake_quantize_matrix

ALPHA_GRID = tuple(round(i / 10, 1) for i in range(10))
MAX_SEARCH_COLUMNS = 256


@dataclasses.dataclass(frozen=True)
class AwqChoice:
    """A group's search outcome; `scales` None means alpha 0 (leave it alone) won."""

    alpha: float
    scales: np.ndarray | None
    errors: dict[str, float]


def awq_scales(
    weights: Sequence[np.ndarray],
    gram: Gram,
    fmt: WeightFormat,
    block_size: int,
    *,
    symmetric: bool,
    alphas: Sequence[float] = ALPHA_GRID,
    seed: int = 0,
) -> AwqChoice:
    """Search alpha for the weights [K, N_j] that share one input with Gram matrix `gram`."""
    stacked = np.concatenate([np.asarray(w, np.float32) for w in weights], axis=1)
    if stacked.shape[1] > MAX_SEARCH_COLUMNS:  # columns are independent: a sample ranks alphas
        picked = np.random.default_rng(seed).choice(stacked.shape[1], MAX_SEARCH_COLUMNS, replace=False)
        stacked = stacked[:, np.sort(picked)]
    importance = np.maximum(gram.channel_rms.astype(np.float64), 1e-8)
    errors: dict[str, float] = {}
    best: tuple[float, float, np.ndarray | None] = (np.inf, 0.0, None)
    for alpha in alphas:
        scales = importance**alpha
        scales = (scales / np.sqrt(scales.max() * scales.min())).astype(np.float32)
        scaled = stacked * scales[:, None]
        rounded = fake_quantize_matrix(scaled, fmt, block_size, symmetric=symmetric) / scales[:, None]
        error = gram.weighted_error(rounded - stacked)
        errors[f"{alpha:g}"] = error
        if error < best[0]:
            best = (error, alpha, scales if alpha > 0 else None)
    return AwqChoice(best[1], best[2], errors)
