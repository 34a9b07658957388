"""Tiny graphs built in the tests with onnx_ir, and helpers to run them."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompiler.drivers.runtimes import calibration_runners
from qcompiler.irutil import add_initializer
from qcompiler.options import CalibrationRuntime

ORT_RUNNERS = calibration_runners(CalibrationRuntime.ONNXRUNTIME)
"""Calibration in onnxruntime, as the W8A8 driver runs it."""


def const(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Register an initializer."""
    return add_initializer(graph, name, np.asarray(array))


def float_input(name: str, shape: list) -> ir.Value:
    """A float32 graph input."""
    return ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(shape))


def add(graph: ir.Graph, op: str, inputs: list, name: str, **attributes) -> ir.Value:
    """Append a node; return its (single) output, named after the node."""
    node = ir.node(op, inputs, attributes or None, name=name)
    node.outputs[0].name = f"{name}_out"
    graph.append(node)
    return node.outputs[0]


def model_of(graph: ir.Graph, opset: int = 17) -> ir.Model:
    """Wrap a graph into a model with the default opset."""
    graph.opset_imports[""] = opset
    return ir.Model(graph, ir_version=9, producer_name="qcompiler-tests")


def mlp_with_attention_matmul() -> ir.Model:
    """x -> MatMul(W1) -> Relu -> {MatMul(W2), MatMul(W3)} and an activation x activation MatMul.

    Covers: a shared activation (two weighted consumers), a non-weighted MatMul, per-channel axes.
    """
    rng = np.random.default_rng(1234)
    x = float_input("x", ["batch", 6, 8])
    graph = ir.Graph([x], [], nodes=[], name="mlp")
    h = add(graph, "MatMul", [x, const(graph, "w1", rng.standard_normal((8, 16)).astype(np.float32))], "fc1")
    r = add(graph, "Relu", [h], "relu")
    a = add(graph, "MatMul", [r, const(graph, "w2", rng.standard_normal((16, 4)).astype(np.float32))], "fc2")
    b = add(graph, "MatMul", [r, const(graph, "w3", rng.standard_normal((16, 4)).astype(np.float32))], "fc3")
    bt = add(graph, "Transpose", [b], "transpose", perm=[0, 2, 1])
    scores = add(graph, "MatMul", [a, bt], "scores")
    graph.outputs.append(scores)
    graph.outputs.append(r)
    return model_of(graph)


def gemm_conv_model() -> ir.Model:
    """Conv (with bias) -> Relu -> Flatten -> Gemm (transB, bias): int32 bias and output-Q cases."""
    rng = np.random.default_rng(1234)
    x = float_input("image", [1, 3, 8, 8])
    graph = ir.Graph([x], [], nodes=[], name="cnn")
    w = const(graph, "conv_w", (rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32))
    b = const(graph, "conv_b", rng.standard_normal(4).astype(np.float32))
    c = add(graph, "Conv", [x, w, b], "conv", pads=[1, 1, 1, 1])
    r = add(graph, "Relu", [c], "relu")
    f = add(graph, "Flatten", [r], "flatten")
    gw = const(graph, "gemm_w", (rng.standard_normal((10, 256)) * 0.1).astype(np.float32))
    gb = const(graph, "gemm_b", rng.standard_normal(10).astype(np.float32))
    y = add(graph, "Gemm", [f, gw, gb], "gemm", transB=1)
    graph.outputs.append(y)
    return model_of(graph)


def random_feeds(
    model: ir.Model, batches: int = 4, batch: int = 2, seed: int = 0
) -> list[dict[str, np.ndarray]]:
    """Float feeds for every input; dynamic dims get `batch`."""
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(batches):
        feed = {}
        for value in model.graph.inputs:
            shape = [d if isinstance(d, int) else batch for d in value.shape]
            feed[str(value.name)] = rng.standard_normal(shape).astype(np.float32)
        feeds.append(feed)
    return feeds


def run(model: ir.Model, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run in onnxruntime CPU."""
    import onnxruntime as ort

    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def op_types(model: ir.Model) -> list[str]:
    """Op types in graph order."""
    return [node.op_type for node in model.graph]
