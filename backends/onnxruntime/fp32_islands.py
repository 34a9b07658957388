"""FP16 models on onnxruntime CPU: each quantized MatMul / Gemm runs as an FP32 island.

onnxruntime's CPU provider fuses Q/DQ into MatMulIntegerToFloat / QGemm only when the
DequantizeLinear outputs are float32; with the FP16 scales of an FP16 model's canonical form it
runs DQ -> Cast -> MatMul in float instead (MiniLM FP16, W8A8: 0 of 36 MatMuls fused). Here each
quantized MatMul / Gemm whose Q/DQ inputs are FP16 gets FP32 scales (the same values: every FP16
number is an FP32 one), its activation's QuantizeLinear reads ``Cast(x, float)``, its float bias
becomes FP32, and its output is cast back to FP16 for the rest of the graph. The integer codes do
not change, so the island computes what the FP16 form means, with the product accumulated in FP32.
Conv keeps its FP16 form (its fused kernel needs an output quantizer, which would need an island
spanning two units).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompiler.irutil import add_initializer

ISLAND_OPS = frozenset({"MatMul", "Gemm"})


def _fp16_dq(value: ir.Value | None) -> ir.Node | None:
    """The DequantizeLinear producing `value` in FP16, or None."""
    producer = value.producer() if value is not None else None
    if producer is None or producer.op_type != "DequantizeLinear" or producer.domain not in ("", "ai.onnx"):
        return None
    return producer if producer.outputs[0].dtype == ir.DataType.FLOAT16 else None


class Float32IslandsPass(ir.passes.InPlacePass):
    """Rewrite every FP16 quantized MatMul / Gemm as an FP32 island (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.islands: list[str] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Rewrite each unit; `islands` lists their names."""
        graph = model.graph
        converted_q: set[int] = set()
        for node in list(graph):
            if node.op_type not in ISLAND_OPS or node.outputs[0].dtype != ir.DataType.FLOAT16:
                continue
            dqs = [_fp16_dq(node.inputs[index]) for index in (0, 1)]
            if any(dq is None for dq in dqs) or any(len(dq.outputs[0].uses()) != 1 for dq in dqs):  # type: ignore[union-attr]
                continue
            for dq in dqs:
                assert dq is not None
                _to_float32_scale(graph, dq, 1)
                dq.outputs[0].type = ir.TensorType(
                    ir.DataType.FLOAT
                )  # a new type: DQ outputs share their source's
                q = dq.inputs[0].producer() if dq.inputs[0] is not None else None
                if q is not None and q.op_type == "QuantizeLinear" and id(q) not in converted_q:
                    _quantize_from_float32(graph, q)
                    converted_q.add(id(q))
            if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
                _bias_to_float32(graph, node)
            _cast_output_back(graph, node)
            self.islands.append(str(node.name))
        return ir.passes.PassResult(model, modified=bool(self.islands))


def _float32_copy(graph: ir.Graph, value: ir.Value) -> ir.Value:
    """An FP32 initializer with `value`'s (FP16) constant, exactly."""
    assert value.const_value is not None
    return add_initializer(graph, f"{value.name}_float32", value.const_value.numpy().astype(np.float32))


def _to_float32_scale(graph: ir.Graph, node: ir.Node, index: int) -> None:
    scale = node.inputs[index]
    if scale is not None and scale.dtype == ir.DataType.FLOAT16:
        node.replace_input_with(index, _float32_copy(graph, scale))


def _quantize_from_float32(graph: ir.Graph, q: ir.Node) -> None:
    """``Q(x16, s16)`` -> ``Q(Cast(x16, float), s32)``: the same codes for every DQ reading it."""
    source = q.inputs[0]
    if source is None or source.dtype != ir.DataType.FLOAT16:
        return
    cast = ir.node("Cast", [source], {"to": ir.DataType.FLOAT}, name=f"{q.name}/float32")
    cast.outputs[0].name = f"{source.name}/float32"
    cast.outputs[0].type, cast.outputs[0].shape = ir.TensorType(ir.DataType.FLOAT), source.shape
    graph.insert_before(q, cast)
    q.replace_input_with(0, cast.outputs[0])
    _to_float32_scale(graph, q, 1)


def _bias_to_float32(graph: ir.Graph, gemm: ir.Node) -> None:
    bias = gemm.inputs[2]
    assert bias is not None
    if bias.const_value is not None:
        gemm.replace_input_with(2, _float32_copy(graph, bias))
        return
    cast = ir.node("Cast", [bias], {"to": ir.DataType.FLOAT}, name=f"{gemm.name}/bias/float32")
    cast.outputs[0].type, cast.outputs[0].shape = ir.TensorType(ir.DataType.FLOAT), bias.shape
    graph.insert_before(gemm, cast)
    gemm.replace_input_with(2, cast.outputs[0])


def _cast_output_back(graph: ir.Graph, node: ir.Node) -> None:
    """The unit computes FP32; a Cast gives its readers the FP16 tensor under the original name."""
    output = node.outputs[0]
    name = str(output.name)
    cast = ir.node("Cast", [output], {"to": ir.DataType.FLOAT16}, name=f"{node.name}/float16")
    back = cast.outputs[0]
    back.type, back.shape = ir.TensorType(ir.DataType.FLOAT16), output.shape
    graph.insert_after(node, cast)
    output.replace_all_uses_with(back, replace_graph_outputs=True)
    cast.replace_input_with(0, output)  # replace_all_uses_with moved the Cast's own input too
    output.name, output.type = f"{name}/float32", ir.TensorType(ir.DataType.FLOAT)
    back.name = name
