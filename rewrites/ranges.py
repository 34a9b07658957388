"""Choosing an activation's clipping range from its calibration statistics.

MinMax keeps every observed value. Percentile clips the rare tails. MSE picks the [lo, hi] that
minimises the expected squared error of quantize-dequantize over the observed histogram, trading
clipping error on the tails against rounding error everywhere else; it is usually best for
heavy-tailed transformer activations.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from qcompiler.numerics import activation_params, dequantize, quantize, type_range
from qcompiler.options import QuantType, RangeMethod
from qcompiler.reducers import Histogram
from qcompiler.rewrites.layer_error import (
    fake_quantize_weight,
    layer_output_error,
    subsample_columns,
)


def percentile_range(histogram: Histogram, percentile: float) -> tuple[float, float]:
    """[lo, hi] keeping `percentile` % of the mass on each side (from the histogram's CDF)."""
    total = histogram.counts.sum()
    if total == 0:
        return (histogram.lo, histogram.hi)
    cdf = np.cumsum(histogram.counts) / total
    edges = histogram.edges
    tail = (100.0 - percentile) / 100.0
    lo_index = int(np.searchsorted(cdf, tail, side="left"))
    hi_index = int(np.searchsorted(cdf, 1.0 - tail, side="left"))
    return (float(edges[lo_index]), float(edges[min(hi_index + 1, len(edges) - 1)]))


def expected_error(
    histogram: Histogram, lo: np.ndarray, hi: np.ndarray, qtype: QuantType, symmetric: bool
) -> np.ndarray:
    """Sum over bins of count * (center - fake_quant(center))^2 for each candidate range."""
    centers = histogram.centers
    errors = np.empty(len(lo))
    qmin, qmax = type_range(qtype, symmetric=symmetric)
    for index, (candidate_lo, candidate_hi) in enumerate(zip(lo, hi, strict=True)):
        scale, zero_point = activation_params(candidate_lo, candidate_hi, qtype, symmetric=symmetric)
        if qtype.is_float:  # FP8's grid is not uniform: round through the codes
            rounded = dequantize(quantize(centers, scale, zero_point, qtype), scale, zero_point)
        else:
            rounded = (np.clip(np.rint(centers / scale) + zero_point, qmin, qmax) - zero_point) * scale
        errors[index] = np.dot(histogram.counts, (centers - rounded) ** 2)
    return errors


def mse_range(
    histogram: Histogram, qtype: QuantType, symmetric: bool, steps: int = 32
) -> tuple[float, float]:
    """The [lo, hi] on a grid of shrunken ranges with the least expected quantization error."""
    lo, hi = min(histogram.lo, 0.0), max(histogram.hi, 0.0)
    factors = np.geomspace(0.02, 1.0, steps)
    if symmetric:
        candidates_lo, candidates_hi = lo * factors, hi * factors
    else:
        grid_lo, grid_hi = np.meshgrid(lo * factors, hi * factors, indexing="ij")
        candidates_lo, candidates_hi = grid_lo.ravel(), grid_hi.ravel()
    errors = expected_error(histogram, candidates_lo, candidates_hi, qtype, symmetric)
    best = int(np.argmin(errors))
    return (float(candidates_lo[best]), float(candidates_hi[best]))


SEARCH_PERCENTILES = (99.99, 99.9)


def candidate_ranges(
    minmax: tuple[float, float], histogram: Histogram, qtype: QuantType, *, symmetric: bool
) -> dict[str, tuple[float, float]]:
    """The ranges `RangeMethod.SEARCH` chooses among: MinMax, two percentiles, MSE."""
    candidates = {"minmax": minmax}
    for percentile in SEARCH_PERCENTILES:
        candidates[f"p{percentile:g}"] = percentile_range(histogram, percentile)
    candidates["mse"] = mse_range(histogram, qtype, symmetric)
    return candidates


def search_range(
    candidates: dict[str, tuple[float, float]],
    histogram: Histogram,
    rows: np.ndarray | None,
    weights: Sequence[np.ndarray],
    qtype: QuantType,
    *,
    symmetric: bool,
) -> tuple[str, tuple[float, float], dict[str, float]]:
    """The candidate with the least error.

    The error is the quantized layers' output error on `rows` when the tensor feeds weighted
    layers, else the tensor's own expected error over its histogram.
    """
    errors: dict[str, float] = {}
    if rows is not None and len(rows) and weights:
        weights = subsample_columns(weights)
        quantized = [fake_quantize_weight(w, qtype) for w in weights]
        for name, (lo, hi) in candidates.items():
            errors[name] = layer_output_error(
                rows, weights, lo, hi, qtype, symmetric=symmetric, quantized_weights=quantized
            )
    else:
        names = list(candidates)
        lows = np.array([candidates[n][0] for n in names])
        highs = np.array([candidates[n][1] for n in names])
        errors = dict(
            zip(names, map(float, expected_error(histogram, lows, highs, qtype, symmetric)), strict=True)
        )
    best = min(errors, key=errors.__getitem__)
    return best, candidates[best], errors


HISTOGRAM_METHODS = frozenset({RangeMethod.PERCENTILE, RangeMethod.MSE, RangeMethod.SEARCH})
"""Range methods that read a histogram of the tensor."""


def choose_range(
    method: RangeMethod,
    minmax: tuple[float, float],
    histogram: Histogram | None,
    qtype: QuantType,
    *,
    symmetric: bool,
    percentile: float,
    mean_minmax: tuple[float, float] | None = None,
) -> tuple[float, float]:
    """The clipping range `method` picks.

    Histogram-based methods need `histogram`; MEAN_MINMAX needs `mean_minmax`, the mean of
    per-sample extremes (`StatKind.MEAN_MINMAX`).
    """
    if method is RangeMethod.MEAN_MINMAX:
        if mean_minmax is None:
            raise ValueError("RangeMethod.MEAN_MINMAX needs the MEAN_MINMAX statistic")
        return mean_minmax
    if method is RangeMethod.MINMAX or histogram is None:
        return minmax
    if method is RangeMethod.SEARCH:
        raise ValueError("RangeMethod.SEARCH needs samples and weights: use search_range")
    if method is RangeMethod.PERCENTILE:
        return percentile_range(histogram, percentile)
    return mse_range(histogram, qtype, symmetric)
