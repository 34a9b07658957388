"""OpenVINO IR as a frontend: ``.xml`` + ``.bin`` read into onnx_ir in the OpenVINO dialect, then lifted.

`from_openvino` reads an `openvino.Model` into an `ir.Model` whose nodes are in the
``org.openvinotoolkit`` domain: the op type is OpenVINO's, the node's version is the opset number
(``opset8`` -> 8), the attributes are OpenVINO's (also kept verbatim as JSON in the node's
metadata, so booleans and strings survive the trip), Parameters are graph inputs, Results graph
outputs and Constants initializers. The OpenVINO backend (`backends/openvino/dialect.py`) builds
such a graph back into an `openvino.Model`.

`lift` then rewrites the ops the passes read as ONNX ops: ``MatMul`` (a constant weight stored
[N, K] with ``transpose_b`` becomes an initializer [K, N]), ``Multiply`` -> ``Mul``, ``Add``,
``Gather`` (its constant axis input becomes the attribute). Every other op stays an OpenVINO op.

Reading is core's business (`qcompiler.io.load` dispatches ``.xml`` here); building and running
are the backend's. Both sides share the dialect's vocabulary defined here.
"""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np
import onnx_ir as ir

from qcompiler.decompression import lift_decompression
from qcompiler.errors import UnsupportedModelError
from qcompiler.precision import STORED_TYPE_KEY

DOMAIN = "org.openvinotoolkit"
ATTRIBUTES_KEY = "openvino.attributes"
VERSION_KEY = "openvino.version"
STANDARD_OPSET = 21
"""The ONNX opset of the lifted ops and of what the passes insert (blocked DequantizeLinear)."""

ELEMENT_TYPES: dict[str, ir.DataType] = {
    "f32": ir.DataType.FLOAT,
    "f16": ir.DataType.FLOAT16,
    "bf16": ir.DataType.BFLOAT16,
    "f64": ir.DataType.DOUBLE,
    "i64": ir.DataType.INT64,
    "i32": ir.DataType.INT32,
    "i16": ir.DataType.INT16,
    "i8": ir.DataType.INT8,
    "u64": ir.DataType.UINT64,
    "u32": ir.DataType.UINT32,
    "u16": ir.DataType.UINT16,
    "u8": ir.DataType.UINT8,
    "boolean": ir.DataType.BOOL,
}
"""OpenVINO element types this dialect reads (the ones an exported float model holds)."""


def _element_type(type_name: str, where: str) -> ir.DataType:
    try:
        return ELEMENT_TYPES[type_name]
    except KeyError:
        raise UnsupportedModelError(f"{where}: OpenVINO element type {type_name} is not read yet") from None


def _value(output, default_name: str) -> ir.Value:  # openvino.Output -> ir.Value
    names = sorted(output.get_names())
    element = output.get_element_type().get_type_name()
    shape = output.get_partial_shape()
    dims = [dim.get_length() if dim.is_static else None for dim in shape] if shape.rank.is_static else None
    return ir.Value(
        name=names[0] if names else default_name,
        type=ir.TensorType(_element_type(element, default_name)),
        shape=ir.Shape(dims) if dims is not None else None,
    )


def _attribute(name: str, value: object) -> ir.Attr | None:
    """An onnx_ir attribute for Netron and the passes (None where ONNX has no such type)."""
    if isinstance(value, bool | int):
        return ir.AttrInt64(name, int(value))
    if isinstance(value, float):
        return ir.AttrFloat32(name, value)
    if isinstance(value, str):
        return ir.AttrString(name, value)
    if isinstance(value, list) and all(
        isinstance(item, int) and not isinstance(item, bool) for item in value
    ):
        return ir.AttrInt64s(name, value)
    if isinstance(value, list) and all(isinstance(item, float | int) for item in value):
        return ir.AttrFloat32s(name, [float(item) for item in value])
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return ir.AttrStrings(name, value)
    return None


