import numpy as np
import pytest

from qcompiler import calibration, reducers
from qcompiler.calibration import StatKind, StatRequest
from qcompiler.errors import DataError
from qcompiler.rewrites.normalize import NormalizePass
from tests.graphs import ORT_RUNNERS, mlp_with_attention_matmul, random_feeds


def test_minmax_reducer_matches_numpy_over_batches():
    """Streaming min/max over batches equals min/max of the concatenation."""
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((4, 7)) * (i + 1) for i in range(5)]
    reducer = reducers.MinMaxReducer()
    for batch in batches:
        reducer.update(batch)
    everything = np.concatenate(batches)
    assert reducer.result() == (everything.min(), everything.max())


def test_absmax_per_channel_reducer_matches_numpy():
    """Per-channel |x| max along the last axis, reduced over all others."""
    rng = np.random.default_rng(1)
    batches = [rng.standard_normal((2, 3, 5)) for _ in range(4)]
    reducer = reducers.AbsMaxPerChannelReducer(axis=-1)
    for batch in batches:
        reducer.update(batch)
    np.testing.assert_allclose(reducer.result(), np.abs(np.concatenate(batches)).max(axis=(0, 1)))


def test_histogram_reducer_widens_and_keeps_mass():
    """Growing ranges keep every sample's count, exact extremes, and percentiles within a bin or two."""
    rng = np.random.default_rng(2)
    batches = [rng.standard_normal(5000) * scale for scale in (0.5, 1.0, 3.0, 2.0)]
    reducer = reducers.HistogramReducer(bins=512)
    for batch in batches:
        reducer.update(batch)
    histogram = reducer.result()
    everything = np.concatenate(batches)
    assert histogram.counts.sum() == pytest.approx(everything.size)
    assert (histogram.lo, histogram.hi) == (everything.min(), everything.max())
    width = (histogram.hi - histogram.lo) / 512
    cdf = np.cumsum(histogram.counts) / histogram.counts.sum()
    median = histogram.edges[1:][np.searchsorted(cdf, 0.5)]
    assert abs(median - np.median(everything)) < 2 * width


def test_reducer_state_does_not_grow_with_samples():
    """Memory is bounded by the statistic: the histogram's size is fixed whatever the data."""
    reducer = reducers.HistogramReducer(bins=64)
    for _ in range(50):
        reducer.update(np.random.default_rng(0).standard_normal(10_000))
    assert reducer.counts.shape == (64,)


def test_collect_merges_requests_and_matches_numpy():
    """One run: duplicate requests merge; intermediate min/max equal numpy on the float graph."""
    model = mlp_with_attention_matmul()
    NormalizePass()(model)
    relu = next(node for node in model.graph if node.op_type == "Relu").outputs[0]
    weight = model.graph.initializers["w1"]
    requests = [
        StatRequest(relu, StatKind.MINMAX),
        StatRequest(relu, StatKind.MINMAX),
        StatRequest(relu, StatKind.ABSMAX_PER_CHANNEL, axis=-1),
        StatRequest(weight, StatKind.MINMAX),
    ]
    feeds = random_feeds(model, batches=3)
    stats = calibration.collect(model, requests, feeds, ORT_RUNNERS, progress=False)
    assert len(stats) == 3 and stats.batches == 3
    w1 = weight.const_value.numpy()
    expected = np.concatenate([np.maximum(feed["x"] @ w1, 0) for feed in feeds])
    lo, hi = stats.minmax(relu)
    assert lo == pytest.approx(expected.min(), abs=1e-5) and hi == pytest.approx(expected.max(), rel=1e-5)
    np.testing.assert_allclose(stats[requests[2]], np.abs(expected).max(axis=(0, 1)), rtol=1e-5)
    assert stats.minmax(weight) == (w1.min(), w1.max())


def test_collect_rejects_wrong_data_before_running():
    """A batch with a wrong input name fails with a DataError naming it."""
    model = mlp_with_attention_matmul()
    relu = next(node for node in model.graph if node.op_type == "Relu").outputs[0]
    with pytest.raises(DataError, match="unknown input name.*'y'"):
        calibration.collect(
            model,
            [StatRequest(relu, StatKind.MINMAX)],
            [{"y": np.zeros((1, 6, 8), np.float32)}],
            ORT_RUNNERS,
            progress=False,
        )


def test_minmax_per_channel_reducer_matches_numpy():
    """Per-channel (min, max) along the last axis."""
    rng = np.random.default_rng(3)
    batches = [rng.standard_normal((2, 5, 4)) for _ in range(3)]
    reducer = reducers.MinMaxPerChannelReducer(axis=-1)
    for batch in batches:
        reducer.update(batch)
    everything = np.concatenate(batches).reshape(-1, 4)
    lo, hi = reducer.result()
    np.testing.assert_array_equal(lo, everything.min(axis=0))
    np.testing.assert_array_equal(hi, everything.max(axis=0))


def test_row_sample_is_bounded_uniform_and_made_of_real_rows():
    """At most `size` rows, each one a real row, drawn from every batch (not just the first)."""
    reducer = reducers.RowSampleReducer(axis=-1, size=200)
    batches = [np.full((100, 3), float(index)) + np.arange(3) for index in range(20)]
    for batch in batches:
        reducer.update(batch)
    sample = reducer.result()
    assert sample.shape == (200, 3)
    np.testing.assert_array_equal(sample[:, 1] - sample[:, 0], 1.0)  # rows kept intact
    counts = np.bincount(sample[:, 0].astype(int), minlength=20)
    assert counts.min() >= 2 and counts.max() <= 25  # ~10 per batch expected
