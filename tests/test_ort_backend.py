import numpy as np
import onnx_ir as ir
import pytest

from qcompiler.backends.onnxruntime.fusion import count_fusion
from qcompiler.backends.onnxruntime.legality import check
from qcompiler.backends.onnxruntime.lower import DedicateDequantizePass, RequantizeSharedOutputPass, lower
from qcompiler.errors import LegalityError
from tests.graphs import const, float_input, model_of, run


def _quantized_matmul(graph, source, index, rng):
    w = const(graph, f"w{index}", rng.integers(-127, 128, (8, 8)).astype(np.int8))
    wdq = ir.node(
        "DequantizeLinear",
        [
            w,
            const(graph, f"ws{index}", np.full(8, 0.01, np.float32)),
            const(graph, f"wz{index}", np.zeros(8, np.int8)),
        ],
        {"axis": 1},
        name=f"wdq{index}",
    )
    mm = ir.node("MatMul", [source, wdq.outputs[0]], name=f"mm{index}")
    mm.outputs[0].name = f"y{index}"
    graph.extend([wdq, mm])
    return mm


def _q_dq(graph, value, name):
    q = ir.node(
        "QuantizeLinear",
        [value, const(graph, f"{name}_s", np.float32(0.05)), const(graph, f"{name}_z", np.uint8(128))],
        name=f"{name}_q",
    )
    dq = ir.node("DequantizeLinear", [q.outputs[0], q.inputs[1], q.inputs[2]], name=f"{name}_dq")
    graph.extend([q, dq])
    return dq


def _shared_dq_model(bias_zero_point: int = 0) -> ir.Model:
    """x -> Q -> one DQ shared by two quantized MatMuls; optional int32 bias DQ with a zero point."""
    rng = np.random.default_rng(0)
    x = float_input("x", [2, 8])
    graph = ir.Graph([x], [], nodes=[], name="shared")
    dq = _q_dq(graph, x, "x")
    for index in range(2):
        graph.outputs.append(_quantized_matmul(graph, dq.outputs[0], index, rng).outputs[0])
    if bias_zero_point:
        b = ir.node(
            "DequantizeLinear",
            [
                const(graph, "b", np.arange(4, dtype=np.int32)),
                const(graph, "bs", np.float32(0.1)),
                const(graph, "bz", np.int32(bias_zero_point)),
            ],
            name="bias_dq",
        )
        b.outputs[0].name = "bias"
        graph.append(b)
        graph.outputs.append(b.outputs[0])
    return model_of(graph)


def test_checker_rejects_shared_dq_naming_the_node():
    """Rule dq-single-consumer names the DequantizeLinear that feeds two nodes."""
    with pytest.raises(LegalityError, match=r"\[dq-single-consumer\] x_dq: DequantizeLinear feeds 2 nodes"):
        check(_shared_dq_model())


def test_checker_rejects_int32_bias_with_zero_point():
    """Rule constant-weight-types: an int32 bias needs zero point 0."""
    model = _shared_dq_model(bias_zero_point=3)
    DedicateDequantizePass()(model)
    with pytest.raises(LegalityError, match="bias_dq: int32 bias must have zero point 0"):
        check(model)


def test_dedicating_dqs_keeps_outputs_and_passes_the_checker():
    """After lowering each DQ has one consumer, outputs are bit-identical, both MatMuls fuse."""
    model = _shared_dq_model()
    feed = {"x": np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)}
    expected = run(model, feed)
    assert DedicateDequantizePass()(model).modified
    check(model)
    for a, b in zip(expected, run(model, feed), strict=True):
        np.testing.assert_array_equal(a, b)
    assert count_fusion(model, ["mm0", "mm1"]).fused == {
        "mm0": "MatMulIntegerToFloat",
        "mm1": "MatMulIntegerToFloat",
    }


def _output_feeds_q_and_float(as_graph_output: bool) -> ir.Model:
    """mm0's output feeds a Q (for mm1) and a float Relu (or is also a graph output)."""
    rng = np.random.default_rng(2)
    x = float_input("x", [2, 8])
    graph = ir.Graph([x], [], nodes=[], name="requant")
    mm0 = _quantized_matmul(graph, _q_dq(graph, x, "x").outputs[0], 0, rng)
    mm1 = _quantized_matmul(graph, _q_dq(graph, mm0.outputs[0], "h").outputs[0], 1, rng)
    graph.outputs.append(mm1.outputs[0])
    if as_graph_output:
        graph.outputs.append(mm0.outputs[0])
    else:
        relu = ir.node("Relu", [mm0.outputs[0]], name="relu")
        relu.outputs[0].name = "side"
        graph.append(relu)
        graph.outputs.append(relu.outputs[0])
    return model_of(graph)


def test_fusion_count_explains_an_output_q_shared_with_a_graph_output():
    """ORT refuses mm0 (output feeds a Q and a graph output); the reason says exactly that."""
    model = _output_feeds_q_and_float(as_graph_output=True)
    lower(model)
    report = count_fusion(model, ["mm0", "mm1"])
    assert "mm0" in report.not_fused and "graph output" in report.not_fused["mm0"]
    assert report.fused == {"mm1": "MatMulIntegerToFloat"}


def test_requantizing_float_consumers_lets_the_node_fuse():
    """Routing the Relu through its own DQ turns mm0 into QLinearMatMul."""
    model = _output_feeds_q_and_float(as_graph_output=False)
    assert count_fusion(model, ["mm0"]).not_fused
    assert RequantizeSharedOutputPass()(model).modified
    relu = next(node for node in model.graph if node.op_type == "Relu")
    assert relu.inputs[0].producer().op_type == "DequantizeLinear"
    assert count_fusion(model, ["mm0", "mm1"]).fused == {
        "mm0": "QLinearMatMul",
        "mm1": "MatMulIntegerToFloat",
    }
