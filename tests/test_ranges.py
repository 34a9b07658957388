import numpy as np
import pytest

from qcompiler.options import QuantType, RangeMethod
from qcompiler.reducers import HistogramReducer
from qcompiler.rewrites import ranges


def _histogram(samples, bins=2048):
    reducer = HistogramReducer(bins)
    reducer.update(samples)
    return reducer.result()


def test_percentile_range_matches_numpy():
    """Percentile clipping from the histogram lands within one bin of numpy's percentile."""
    samples = np.random.default_rng(0).standard_normal(200_000)
    histogram = _histogram(samples)
    lo, hi = ranges.percentile_range(histogram, 99.9)
    width = (histogram.hi - histogram.lo) / 2048
    assert abs(hi - np.percentile(samples, 99.9)) < 2 * width
    assert abs(lo - np.percentile(samples, 0.1)) < 2 * width


def test_mse_range_clips_outliers_but_not_uniform_data():
    """Uniform data keeps (almost) its full range; a lone outlier among 1M samples is clipped.

    Closed form: clipping the outlier at 30 down to ~5 costs ~625, while keeping it costs
    1e6 * (35/255)^2 / 12 ~ 1570 in rounding error, so MSE must clip.
    """
    uniform = np.random.default_rng(1).uniform(-1, 1, 100_000)
    lo, hi = ranges.mse_range(_histogram(uniform), QuantType.UINT8, symmetric=False)
    assert hi > 0.85 and lo < -0.85
    spiky = np.concatenate([np.random.default_rng(2).standard_normal(1_000_000), [30.0]])
    lo, hi = ranges.mse_range(_histogram(spiky), QuantType.UINT8, symmetric=False)
    assert hi < 15


def test_choose_range_minmax_ignores_histogram():
    """MinMax returns the observed range unchanged."""
    assert ranges.choose_range(
        RangeMethod.MINMAX, (-2.0, 3.0), None, QuantType.UINT8, symmetric=False, percentile=99.9
    ) == (-2.0, 3.0)


def test_expected_error_is_zero_on_grid_points():
    """Values exactly on the quantization grid have no error."""
    from qcompiler.reducers import Histogram

    histogram = Histogram(np.array([1.0, 0.0, 1.0]), -0.5, 2.5)  # centres 0, 1, 2
    error = ranges.expected_error(histogram, np.array([0.0]), np.array([255.0]), QuantType.UINT8, False)
    assert error[0] == pytest.approx(0.0)


def test_search_range_uses_layer_error_when_weights_exist():
    """With weights, the pick minimises the layer-output proxy; every candidate gets an error."""
    from qcompiler.rewrites.layer_error import layer_output_error

    rng = np.random.default_rng(4)
    rows = rng.standard_normal((512, 16)).astype(np.float32)
    weight = rng.standard_normal((16, 8)).astype(np.float32)
    histogram = _histogram(rows.ravel())
    candidates = ranges.candidate_ranges(
        (float(rows.min()), float(rows.max())), histogram, QuantType.UINT8, symmetric=False
    )
    assert set(candidates) == {"minmax", "p99.99", "p99.9", "mse"}
    name, chosen, errors = ranges.search_range(
        candidates, histogram, rows, [weight], QuantType.UINT8, symmetric=False
    )
    assert set(errors) == set(candidates) and chosen == candidates[name]
    assert errors[name] == min(errors.values())
    assert errors[name] == pytest.approx(
        layer_output_error(rows, [weight], *chosen, QuantType.UINT8, symmetric=False)
    )


def test_search_range_without_weights_falls_back_to_histogram_error():
    """No weighted consumer: the tensor's own expected error decides."""
    samples = np.random.default_rng(5).standard_normal(50_000)
    histogram = _histogram(samples)
    candidates = {"minmax": (histogram.lo, histogram.hi), "tiny": (-0.01, 0.01)}
    name, _, errors = ranges.search_range(candidates, histogram, None, [], QuantType.UINT8, symmetric=False)
    assert name == "minmax" and errors["tiny"] > errors["minmax"]
