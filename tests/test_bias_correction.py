"""Bias correction (rewrites/bias_correction.py) and the mean-minmax range estimator."""

import numpy as np
import onnx_ir as ir
import pytest

import qcompiler
from qcompiler.options import ActivationOptions, CompileOptions, RangeMethod
from qcompiler.reducers import MeanMinMaxReducer, MeanPerChannelReducer
from tests.graphs import add, const, float_input, model_of, run
from tests.test_activation_placement import inverted_residual


def pointwise(seed: int = 0) -> ir.Model:
    """One 1x1 Conv with coarse per-channel weights (16 input channels) on non-negative inputs."""
    rng = np.random.default_rng(seed)
    x = float_input("image", ["batch", 16, 6, 6])
    graph = ir.Graph([x], [], nodes=[], name="pointwise")
    weight = rng.standard_normal((8, 16, 1, 1)).astype(np.float32)
    weight[:, :, 0, 0] *= np.logspace(-2, 0, 16, dtype=np.float32)  # most taps a few int8 steps wide
    bias = const(graph, "b", rng.standard_normal(8).astype(np.float32))
    conv = add(graph, "Conv", [x, const(graph, "w", weight), bias], "conv")
    graph.outputs.append(conv)
    return model_of(graph)


def _positive_feeds(count: int, seed: int, shape=(1, 16, 6, 6)) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"image": rng.uniform(0, 4, shape).astype(np.float32)} for _ in range(count)]


def _channel_mean_error(reference: ir.Model, model: ir.Model, feeds) -> np.ndarray:
    errors = [run(model, feed)[0] - run(reference, feed)[0] for feed in feeds]
    return np.mean([error.mean(axis=(0, 2, 3)) for error in errors], axis=0)


def _compile(model, feeds, target="ort-cpu", **activations):
    options = CompileOptions(count_fusion=False, activations=ActivationOptions(**activations))
    return qcompiler.compile(model.clone(), target, options, data=feeds, progress=False)


@pytest.mark.parametrize("target", ["ort-cpu", "openvino-cpu"])
def test_one_layer_mean_error_is_zero_on_its_calibration_data(target):
    """A single linear layer: the corrected bias cancels its output's mean error per channel on the data
    it was measured on, up to the int32 bias step (ORT) or float rounding (OpenVINO's float bias)."""
    reference, feeds = pointwise(), _positive_feeds(8, seed=1)
    before = _channel_mean_error(
        reference, _compile(reference, feeds, target, bias_correction=False).model, feeds
    )
    result = _compile(reference, feeds, target)
    after = _channel_mean_error(reference, result.model, feeds)
    assert np.abs(before).max() > 1e-3  # weight rounding on non-negative inputs: a real shift
    # ORT's int32 bias steps are input scale x weight scale (about 3e-4 here): half a step remains
    assert np.abs(after).max() < (1e-5 if target == "openvino-cpu" else 2e-4)
    assert result.report.bias_correction["conv"]["max_abs_shift"] == pytest.approx(
        np.abs(before).max(), rel=1e-3
    )


def test_inverted_residual_mean_error_moves_towards_zero():
    """Depthwise -> pointwise with ReLU6 folded into the quantizers: on held-out data the quantized
    output's per-channel mean error shrinks, and so does its mean absolute error."""
    reference = inverted_residual()
    rng = np.random.default_rng(5)
    calibration = [{"image": rng.standard_normal((1, 8, 12, 12)).astype(np.float32)} for _ in range(16)]
    held_out = [{"image": rng.standard_normal((1, 8, 12, 12)).astype(np.float32)} for _ in range(8)]
    plain = _compile(reference, calibration, bias_correction=False).model
    corrected = _compile(reference, calibration)
    assert set(corrected.report.bias_correction) == {"expand", "depthwise", "project", "head"}
    before = np.abs(_channel_mean_error(reference, plain, held_out)).mean()
    after = np.abs(_channel_mean_error(reference, corrected.model, held_out)).mean()
    assert after < 0.5 * before
    abs_before = np.mean([np.abs(run(plain, f)[0] - run(reference, f)[0]).mean() for f in held_out])
    abs_after = np.mean([np.abs(run(corrected.model, f)[0] - run(reference, f)[0]).mean() for f in held_out])
    assert abs_after < abs_before


def test_float_outputs_of_models_without_convs_are_untouched():
    """Only Convs are corrected: an MLP compiles to the same graph with the option on or off."""
    from tests.graphs import mlp_with_attention_matmul, random_feeds

    model = mlp_with_attention_matmul()
    feeds = random_feeds(model, batches=2)
    on, off = (_compile(model, feeds, bias_correction=flag) for flag in (True, False))
    assert on.report.bias_correction == {}
    np.testing.assert_array_equal(run(on.model, feeds[0])[0], run(off.model, feeds[0])[0])


def test_mean_minmax_reducer_averages_per_sample_extremes_whatever_the_batching():
    """Samples [1, 5], [-1, 3], [0, 10]: mean min 0, mean max 6, in one batch or three."""
    samples = np.array([[1.0, 5.0], [-1.0, 3.0], [0.0, 10.0]], np.float32)
    together, apart = MeanMinMaxReducer(), MeanMinMaxReducer()
    together.update(samples)
    for row in samples:
        apart.update(row[None])
    assert together.result() == pytest.approx((0.0, 6.0)) == apart.result()


def test_mean_per_channel_reducer_clips_to_its_bounds():
    """Channel means along axis 1, of values clipped to [0, 6] when bounds are given."""
    array = np.array([[[-2.0, 2.0], [8.0, 4.0]]], np.float32)  # [1, 2 channels, 2]
    plain, clamped = MeanPerChannelReducer(1), MeanPerChannelReducer(1, (0.0, 6.0))
    plain.update(array)
    clamped.update(array)
    np.testing.assert_allclose(plain.result(), [0.0, 6.0])
    np.testing.assert_allclose(clamped.result(), [1.0, 5.0])


def test_mean_minmax_range_is_narrower_than_minmax_with_an_outlier_sample():
    """One calibration image 10x brighter sets MinMax's range; mean-minmax follows the typical image."""
    reference = pointwise()
    feeds = _positive_feeds(8, seed=2)
    feeds[3] = {"image": feeds[3]["image"] * 10}
    ranges = {}
    for method in (RangeMethod.MINMAX, RangeMethod.MEAN_MINMAX):
        result = _compile(reference, feeds, range_method=method, bias_correction=False)
        ranges[method] = result.report.activation_quantizers["image"]["hi"]
    assert ranges[RangeMethod.MINMAX] == pytest.approx(40.0, rel=0.01)
    assert ranges[RangeMethod.MEAN_MINMAX] == pytest.approx((7 * 4 + 40) / 8, rel=0.05)
