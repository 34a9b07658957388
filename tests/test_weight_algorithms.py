"""AWQ, scale estimation, GPTQ and the Gram reducer against closed forms and RTN."""

import numpy as np
import pytest

import qcompiler
from qcompiler.drivers.runtimes import calibration_runners
from qcompiler.options import WeightFormat
from qcompiler.reducers import Gram, GramReducer
from qcompiler.rewrites.awq import awq_scales
from qcompiler.rewrites.gptq import gptq
from qcompiler.rewrites.scale_estimation import estimate_scales
from qcompiler.weight_formats import quantize


def _problem(rows=128, columns=48, seed=0):
    """Correlated activations with a few outlier channels, and a weight."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2048, rows)).astype(np.float32) * (1 + 6 * (rng.random(rows) < 0.05))
    x = x @ (np.eye(rows) + 0.2 * rng.standard_normal((rows, rows))).astype(np.float32)
    weight = (rng.standard_normal((rows, columns)) * 0.05).astype(np.float32)
    return x, Gram.full((x.T @ x / len(x)).astype(np.float32), len(x)), weight


def test_gram_reducer_matches_numpy_across_uneven_batches():
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((1, n, 8)).astype(np.float32) for n in (3, 300, 17)]
    reducer = GramReducer(min_flush_rows=16)
    for batch in batches:
        reducer.update(batch)
    rows = np.concatenate([b.reshape(-1, 8) for b in batches])
    result = reducer.result()
    assert result.rows == 320
    assert result.is_full
    np.testing.assert_allclose(result.matrix, rows.T @ rows / 320, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.channel_rms, np.sqrt((rows**2).mean(axis=0)), rtol=1e-5)


def test_weighted_error_is_the_layer_output_error():
    x, gram, weight = _problem()
    error = quantize(weight, WeightFormat.INT4, 32).dequantize() - weight
    direct = float(np.sum((x @ error) ** 2) / len(x))
    assert gram.weighted_error(error) == pytest.approx(direct, rel=1e-3)


def test_diagonal_blocks_pad_the_ragged_block():
    matrix = np.arange(25, dtype=np.float32).reshape(5, 5)
    blocks = Gram.full(matrix, 1).diagonal_blocks(2)
    assert blocks.shape == (3, 2, 2)
    np.testing.assert_array_equal(blocks[2], [[24, 0], [0, 0]])


def test_blocked_gram_reducer_keeps_the_diagonal_blocks():
    """Blocks of 16 over 40 channels: the full matrix's diagonal blocks (last one padded)."""
    rows = np.random.default_rng(4).standard_normal((300, 40)).astype(np.float32)
    reducer = GramReducer(block_size=16)
    reducer.update(rows[:100])
    reducer.update(rows[100:])
    blocked = reducer.result()
    full = Gram.full(rows.T @ rows / 300, 300)
    assert not blocked.is_full and blocked.block_size == 16 and blocked.channels == 40
    np.testing.assert_allclose(blocked.blocks, full.diagonal_blocks(16), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(blocked.channel_rms, full.channel_rms, rtol=1e-5)
    error = np.random.default_rng(5).standard_normal((40, 3)).astype(np.float32)
    expected = sum(
        float(np.sum(error[i : i + 16].T @ full.matrix[i : i + 16, i : i + 16] * error[i : i + 16].T))
        for i in range(0, 40, 16)
    )
    assert blocked.weighted_error(error) == pytest.approx(expected, rel=1e-4)
    with pytest.raises(ValueError, match="request a full one"):
        _ = blocked.matrix


@pytest.mark.parametrize(
    "fmt, symmetric",
    [
        (WeightFormat.INT4, True),
        (WeightFormat.INT4, False),
        (WeightFormat.NF4, True),
        (WeightFormat.NVFP4, True),
    ],
)
def test_scale_estimation_beats_rtn_per_block(fmt, symmetric):
    """Every (block, column) is at least as good as RTN (the search includes it), and in total
    clearly better on activations with outlier channels."""
    _, gram, weight = _problem()
    block = 16 if fmt is WeightFormat.NVFP4 else 32
    rtn = quantize(weight, fmt, block, symmetric=symmetric)
    estimated = estimate_scales(weight, gram, fmt, block, symmetric=symmetric)
    rtn_error = gram.weighted_error(rtn.dequantize() - weight)
    assert gram.weighted_error(estimated.dequantize() - weight) < 0.9 * rtn_error


@pytest.mark.parametrize("block", [64, 128])  # 128 = per-channel for 128 rows
def test_scale_estimation_on_gram_blocks_tiling_the_quantization_blocks(block):
    """Statistics in blocks of 32 serve quantization blocks of 64 and per-channel scales."""
    x, gram, weight = _problem()
    reducer = GramReducer(block_size=32)
    reducer.update(x)
    rtn = quantize(weight, WeightFormat.INT4, block, symmetric=True)
    estimated = estimate_scales(weight, reducer.result(), WeightFormat.INT4, block, symmetric=True)
    assert estimated.scales.shape == rtn.scales.shape
    assert gram.weighted_error(estimated.dequantize() - weight) < 0.95 * gram.weighted_error(
        rtn.dequantize() - weight
    )


def test_scale_estimation_closed_form_scale_for_fixed_codes():
    """With H = I and one block, the refitted scale is the least-squares s = <u, w> / <u, u>."""
    weight = np.array([[1.0], [0.52], [-0.26], [0.1]], np.float32)
    estimated = estimate_scales(
        weight, Gram.full(np.eye(4, dtype=np.float32), 1), WeightFormat.INT4, 4, symmetric=True
    )
    units = estimated.codes[:, 0].astype(np.float64)
    expected = units @ weight[:, 0] / (units @ units)
    assert estimated.scales[0, 0] == pytest.approx(expected, rel=1e-6)


def test_gptq_with_uncorrelated_inputs_is_rtn():
    """A diagonal Hessian carries no error to other rows: GPTQ's codes are RTN's."""
    rng = np.random.default_rng(3)
    weight = rng.standard_normal((64, 16)).astype(np.float32)
    gram = Gram.full(np.diag(rng.random(64).astype(np.float32) + 0.5), 100)
    rtn = quantize(weight, WeightFormat.INT4, 32, symmetric=False)
    np.testing.assert_array_equal(gptq(weight, gram, rtn).codes, rtn.codes)


@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_reduces_output_error(act_order):
    _, gram, weight = _problem()
    rtn = quantize(weight, WeightFormat.INT4, 32, symmetric=True)
    result = gptq(weight, gram, rtn, act_order=act_order)
    assert result.scales is rtn.scales
    rtn_error = gram.weighted_error(rtn.dequantize() - weight)
    assert gram.weighted_error(result.dequantize() - weight) < 0.7 * rtn_error


def test_awq_never_worse_than_rtn_and_scales_centered():
    _, gram, weight = _problem()
    choice = awq_scales([weight[:, :24], weight[:, 24:]], gram, WeightFormat.INT4, 32, symmetric=True)
    assert choice.errors[f"{choice.alpha:g}"] <= choice.errors["0"]
    assert choice.alpha > 0 and choice.scales is not None
    assert np.sqrt(choice.scales.max() * choice.scales.min()) == pytest.approx(1.0, rel=1e-4)


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("block", [0, 4])
def test_gram_computed_in_the_graph_matches_numpy(runtime, block):
    """Blocked Gram requests on long enough batches are computed in the graph, full ones from the
    buffered activations; either way the result equals numpy's over all batches (onnxruntime and
    OpenVINO fp32)."""
    import onnx_ir as ir

    from qcompiler.calibration import StatRequest, _gram_in_graph, _rows_per_batch, collect
    from qcompiler.options import CalibrationRuntime
    from tests.graphs import add, const, float_input, model_of

    x = float_input("x", ["batch", 5, 8])
    graph = ir.Graph([x], [], nodes=[], name="g")
    hidden = add(graph, "MatMul", [x, const(graph, "w", np.eye(8, dtype=np.float32) * 2)], "fc")
    hidden.shape = ir.Shape(["batch", 5, 8])
    hidden.type = ir.TensorType(ir.DataType.FLOAT)
    graph.outputs.append(add(graph, "Relu", [hidden], "relu"))
    model = model_of(graph)
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((4, 5, 8)).astype(np.float32)} for _ in range(3)]
    request = StatRequest.gram(hidden, block)
    assert _gram_in_graph(request, _rows_per_batch(feeds[0])) == (block == 4)  # 20 rows >= 4 x 4
    result = collect(
        model, [request], feeds, calibration_runners(CalibrationRuntime(runtime)), progress=False
    )[request]
    rows = np.concatenate([2 * f["x"].reshape(-1, 8) for f in feeds])
    expected = Gram.full(rows.T @ rows / len(rows), len(rows))
    assert result.rows == 60 and result.channels == 8
    np.testing.assert_allclose(result.blocks, expected.diagonal_blocks(block or 8), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_in_graph_grams_of_several_tensors_and_block_sizes_land_in_their_slots(runtime):
    """Products of one block size share one concatenated output, row counts another: each request
    still gets exactly its own tensor's blocks."""
    import onnx_ir as ir

    from qcompiler.calibration import StatRequest, _gram_in_graph, _rows_per_batch, collect
    from qcompiler.options import CalibrationRuntime
    from tests.graphs import add, const, float_input, model_of

    x = float_input("x", ["batch", 5, 8])
    graph = ir.Graph([x], [], nodes=[], name="g")
    rng = np.random.default_rng(3)
    weight = rng.standard_normal((8, 12)).astype(np.float32)
    hidden = add(graph, "MatMul", [x, const(graph, "w", weight)], "fc")
    relu = add(graph, "Relu", [hidden], "relu")
    for value in (hidden, relu):
        value.shape, value.type = ir.Shape(["batch", 5, 12]), ir.TensorType(ir.DataType.FLOAT)
    graph.outputs.append(relu)
    model = model_of(graph)
    feeds = [{"x": rng.standard_normal((4, 5, 8)).astype(np.float32)} for _ in range(3)]
    requests = [StatRequest.gram(hidden, 4), StatRequest.gram(relu, 4), StatRequest.gram(hidden, 3)]
    assert all(_gram_in_graph(request, _rows_per_batch(feeds[0])) for request in requests)
    statistics = collect(
        model, requests, feeds, calibration_runners(CalibrationRuntime(runtime)), progress=False
    )
    rows = np.concatenate([f["x"].reshape(-1, 8) @ weight for f in feeds])
    for request, values in zip(requests, (rows, np.maximum(rows, 0), rows), strict=True):
        expected = Gram.full(values.T @ values / len(values), len(values))
        result = statistics[request]
        assert result.rows == 60
        np.testing.assert_allclose(
            result.blocks, expected.diagonal_blocks(request.size), rtol=1e-4, atol=1e-4
        )


def test_hqq_spends_its_error_on_the_outlier_and_never_loses_to_rtn_on_its_objective():
    """A block with one outlier row: RTN's step covers the outlier, HQQ's robust fit represents the
    other weights more finely (lower error on them) and its l_0.7 error is never above RTN's."""
    from qcompiler.rewrites.hqq import LP_NORM, hqq
    from qcompiler.weight_formats import integer_range, quantize, to_blocks

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((128, 32)).astype(np.float32)
    weight[5] = 12.0
    rtn = quantize(weight, WeightFormat.INT4, 64, symmetric=False)
    fitted = hqq(weight, WeightFormat.INT4, 64)
    inliers = np.ones(weight.shape, bool)
    inliers[5] = False
    rtn_error, hqq_error = rtn.dequantize() - weight, fitted.dequantize() - weight
    assert np.mean(hqq_error[inliers] ** 2) < 0.92 * np.mean(rtn_error[inliers] ** 2)

    def lp(error):
        return np.mean(np.abs(to_blocks(error, 64)) ** LP_NORM, axis=1)

    assert np.all(lp(hqq_error) <= lp(rtn_error) + 1e-6)
    low, high = integer_range(4, False)
    assert fitted.codes.min() >= low and fitted.codes.max() <= high
    assert fitted.zero_points is not None and fitted.zero_points.max() <= high


def test_hqq_is_the_data_free_option_and_refuses_float_formats(tmp_path):
    from qcompiler.rewrites.hqq import hqq

    with pytest.raises(ValueError, match="integer codes"):
        hqq(np.ones((32, 4), np.float32), WeightFormat.NF4, 32)
    with pytest.raises(qcompiler.errors.OptionError, match="--hqq fits each block's scale and zero point"):
        qcompiler.CompressionOptions(symmetric=True, hqq=True)
    from tests.test_compression import tiny_decoder

    options = qcompiler.CompileOptions(compression=qcompiler.CompressionOptions(group_size=32, hqq=True))
    result = qcompiler.compile(tiny_decoder(), "ort-cpu", options, progress=False)  # no data needed
    hows = {layer["how"] for layer in result.report.compression["layers"].values()}
    assert {how.split(";")[1] for how in hows if how.startswith("int4")} == {" hqq"}
    assert {how.split(";")[1] for how in hows if how.startswith("int8")} == {" rtn"}  # the INT8 backups


@pytest.mark.parametrize("fmt", [WeightFormat.INT4, WeightFormat.INT8, WeightFormat.NVFP4])
def test_large_weights_are_done_in_column_slices_with_the_same_result(monkeypatch, fmt):
    """Columns are independent: RTN and scale estimation give the same codes slice by slice.

    (NVFP4 is never sliced: its tensor scale is the whole weight's.)"""
    import qcompiler.weight_formats as formats
    from qcompiler.options import CompressionOptions
    from qcompiler.rewrites.compression import compress_unit
    from qcompiler.rewrites.weight_plan import WeightUnit

    rng = np.random.default_rng(5)
    weight = rng.standard_normal((64, 300)).astype(np.float32)
    gram = Gram.full(np.cov(rng.standard_normal((64, 400))).astype(np.float32), 400)
    whole = quantize(weight, fmt, 32, symmetric=False)
    monkeypatch.setattr(formats, "SLICE_BYTES", 64 * 4 * 40)  # 40 columns at a time
    assert formats.column_slice(weight.shape) == 40
    sliced = quantize(weight, fmt, 32, symmetric=False)
    np.testing.assert_array_equal(sliced.codes, whole.codes)
    np.testing.assert_array_equal(sliced.scales, whole.scales)

    import onnx_ir as ir

    graph = ir.Graph([], [], nodes=[], name="g")
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, 64]))
    node = ir.node("MatMul", [x, ir.Value(name="w", const_value=ir.tensor(weight))], name="mm")
    graph.append(node)
    unit = WeightUnit(node, "matmul", fmt, True, 32)
    options = CompressionOptions(format=fmt, group_size=32, scale_estimation=True)
    got, how, error = compress_unit(unit, gram, options)
    monkeypatch.setattr(formats, "SLICE_BYTES", 2**30)
    expected, _, expected_error = compress_unit(unit, gram, options)
    # BLAS rounds the Gram products per shape, so near-ties between candidate scales may flip
    assert np.mean(got.codes == expected.codes) > 0.99
    assert np.mean(np.isclose(got.scales, expected.scales, rtol=1e-6)) > 0.98
    assert error == pytest.approx(expected_error, rel=1e-3)
