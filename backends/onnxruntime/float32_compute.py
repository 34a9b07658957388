"""An FP16 model computes in FP32 on onnxruntime's CPU provider, keeping its interface and storage.

onnxruntime's CPU kernels are FP32: it wraps FP16 elementwise ops in Casts, and SmolLM2's INT4
decode step from the FP16 export took 13.1 ms against 8.8 ms from the FP32 export. Graph inputs
and outputs keep FP16 (a Cast after each input, before each output); every FP16 initializer stays
stored FP16 behind a Cast the session folds when it loads the model; every other FP16 tensor,
Cast target and constant attribute becomes FP32.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompiler.irutil import cast_graph_output


def compute_in_float32(model: ir.Model, source: ir.DataType = ir.DataType.FLOAT16) -> int:
    """Make a `source`-precision graph compute in FP32 in place (see the module docstring).

    Returns the number of values retyped.
    """
    graph = model.graph
    fp32 = ir.DataType.FLOAT
    interface = [index for index, value in enumerate(graph.outputs) if value.dtype == source]
    for value in list(graph.initializers.values()):
        if value.dtype == source and value.uses():
            _read_through_cast(graph, value, fp32)
    retyped = 0
    for node in list(graph):
        if (
            node.op_type == "Cast"
            and node.domain in ("", "ai.onnx")
            and node.attributes.get_int("to", 0) == source
        ):
            node.attributes["to"] = ir.AttrInt64("to", int(fp32))
        for name in ("value",):  # Constant, ConstantOfShape
            attribute = node.attributes.get(name)
            if (
                attribute is not None
                and attribute.type == ir.AttributeType.TENSOR
                and attribute.value.dtype == source
            ):
                array = np.asarray(attribute.value.numpy(), np.float32)
                node.attributes[name] = ir.AttrTensor(name, ir.tensor(array, name=attribute.value.name))
        for output in node.outputs:
            if output.dtype == source:
                output.type = ir.TensorType(fp32)  # a new type object: values may share one
                retyped += 1
    for value in list(graph.inputs):
        if value.dtype == source:
            _widen_input(graph, value, fp32)
    _drop_identity_casts(graph)  # FP16 -> FP32 islands' Casts are FP32 -> FP32 now
    for index in interface:
        value = graph.outputs[index]
        if value.producer() is not None:  # an input passed straight through kept its type
            cast_graph_output(graph, value, source, f"{value.name}/float32")
    return retyped


def _drop_identity_casts(graph: ir.Graph) -> None:
    """Remove each Cast to the type its input already has (its readers read the input)."""
    for node in list(graph):
        if node.op_type != "Cast" or node.domain not in ("", "ai.onnx") or node.inputs[0] is None:
            continue
        source, output = node.inputs[0], node.outputs[0]
        if source.dtype != node.attributes.get_int("to", 0) or output.is_graph_output():
            continue
        output.replace_all_uses_with(source)
        graph.remove(node, safe=True)


def _read_through_cast(graph: ir.Graph, value: ir.Value, dtype: ir.DataType) -> None:
    """Readers of the initializer `value` read ``Cast(value, dtype)`` instead."""
    readers = [use.node for use in value.uses()]
    first = next(node for node in graph if node in readers)
    cast = ir.node("Cast", [value], {"to": dtype}, name=f"{value.name}/compute")
    cast.outputs[0].name = f"{value.name}/float32"
    cast.outputs[0].type, cast.outputs[0].shape = ir.TensorType(dtype), value.shape
    graph.insert_before(first, cast)
    for use in list(value.uses()):
        if use.node is not cast:
            use.node.replace_input_with(use.idx, cast.outputs[0])


def _widen_input(graph: ir.Graph, value: ir.Value, dtype: ir.DataType) -> None:
    uses = list(value.uses())  # before the Cast reads it too
    cast = ir.node("Cast", [value], {"to": dtype}, name=f"{value.name}/compute")
    cast.outputs[0].name = f"{value.name}/float32"
    cast.outputs[0].type, cast.outputs[0].shape = ir.TensorType(dtype), value.shape
    graph.insert_before(next(iter(graph)), cast)
    for use in uses:
        use.node.replace_input_with(use.idx, cast.outputs[0])
