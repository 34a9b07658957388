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
