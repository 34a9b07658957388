"""Per-channel affine ops after a Conv fold into its weight and bias (rewrites/conv_affine.py)."""

import numpy as np
import onnx_ir as ir
import pytest

import qcompiler
from qcompiler.rewrites.conv_affine import FoldConvAffinePass
from tests.graphs import add, const, float_input, model_of, op_types, random_feeds, run


def paddle_block(channels: int = 6, seed: int = 0) -> ir.Model:
    """Paddle2ONNX's spelling: Conv without bias -> Add [1,C,1,1] bias -> scalar Mul -> scalar Add,
    a BatchNormalization after a second Conv, then HardSigmoid x (hard-swish) and a depthwise Conv."""
    rng = np.random.default_rng(seed)
    x = float_input("image", ["batch", 3, 8, 8])
    graph = ir.Graph([x], [], nodes=[], name="paddle")
    w = const(graph, "w", (rng.standard_normal((channels, 3, 3, 3)) * 0.3).astype(np.float32))
    c = add(graph, "Conv", [x, w], "conv", pads=[1, 1, 1, 1])
    b = add(
        graph,
        "Add",
        [c, const(graph, "bias", rng.standard_normal((1, channels, 1, 1)).astype(np.float32) * 4)],
        "bias_add",
    )
    m = add(graph, "Mul", [const(graph, "lab_scale", np.array([0.6], np.float32)), b], "lab_mul")
    a = add(graph, "Add", [m, const(graph, "lab_offset", np.array([0.2], np.float32))], "lab_add")
    w2 = const(graph, "w2", (rng.standard_normal((channels, 1, 3, 3)) * 0.3).astype(np.float32))
    d = add(graph, "Conv", [a, w2], "depthwise", pads=[1, 1, 1, 1], group=channels)
    bn = add(
        graph,
        "BatchNormalization",
        [
            d,
            const(graph, "gamma", rng.uniform(0.5, 2, channels).astype(np.float32)),
            const(graph, "beta", rng.standard_normal(channels).astype(np.float32)),
            const(graph, "mean", rng.standard_normal(channels).astype(np.float32)),
            const(graph, "var", rng.uniform(0.5, 2, channels).astype(np.float32)),
        ],
        "bn",
    )
    h = add(graph, "HardSigmoid", [bn], "hsig", alpha=1 / 6, beta=0.5)
    graph.outputs.append(add(graph, "Mul", [h, bn], "hswish"))
    return model_of(graph)


def test_bias_affine_and_batchnorm_fold_into_the_convs():
    """Every follower is folded, float outputs are unchanged to 1e-5 relative, names are kept."""
    reference, model = paddle_block(), paddle_block()
    assert FoldConvAffinePass()(model).modified
    assert op_types(model) == ["Conv", "Conv", "HardSigmoid", "Mul"]
    convs = [node for node in model.graph if node.op_type == "Conv"]
    assert all(len(node.inputs) == 3 and node.inputs[2].const_value is not None for node in convs)
    assert convs[0].outputs[0].name == "lab_add_out" and convs[1].outputs[0].name == "bn_out"
    feed = random_feeds(model, batches=1)[0]
    expected, actual = run(reference, feed)[0], run(model, feed)[0]
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_shared_or_non_channel_followers_stay():
    """A Conv output read twice, an Add of a per-pixel constant and c - y are not folded."""
    rng = np.random.default_rng(1)
    x = float_input("image", [1, 3, 4, 4])
    graph = ir.Graph([x], [], nodes=[], name="kept")
    w = const(graph, "w", rng.standard_normal((2, 3, 1, 1)).astype(np.float32))
    c = add(graph, "Conv", [x, w], "conv")
    graph.outputs.append(
        add(graph, "Add", [c, const(graph, "pixel", np.ones((1, 1, 4, 4), np.float32))], "pixel_add")
    )
    c2 = add(graph, "Conv", [x, w], "conv2")
    graph.outputs.append(
        add(graph, "Sub", [const(graph, "c", np.ones((1, 2, 1, 1), np.float32)), c2], "reverse_sub")
    )
    c3 = add(graph, "Conv", [x, w], "conv3")
    graph.outputs.append(add(graph, "Relu", [c3], "relu"))
    graph.outputs.append(
        add(graph, "Mul", [c3, const(graph, "two", np.array(2.0, np.float32))], "shared_mul")
    )
    assert not FoldConvAffinePass()(model_of(graph)).modified


def test_folded_bias_becomes_the_int32_bias_of_the_quantized_conv():
    """Compiled for ort-cpu the bias Add is gone: the Conv's bias input is an int32 DequantizeLinear."""
    model = paddle_block()
    result = qcompiler.compile(
        model, "ort-cpu", qcompiler.CompileOptions(), data=random_feeds(model), progress=False
    )
    first = next(node for node in result.model.graph if node.op_type == "Conv")
    bias = first.inputs[2].producer()
    assert bias.op_type == "DequantizeLinear" and bias.inputs[0].dtype == ir.DataType.INT32
    assert "Add" not in op_types(result.model)


@pytest.mark.parametrize("target", ["ort-cpu", "openvino-cpu"])
def test_w8a8_conv_model_compiles_and_stays_close(target):
    """W8A8 on a Conv block passes each target's checker (OpenVINO reads the i8 Conv weights)."""
    model = paddle_block()
    feeds = random_feeds(model, batches=8)
    result = qcompiler.compile(
        model, target, qcompiler.CompileOptions(count_fusion=False), data=feeds, progress=False
    )
    assert op_types(result.model).count("QuantizeLinear") >= 2
    if target == "ort-cpu":
        expected, actual = run(paddle_block(), feeds[0])[0], run(result.model, feeds[0])[0]
        assert np.linalg.norm(actual - expected) / np.linalg.norm(expected) < 0.05