def from_openvino(model) -> ir.Model:  # openvino.Model -> ir.Model
    """The OpenVINO model as an onnx_ir graph in the OpenVINO dialect (see the module docstring)."""
    values: dict[tuple[str, int], ir.Value] = {}
    inputs = []
    for parameter in model.get_parameters():  # in the model's order, not the topological one
        value = _value(parameter.output(0), parameter.get_friendly_name())
        inputs.append(value)
        values[_key(parameter.output(0))] = value
    initializers, nodes = [], []
    for op in model.get_ordered_ops():
        kind, name = op.get_type_name(), op.get_friendly_name()
        where = f"{kind} {name!r}"
        if kind in ("Parameter", "Result"):
            continue
        if kind == "Constant":
            element = op.get_output_element_type(0).get_type_name()
            array = np.array(op.get_data(), copy=True)
            dtype = _element_type(element, where)
            value = ir.Value(
                name=f"{name}:0",
                type=ir.TensorType(dtype),
                shape=ir.Shape(array.shape),
                const_value=ir.tensor(array, dtype=dtype, name=f"{name}:0"),
            )
            initializers.append(value)
            values[_key(op.output(0))] = value
            continue
        arguments = [values[_key(op.input_value(index))] for index in range(op.get_input_size())]
        raw = op.get_attributes()
        attributes = [attr for key, item in raw.items() if (attr := _attribute(key, item)) is not None]
        version = op.get_type_info().version_id
        node = ir.Node(
            DOMAIN,
            kind,
            arguments,
            attributes,
            num_outputs=op.get_output_size(),
            name=name,
            version=int(version[5:]) if version.startswith("opset") else None,
            metadata_props={ATTRIBUTES_KEY: json.dumps(raw), VERSION_KEY: version},
        )
        for index, output in enumerate(node.outputs):
            described = _value(op.output(index), f"{name}:{index}")
            output.name, output.type, output.shape = described.name, described.type, described.shape
            values[_key(op.output(index))] = output
        nodes.append(node)
    outputs = [values[_key(result.input_value(0))] for result in model.get_results()]
    graph = ir.Graph(inputs, outputs, nodes=nodes, initializers=initializers, name=model.get_friendly_name())
    graph.opset_imports[DOMAIN] = 1
    return ir.Model(graph, ir_version=10, producer_name="qcompiler (OpenVINO dialect)")


def is_openvino_dialect(model: ir.Model) -> bool:
    """Whether `model` holds OpenVINO ops (it was read from OpenVINO IR): it runs in OpenVINO only."""
    return DOMAIN in model.opset_imports or any(node.domain == DOMAIN for node in model.graph)


def attributes_of(node: ir.Node) -> dict:
    """The OpenVINO attributes of a dialect node, as OpenVINO gave them (booleans, strings)."""
    return json.loads(node.metadata_props.get(ATTRIBUTES_KEY, "{}"))


def read_openvino_ir(path: str | os.PathLike[str]) -> ir.Model:
    """Load ``.xml`` + ``.bin`` into the dialect, lifted so the passes see ONNX MatMul / Mul / Add / Gather."""
    import openvino as ov

    path = pathlib.Path(path)
    try:
        loaded = ov.Core().read_model(str(path))
    except RuntimeError as exc:
        raise UnsupportedModelError(f"{path}: OpenVINO cannot read it ({str(exc).splitlines()[0]})") from exc
    try:
        model = from_openvino(loaded)
    except UnsupportedModelError as exc:
        raise UnsupportedModelError(f"{path}: {exc}") from exc
    del loaded
    lift(model)
    return model


def _key(output) -> tuple[str, int]:  # openvino.Output -> a dictionary key
    """The node's unique name (``Convert_20``; friendly names may repeat) and the output index."""
    return (output.get_node().get_name(), output.get_index())


_ELEMENTWISE = {"Multiply": "Mul", "Add": "Add"}


