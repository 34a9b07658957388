"""OpenVINO IR in onnx_ir: one node per OpenVINO op, and back to an `openvino.Model`.

`from_openvino` reads an `openvino.Model` into an `ir.Model` whose nodes are in the
``org.openvinotoolkit`` domain: the op type is OpenVINO's, the node's version is the opset number
(``opset8`` -> 8), the attributes are OpenVINO's (also kept verbatim as JSON in the node's
metadata, so booleans and strings survive the trip), Parameters are graph inputs, Results graph
outputs and Constants initializers. `to_openvino_model` rebuilds the `openvino.Model` with
OpenVINO's `NodeFactory`, op by op, so a model read and rebuilt computes exactly what it did.

`read_openvino_ir` is how `qcompiler.io.load` reads an ``.xml``: the dialect graph, then lifted
(`standard_ops.lift`) so the ops the passes rewrite are ONNX ops. `to_openvino_model` builds
such mixed graphs too: OpenVINO ops by `NodeFactory`, ONNX ops by `standard_ops.BUILDERS`.
"""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common

from qcompiler.errors import UnsupportedModelError

DOMAIN = "org.openvinotoolkit"
ATTRIBUTES_KEY = "openvino.attributes"
VERSION_KEY = "openvino.version"

_ELEMENT_TYPES: dict[str, ir.DataType] = {
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
        return _ELEMENT_TYPES[type_name]
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

    from qcompiler.backends.openvino.standard_ops import lift

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


def to_openvino_model(model: ir.Model):  # ir.Model -> openvino.Model
    """Rebuild the `openvino.Model` of a dialect graph made by `from_openvino` (lifted or not).

    The graph's nodes are sorted topologically in place (nothing else changes).
    """
    import openvino as ov
    import openvino.opset13 as ops
    from openvino.utils.node_factory import NodeFactory

    factories: dict[str, NodeFactory] = {}
    built: dict[int, object] = {}  # id(ir.Value) -> openvino.Output
    parameters = []
    for value in model.graph.inputs:
        element = next(key for key, dtype in _ELEMENT_TYPES.items() if dtype == value.dtype)
        dims = (
            [dim if isinstance(dim, int) else -1 for dim in value.shape] if value.shape is not None else None
        )
        shape = ov.PartialShape(dims) if dims is not None else ov.PartialShape.dynamic()
        parameter = ops.parameter(shape, getattr(ov.Type, element), name=str(value.name))
        parameter.output(0).get_tensor().set_names({str(value.name)})
        parameters.append(parameter)
        built[id(value)] = parameter.output(0)
    for value in model.graph.initializers.values():
        assert value.const_value is not None
        constant = ops.constant(value.const_value.numpy())
        constant.set_friendly_name(str(value.name).removesuffix(":0"))
        built[id(value)] = constant.output(0)
    ir.passes.common.TopologicalSortPass()(model)  # the passes append what they insert
    quantizers: dict[int, tuple[ir.Node, list]] = {}  # id(Q output) -> (Q, its OpenVINO inputs)
    for node in model.graph:
        # a QuantizeLinear's output is not built: its DequantizeLinear becomes the FakeQuantize
        arguments = [built.get(id(value)) if value is not None else None for value in node.inputs]
        if node.domain != DOMAIN:
            created = _standard(node, arguments, quantizers)
            if created is not None:
                created.set_friendly_name(str(node.name))
                for index, output in enumerate(node.outputs):
                    created.output(index).get_tensor().add_names({str(output.name)})
                    built[id(output)] = created.output(index)
            continue
        version = node.metadata_props.get(VERSION_KEY, f"opset{node.version or 1}")
        factory = factories.setdefault(version, NodeFactory(version))
        created = factory.create(node.op_type, arguments, attributes_of(node))
        created.set_friendly_name(str(node.name))
        for index, output in enumerate(node.outputs):
            created.output(index).get_tensor().set_names({str(output.name)})
            built[id(output)] = created.output(index)
    results = [ops.result(built[id(value)]) for value in model.graph.outputs]
    return ov.Model(results, parameters, model.graph.name or "model")


def _standard(node: ir.Node, arguments: list, quantizers: dict[int, tuple[ir.Node, list]]):
    """The OpenVINO node of an ONNX node in a lifted graph (None for a QuantizeLinear: its DQ builds it)."""
    from qcompiler.backends.openvino.standard_ops import BUILDERS, fake_quantize

    where = f"node {node.name!r}: {node.domain or 'ai.onnx'}::{node.op_type}"
    if node.domain not in ("", "ai.onnx"):
        raise UnsupportedModelError(f"{where} is not an OpenVINO op")
    if node.op_type == "QuantizeLinear":
        quantizers[id(node.outputs[0])] = (node, arguments)
        return None
    if node.op_type == "DequantizeLinear":
        source = node.inputs[0]
        if source is None or id(source) not in quantizers:
            raise UnsupportedModelError(f"{where}: only Q -> DQ pairs and canonical weights are lowered")
        quantize, quantize_arguments = quantizers[id(source)]
        if id(quantize) not in quantizers:  # one FakeQuantize per Q, however many DQs read it
            quantizers[id(quantize)] = (quantize, [fake_quantize(quantize, quantize_arguments)])
        return quantizers[id(quantize)][1][0]
    if node.op_type not in BUILDERS:
        raise UnsupportedModelError(f"{where} has no OpenVINO lowering in a graph read from OpenVINO IR")
    return BUILDERS[node.op_type](node, arguments)
