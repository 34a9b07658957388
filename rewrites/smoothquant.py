"""SmoothQuant's math: per-channel smoothing scales and the per-group alpha search (numpy only).

For an activation X [*, C] read by linear layers Y_j = X W_j with W_j [C, N_j],

    X W_j = (X diag(1/s)) (diag(s) W_j)    for any s > 0,

so dividing X's channel c by s_c and multiplying row c of every W_j by s_c is exact in float.
With s_c = max|X_c|^alpha / max_j max|W_j[c, :]|^(1 - alpha) the activation's outlier channels
shrink (per-tensor activation quantization gets finer) while weight rows grow (absorbed by the
per-output-channel weight scales). alpha is chosen per group on calibration rows by the quantized
layers' output error (`layer_output_error`); a group where no alpha beats leaving it alone is left
alone. `rewrites/smoothing.py` applies the chosen scales to the graph.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from qcompiler.options import QuantType
from qcompiler.rewrites.layer_error import (
    fake_quantize_weight,
    layer_output_error,
    subsample_columns,
)

SCALE_LIMITS = (1e-5, 1e5)


def smoothing_scales(activation_absmax: np.ndarray, weight_absmax: np.ndarray, alpha: float) -> np.ndarray:
    """Per-channel scales s = max|X|^alpha / max|W|^(1 - alpha); channels with no signal keep 1."""
    act = np.asarray(activation_absmax, dtype=np.float64)
    wgt = np.asarray(weight_absmax, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        scales = act**alpha / wgt ** (1.0 - alpha)
    valid = np.isfinite(scales) & (scales > 0) & (act > 0) & (wgt > 0)
    scales = np.where(valid, np.clip(scales, *SCALE_LIMITS), 1.0)
    return scales.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class AlphaChoice:
    """The outcome of one group's search: `alpha` None means "leave the group unsmoothed"."""

    alpha: float | None
    scales: np.ndarray | None
    errors: dict[str, float]
    """Proxy error per candidate ("none" = no smoothing, else the alpha as text)."""


def choose_alpha(
    rows: np.ndarray,
    channel_lo: np.ndarray,
    channel_hi: np.ndarray,
    weights: Sequence[np.ndarray],
    alphas: Sequence[float],
    qtype: QuantType,
    *,
    symmetric: bool,
) -> AlphaChoice:
    """Pick the alpha (or none) with the least quantized-layer output error on `rows`.

    Args:
        rows: sampled activation rows [n, C].
        channel_lo: per-channel minimum of the activation over all calibration data.
        channel_hi: per-channel maximum.
        weights: each consumer's weight as [C, N].
        alphas: candidates; a single value forces that alpha.
        qtype: activation element type.
        symmetric: activation quantizer symmetry.
    """
    weights = subsample_columns(weights)
    errors = {
        "none": layer_output_error(
            rows, weights, float(channel_lo.min()), float(channel_hi.max()), qtype, symmetric=symmetric
        )
    }
    activation_absmax = np.maximum(np.abs(channel_lo), np.abs(channel_hi))
    weight_absmax = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
    best: tuple[float, float | None, np.ndarray | None] = (errors["none"], None, None)
    for alpha in alphas:
        scales = smoothing_scales(activation_absmax, weight_absmax, alpha)
        smoothed = [w * scales[:, None] for w in weights]
        error = layer_output_error(
            rows / scales,
            smoothed,
            float((channel_lo / scales).min()),
            float((channel_hi / scales).max()),
            qtype,
            symmetric=symmetric,
            quantized_weights=[fake_quantize_weight(w, qtype) for w in smoothed],
        )
        errors[f"{alpha:g}"] = error
        if error < best[0] or len(alphas) == 1:
            best = (error, alpha, scales)
    return AlphaChoice(best[1], best[2], errors)