def lift(model: ir.Model) -> int:
    """Rewrite the OpenVINO MatMul / Multiply / Add / Gather nodes the passes read as ONNX ops.

    Weight decompression (``Constant f16 -> Convert``) is lifted first (`decompression.lift_decompression`).

    Only exact rewrites: elementwise ops with numpy broadcasting, MatMuls without ``transpose_a``
    whose ``transpose_b`` operand (if any) is a constant matrix, Gathers with a constant scalar
    axis and no batch dimensions. Returns the number of nodes rewritten.
    """
    graph = model.graph
    # FP16-compressed weights (Constant f16 -> Convert f32): the Convert belongs to the weight
    lifted = lift_decompression(model)
    for node in list(graph):
        if node.domain != DOMAIN:
            continue
        attributes = attributes_of(node)
        replacement: ir.Node | None = None
        if node.op_type in _ELEMENTWISE and attributes.get("auto_broadcast") == "numpy":
            replacement = ir.node(_ELEMENTWISE[node.op_type], list(node.inputs), name=node.name)
        elif node.op_type == "MatMul" and not attributes["transpose_a"]:
            weight = node.inputs[1]
            if not attributes["transpose_b"]:
                replacement = ir.node("MatMul", list(node.inputs), name=node.name)
            elif weight is not None and weight.const_value is not None and len(weight.const_value.shape) == 2:
                transposed = _transposed_constant(graph, weight, node)
                replacement = ir.node("MatMul", [node.inputs[0], transposed], name=node.name)
        elif node.op_type == "Gather" and attributes.get("batch_dims", 0) == 0:
            axis = node.inputs[2]
            if axis is not None and axis.const_value is not None and axis.const_value.size == 1:
                value = int(axis.const_value.numpy().reshape(()))
                replacement = ir.node("Gather", list(node.inputs[:2]), {"axis": value}, name=node.name)
        if replacement is None:
            continue
        _replace(graph, node, replacement)
        lifted += 1
    model.opset_imports[""] = STANDARD_OPSET
    return lifted


def convert_node(value: ir.Value, dtype: ir.DataType, name: str) -> ir.Node:
    """An OpenVINO ``Convert`` of `value` to `dtype` in the dialect (`decompression.restore_decompression`)."""
    destination = {v: k for k, v in ELEMENT_TYPES.items()}[dtype]
    return ir.Node(
        DOMAIN,
        "Convert",
        [value],
        [ir.AttrString("destination_type", destination)],
        name=name,
        version=1,
        metadata_props={ATTRIBUTES_KEY: json.dumps({"destination_type": destination}), VERSION_KEY: "opset1"},
    )


def _transposed_constant(graph: ir.Graph, weight: ir.Value, reader: ir.Node) -> ir.Value:
    """`weight` [N, K] as [K, N]: in place when `reader` is its only reader, else a new initializer."""
    assert weight.const_value is not None
    array = np.ascontiguousarray(weight.const_value.numpy().T)
    if len(weight.uses()) == 1 and not weight.is_graph_output():
        weight.const_value = ir.tensor(array, name=weight.name)
        weight.shape = ir.Shape(array.shape)
        return weight
    name = f"{weight.name}/transposed"
    if name in graph.initializers:  # a second reader of a shared weight
        return graph.initializers[name]
    value = ir.Value(
        name=name, type=weight.type, shape=ir.Shape(array.shape), const_value=ir.tensor(array, name=name)
    )
    if STORED_TYPE_KEY in weight.meta:
        value.meta[STORED_TYPE_KEY] = weight.meta[STORED_TYPE_KEY]
    graph.register_initializer(value)
    return value


def _replace(graph: ir.Graph, old: ir.Node, new: ir.Node) -> None:
    """Put `new` where `old` was; its output takes over `old`'s name, type, shape and readers."""
    source, target = old.outputs[0], new.outputs[0]
    name = source.name
    target.type, target.shape = source.type, source.shape
    graph.insert_before(old, new)
    source.replace_all_uses_with(target, replace_graph_outputs=True)
    graph.remove(old, safe=True)
    target.name = name
    for value in old.inputs:
        if (
            value is not None
            and value.const_value is not None
            and not value.uses()
            and value.name in graph.initializers
        ):
            graph.initializers.pop(str(value.name))
