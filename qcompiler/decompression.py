"""Weights stored in a lower precision than the graph computes in, read as the weight they decompress to.

``Constant f16 -> Convert f32`` in OpenVINO IR saved with its defaults, an FP16 initializer behind
a ``Cast`` in ONNX: the conversion belongs to the weight. `lift_decompression` replaces each such
pair by one initializer of the computed type, converted lazily when read, that remembers its
stored type (`precision.STORED_TYPE_KEY`), so every pass sees an ordinary weight;
`restore_decompression` stores whatever is still float back in that type before export.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from qcompiler.precision import FLOAT_TYPES, STORED_TYPE_KEY, numpy_type

_CONVERTS = {("", "Cast"), ("org.openvinotoolkit", "Convert")}
_OPENVINO_TYPES = {"f32": ir.DataType.FLOAT, "f16": ir.DataType.FLOAT16, "bf16": ir.DataType.BFLOAT16}


def _cast_target(node: ir.Node) -> ir.DataType | None:
    """The float type a Cast / OpenVINO Convert node converts to (None: not a float conversion)."""
    if (node.domain, node.op_type) not in _CONVERTS:
        return None
    if node.op_type == "Cast":
        to = node.attributes.get_int("to", 0)
        dtype = ir.DataType(to) if to else None
    else:
        attribute = node.attributes.get("destination_type")
        dtype = _OPENVINO_TYPES.get(attribute.as_string()) if attribute is not None else None
    return dtype if dtype in FLOAT_TYPES else None


def lift_decompression(model: ir.Model) -> int:
    """Replace each float constant -> Cast / Convert to another float type by one lazy initializer.

    The new initializer has the converted type and the Cast's output name, converts the stored
    array when first read, and keeps the stored type in ``meta[STORED_TYPE_KEY]``. Returns the
    number of conversions lifted.
    """
    graph = model.graph
    lifted = 0
    for node in list(graph):
        target = _cast_target(node)
        source = node.inputs[0] if node.inputs else None
        if target is None or source is None or source.const_value is None or not source.is_initializer():
            continue
        if source.dtype not in FLOAT_TYPES or source.dtype == target:
            continue
        output = node.outputs[0]
        if output.is_graph_output():
            continue
        stored_tensor = source.const_value
        stored_type = source.meta.get(STORED_TYPE_KEY, source.dtype)
        shape = ir.Shape(stored_tensor.shape.numpy())
        lazy = ir.LazyTensor(
            _converter(stored_tensor, numpy_type(target)), dtype=target, shape=shape, name=str(output.name)
        )
        name = str(output.name)
        replacement = ir.Value(name=f"{name}/lifted", type=ir.TensorType(target), shape=shape)
        replacement.const_value = lazy
        replacement.meta[STORED_TYPE_KEY] = stored_type
        output.replace_all_uses_with(replacement)
        graph.remove(node, safe=True)
        if not source.uses() and not source.is_graph_output():
            graph.initializers.pop(str(source.name), None)
        replacement.name = name
        graph.register_initializer(replacement)
        lifted += 1
    return lifted


def _converter(tensor: ir.TensorProtocol, dtype: np.dtype):
    """A closure that reads `tensor` and converts it to `dtype` (for `ir.LazyTensor`)."""

    def convert() -> ir.TensorProtocol:
        return ir.tensor(np.asarray(tensor.numpy()).astype(dtype))

    return convert


ConversionMaker = Callable[[ir.Value, ir.DataType, str], ir.Node]
"""(stored weight, computed type, name) -> the node converting it: ONNX ``Cast`` by default;
the OpenVINO IR frontend makes its dialect's ``Convert``."""


def onnx_cast(value: ir.Value, dtype: ir.DataType, name: str) -> ir.Node:
    """``Cast(value, to=dtype)``."""
    return ir.node("Cast", [value], {"to": dtype}, name=name)


def restore_decompression(model: ir.Model, make: ConversionMaker = onnx_cast) -> int:
    """Store every lifted weight still read as float back in its stored type, behind a conversion.

    A weight a pass rewrote (SmoothQuant's folded scales) is rounded to the stored type once, as
    the source model stored it. Returns the number of weights restored.
    """
    graph = model.graph
    restored = 0
    for node in list(graph):
        for index, value in enumerate(node.inputs):
            if value is None or not value.is_initializer() or value.const_value is None:
                continue
            stored = value.meta.get(STORED_TYPE_KEY)
            if stored is None or value.dtype not in FLOAT_TYPES or value.dtype == stored:
                continue
            cast = _restore(graph, value, stored, node, make)
            node.replace_input_with(index, cast)  # the other readers were moved by _restore
            restored += 1
    return restored


def _restore(
    graph: ir.Graph, value: ir.Value, stored: ir.DataType, before: ir.Node, make: ConversionMaker
) -> ir.Value:
    """Replace the initializer `value` by its array in `stored` -> conversion, inserted before `before`."""
    name = str(value.name)
    array = np.asarray(value.const_value.numpy()).astype(numpy_type(stored))  # type: ignore[union-attr]
    stored_value = ir.Value(
        name=f"{name}/stored",
        type=ir.TensorType(stored),
        shape=value.shape,
        const_value=ir.tensor(array, dtype=stored, name=f"{name}/stored"),
    )
    graph.register_initializer(stored_value)
    cast = make(stored_value, value.dtype, f"{name}/Cast")  # type: ignore[arg-type]
    output = cast.outputs[0]
    output.type, output.shape = value.type, value.shape
    graph.insert_before(before, cast)
    value.replace_all_uses_with(output, replace_graph_outputs=True)
    graph.initializers.pop(name)
    output.name = name
    return output
