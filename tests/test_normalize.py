import numpy as np
import onnx_ir as ir

from qcompiler.rewrites.normalize import FoldWeightTransposePass, NormalizePass
from tests.graphs import add, const, float_input, model_of, run


def tied_head_model():
    """Gather(embedding) ... MatMul(h, Transpose(embedding)): a tied LM head as exporters write it."""
    ids = ir.Value(name="ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([2, 3]))
    graph = ir.Graph([ids], [], nodes=[], name="tied")
    embedding = const(
        graph, "embedding", np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32)
    )
    h = add(graph, "Gather", [embedding, ids], "embed")
    head = add(graph, "Transpose", [embedding], "head_t", perm=[1, 0])
    graph.outputs.append(add(graph, "MatMul", [h, head], "lm_head"))
    return model_of(graph)


def test_tied_head_transpose_becomes_a_constant_weight():
    """The head reads a transposed initializer; the Gather keeps the original; outputs are equal."""
    reference, model = tied_head_model(), tied_head_model()
    assert FoldWeightTransposePass()(model).modified
    head = next(node for node in model.graph if node.op_type == "MatMul")
    assert head.inputs[1].const_value is not None and head.inputs[1].const_value.shape == (8, 50)
    assert "Transpose" not in [node.op_type for node in model.graph]
    feed = {"ids": np.array([[1, 2, 3], [4, 5, 6]])}
    np.testing.assert_array_equal(run(reference, feed)[0], run(model, feed)[0])


def test_transpose_feeding_other_ops_is_left_alone():
    """A Transpose read by anything but a MatMul/Gemm weight input stays."""
    x = float_input("x", [8, 4])
    graph = ir.Graph([x], [], nodes=[], name="other")
    t = add(graph, "Transpose", [const(graph, "w", np.ones((4, 8), np.float32))], "t", perm=[1, 0])
    graph.outputs.append(add(graph, "Add", [x, t], "add"))
    assert not FoldWeightTransposePass()(model_of(graph)).modified


def test_normalize_names_every_node_and_infers_types():
    """After normalize every node has a unique name and every value a dtype."""
    model = tied_head_model()
    for node in model.graph:
        node.name = None
    NormalizePass()(model)
    names = [node.name for node in model.graph]
    assert all(names) and len(set(names)) == len(names)
    assert all(node.outputs[0].dtype is not None for node in model.graph)


def test_a_declared_output_rank_that_contradicts_its_softmax_is_repaired_before_shape_inference():
    """Paddle2ONNX's rank-0 output after a Softmax made onnx's shape inference fail for the whole graph."""
    x = float_input("x", [2, 8])
    graph = ir.Graph([x], [], nodes=[], name="softmax_out")
    hidden = add(graph, "MatMul", [x, const(graph, "w", np.ones((8, 4), np.float32))], "fc")
    probabilities = add(graph, "Softmax", [hidden], "softmax")
    probabilities.type, probabilities.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape([])
    graph.outputs.append(probabilities)
    model = model_of(graph)
    NormalizePass()(model)
    assert list(model.graph.outputs[0].shape) == [2, 4]
    assert next(n for n in model.graph if n.op_type == "MatMul").outputs[0].dtype == ir.DataType.FLOAT
