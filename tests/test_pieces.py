"""Piecewise calibration: cuts between blocks, weights shared not copied, the same statistics."""

import gc
import weakref

import numpy as np
import onnx_ir as ir
import pytest

from qcompiler import calibration, pieces
from qcompiler.calibration import StatKind, StatRequest
from qcompiler.drivers.runtimes import calibration_runners
from qcompiler.irutil import forget_removed_io
from qcompiler.options import CalibrationRuntime
from qcompiler.rewrites.normalize import NormalizePass
from tests.graphs import add, const, float_input, model_of, random_feeds

HIDDEN, INNER, BLOCKS = 16, 64, 4
BLOCK_BYTES = 2 * HIDDEN * INNER * 4


def residual_blocks() -> ir.Model:
    """x -> BLOCKS x (x + W2 Relu(W1 (x * mask))): a decoder's shape, with one input every block reads."""
    rng = np.random.default_rng(7)
    x = float_input("x", ["batch", 8, HIDDEN])
    mask = float_input("mask", ["batch", 8, HIDDEN])
    graph = ir.Graph([x, mask], [], nodes=[], name="blocks")
    h = x
    for block in range(BLOCKS):
        gated = add(graph, "Mul", [h, mask], f"gate{block}")
        w1 = const(graph, f"w1_{block}", rng.standard_normal((HIDDEN, INNER)).astype(np.float32))
        w2 = const(graph, f"w2_{block}", rng.standard_normal((INNER, HIDDEN)).astype(np.float32) * 0.1)
        up = add(graph, "Relu", [add(graph, "MatMul", [gated, w1], f"up{block}")], f"relu{block}")
        h = add(graph, "Add", [h, add(graph, "MatMul", [up, w2], f"down{block}")], f"residual{block}")
    graph.outputs.append(h)
    model = model_of(graph)
    NormalizePass()(model)
    return model


def test_split_cuts_between_blocks_and_shares_weights():
    """Pieces of about one block each; two values cross each cut, the residual among them.

    (The mask, or the last block's gated input once the mask has no later reader.)"""
    model = residual_blocks()
    originals = {name: value.const_value for name, value in model.graph.initializers.items()}
    parts = pieces.split(model.clone(), BLOCK_BYTES, keep=["residual3_out"])
    assert len(parts) == BLOCKS
    for number, part in enumerate(parts[1:]):
        assert len(part.inputs) == 2 and f"residual{number}_out" in part.inputs
    for part in parts[:-1]:
        assert "mask" not in part.carried  # inputs are not outputs; later pieces read the feed
    assert [str(value.name) for value in parts[-1].model.graph.outputs] == ["residual3_out"]
    for part in parts:
        for name, value in part.model.graph.initializers.items():
            assert value.const_value is originals[name]


def test_split_keeps_a_small_model_or_one_with_subgraphs_whole():
    """Under the budget: one piece. An If node: one piece whatever the budget."""
    model = residual_blocks()
    assert len(pieces.split(model.clone(), 10 * BLOCKS * BLOCK_BYTES)) == 1
    graph = model.graph
    condition = const(graph, "condition", np.array(True))
    branch = ir.Graph([], [], nodes=[], name="branch")
    branch.outputs.append(add(branch, "Identity", [graph.outputs[0]], "inner"))
    iffed = ir.node(
        "If",
        [condition],
        {
            "then_branch": ir.AttrGraph("then_branch", branch),
            "else_branch": ir.AttrGraph("else_branch", branch),
        },
        num_outputs=1,
        name="if",
    )
    graph.append(iffed)
    assert len(pieces.split(model, BLOCK_BYTES)) == 1


@pytest.mark.parametrize("runtime", [CalibrationRuntime.ONNXRUNTIME, CalibrationRuntime.OPENVINO])
def test_piecewise_statistics_equal_whole_model(runtime):
    """Every kind of statistic, on inputs, mid-block and block outputs, in-graph Grams included."""
    model = residual_blocks()
    values = {str(out.name): out for node in model.graph for out in node.outputs}
    values.update({str(value.name): value for value in model.graph.inputs})
    requests = [
        StatRequest(values["x"], StatKind.MINMAX),
        StatRequest(values["mask"], StatKind.GRAM),
        StatRequest(values["relu1_out"], StatKind.HISTOGRAM),
        StatRequest(values["gate2_out"], StatKind.ABSMAX_PER_CHANNEL),
        StatRequest(values["gate2_out"], StatKind.GRAM, size=4),  # computed in the graph
        StatRequest(values["relu3_out"], StatKind.GRAM),
        StatRequest(values["residual3_out"], StatKind.MINMAX_PER_CHANNEL),
    ]
    feeds = random_feeds(model, batches=3, batch=2)
    whole = calibration.collect(model, requests, feeds, calibration_runners(runtime), progress=False)
    piecewise = calibration.collect(
        model, requests, feeds, calibration_runners(runtime), progress=False, piece_bytes=BLOCK_BYTES // 4
    )
    assert piecewise.batches == whole.batches == 3
    for request in requests:
        expected, got = whole[request], piecewise[request]
        if isinstance(expected, tuple):
            np.testing.assert_allclose(np.array(got), np.array(expected), rtol=1e-6, atol=1e-6)
        elif hasattr(expected, "blocks"):
            np.testing.assert_allclose(got.blocks, expected.blocks, rtol=1e-5, atol=1e-6)
            assert got.rows == expected.rows
        elif hasattr(expected, "counts"):
            np.testing.assert_array_equal(got.counts, expected.counts)
        else:
            np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_forgotten_graph_inputs_can_be_freed():
    """A value removed from the graph inputs is not kept alive by onnx_ir's input bookkeeping."""
    graph = ir.Graph([], [], nodes=[], name="g")
    value = float_input("temporary", [2])
    graph.inputs.append(value)
    graph.inputs.remove(value)
    forget_removed_io(graph)
    alive = weakref.ref(value)
    del value
    gc.collect()
    assert alive() is None


def test_openvino_streams_return_every_feed_in_order():
    """Two streams run feeds concurrently; results come back in feed order, equal to one stream's."""
    from qcompiler.backends.openvino.runtime import OpenVINORunner

    model = residual_blocks()
    feeds = random_feeds(model, batches=9, batch=1)
    names = ["residual3_out"]
    one = OpenVINORunner(model, streams=1)
    two = OpenVINORunner(model, streams=2)
    for expected, got in zip(
        (one.run(names, feed) for feed in feeds), two.run_all(names, iter(feeds)), strict=True
    ):
        np.testing.assert_allclose(got[0], expected[0], rtol=1e-5, atol=1e-5)


def test_no_cut_splits_a_set_that_must_stay_together():
    """A piece grows past its budget rather than separate an AWQ group's producer from its consumers."""
    from qcompiler.pieces import _cuts

    rng = np.random.default_rng(0)
    x = float_input("x", [2, 64])
    graph = ir.Graph([x], [], nodes=[], name="chain")
    value = x
    for index in range(6):
        weight = const(graph, f"w{index}", rng.standard_normal((64, 64)).astype(np.float32))  # 16 KB
        value = add(graph, "MatMul", [value, weight], f"fc{index}")
    graph.outputs.append(value)
    nodes = list(graph)
    free = _cuts(nodes, 40_000)
    assert free and 2 in free  # two weights a piece: a cut before fc2
    kept = _cuts(nodes, 40_000, [frozenset({"fc1", "fc2"})])
    assert 2 not in kept and kept  # fc1 and fc2 in one piece, still cut elsewhere
