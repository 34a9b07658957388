"""Small onnx_ir helpers shared by passes, backends and tests."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir


def release_mapped(tensor: object) -> None:
    """Unmap a memory-mapped weight (`ir.ExternalTensor`): its pages stop counting as ours.

    Reading it again maps it again, so this is safe whoever else holds the tensor; passes call it
    once they have their own copy, keeping a large model's resident weights to those in use. While
    an array still views the mapping it stays until that array goes (the tensor maps anew).
    """
    if isinstance(tensor, ir.ExternalTensor):
        try:
            tensor.release()
        except BufferError:  # views of it are alive; the mapping closes with the last of them
            pass


def forget_removed_io(graph: ir.Graph) -> None:
    """Drop onnx_ir's records of values that are no longer graph inputs or outputs.

    onnx_ir 1.1's graph input / output lists count each value's appearances in a Counter and
    decrement on removal without deleting the key, so a value that was once an input or output
    (passes move initializers in and out of the inputs) stays referenced, with every tensor later
    assigned to it, for the graph's lifetime. On SmolLM2 that kept the AWQ-scaled float weights
    (450 MB) alive after they had been compressed.
    """
    for values in (graph.inputs, graph.outputs):
        counter = getattr(values, "_ref_counter", None)
        if counter is not None:
            for value in [value for value, count in counter.items() if count <= 0]:
                del counter[value]


def add_initializer(
    graph: ir.Graph, name: str, array: np.ndarray | np.generic, dtype: ir.DataType | None = None
) -> ir.Value:
    """Register `array` as an initializer under `name`, or `name_1`, `name_2`... if taken.

    `dtype` stores it as another ONNX element type (int4 / uint4 codes held in an int8 / uint8
    array); by default the array's own type.
    """
    unique = name
    suffix = 1
    while unique in graph.initializers:
        unique = f"{name}_{suffix}"
        suffix += 1
    array = np.asarray(array)
    if not array.flags.c_contiguous:  # transposed codes; np.ascontiguousarray would make scalars 1-D
        array = np.ascontiguousarray(array)
    dtype = dtype or ir.DataType.from_numpy(array.dtype)
    value = ir.Value(
        name=unique,
        const_value=ir.tensor(array, dtype=dtype, name=unique),
        type=ir.TensorType(dtype),
        shape=ir.Shape(array.shape),
    )
    graph.register_initializer(value)
    return value


def copy_type_and_shape(source: ir.Value, target: ir.Value) -> None:
    """Give `target` the type and shape of `source` (a DQ output stands in for its float input)."""
    if source.type is not None:
        target.type = source.type
    if source.shape is not None:
        target.shape = source.shape


def insert_dequantize(
    graph: ir.Graph,
    consumer: ir.Node,
    index: int,
    inputs: Sequence[ir.Value | None],
    *,
    name: str,
    like: ir.Value,
    attributes: Mapping[str, int] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> ir.Node:
    """Insert ``DequantizeLinear(inputs)`` before `consumer` and make it `consumer`'s input `index`.

    The new output is named ``<name>_output`` and typed like `like`, the float tensor it replaces.
    """
    dq = ir.node(
        "DequantizeLinear",
        list(inputs),
        dict(attributes) if attributes else None,
        name=name,
        metadata_props=dict(metadata) if metadata else None,
    )
    dq.outputs[0].name = f"{name}_output"
    copy_type_and_shape(like, dq.outputs[0])
    graph.insert_before(consumer, dq)
    consumer.replace_input_with(index, dq.outputs[0])
    return dq


def dequantized_source(value: ir.Value | None) -> ir.Value | None:
    """The float tensor x of a DequantizeLinear(QuantizeLinear(x)) chain ending in `value`, else None."""
    dq = value.producer() if value is not None else None
    if dq is None or dq.op_type != "DequantizeLinear" or dq.inputs[0] is None:
        return None
    q = dq.inputs[0].producer()
    if q is None or q.op_type != "QuantizeLinear":
        return None
    return q.inputs[0]


def drop_if_unused(graph: ir.Graph, value: ir.Value) -> None:
    """Remove an initializer nothing reads any more."""
    if not value.uses() and value.is_initializer() and not value.is_graph_output():
        graph.initializers.pop(str(value.name), None)


def cast_graph_output(graph: ir.Graph, value: ir.Value, dtype: ir.DataType, inner_name: str) -> ir.Value:
    """The graph output `value` read through ``Cast(dtype)`` under its own name; the Cast's output.

    The inner tensor is renamed `inner_name`, so the interface keeps its names and takes `dtype`
    (a model that computes in another float type than its interface declares).
    """
    name = str(value.name)
    cast = ir.node("Cast", [value], {"to": dtype}, name=f"{name}/interface")
    graph.insert_after(value.producer(), cast)  # type: ignore[arg-type]
    result = cast.outputs[0]
    result.type, result.shape = ir.TensorType(dtype), value.shape
    value.name = inner_name
    result.name = name
    graph.outputs[list(graph.outputs).index(value)] = result
    return result
