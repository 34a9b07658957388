"""The standard ONNX ops an OpenVINO dialect graph is rewritten in, both ways.

The rewrite passes match ONNX op types. A model read from OpenVINO IR (`dialect.from_openvino`)
is *lifted* so the ops they look at are spelled as ONNX: ``MatMul`` (a constant weight stored
[N, K] with ``transpose_b`` becomes an initializer [K, N]), ``Multiply`` -> ``Mul``, ``Add``,
``Gather`` (its constant axis input becomes the attribute). Every other op stays an OpenVINO op
(``org.openvinotoolkit``). The passes then add ONNX ops of their own (QuantizeLinear ->
DequantizeLinear pairs, SmoothQuant's Mul, calibration's Reshape / Transpose / MatMul / Shape).

`build` is the way back: the OpenVINO op computing each such ONNX node, used by
`dialect.to_openvino_model` for mixed graphs. A Q -> DQ pair becomes one FakeQuantize (the form
OpenVINO's ONNX frontend gives it); compressed weights never reach here (`lower.to_openvino`
detaches them first and attaches their decompression subgraphs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir

from qcompiler.errors import UnsupportedModelError

STANDARD_OPSET = 21
"""The ONNX opset of the lifted ops and of what the passes insert (blocked DequantizeLinear)."""

_ELEMENTWISE = {"Multiply": "Mul", "Add": "Add"}


def lift(model: ir.Model) -> int:
    """Rewrite the OpenVINO MatMul / Multiply / Add / Gather nodes the passes read as ONNX ops.

    Only exact rewrites: elementwise ops with numpy broadcasting, MatMuls without ``transpose_a``
    whose ``transpose_b`` operand (if any) is a constant matrix, Gathers with a constant scalar
    axis and no batch dimensions. Returns the number of nodes rewritten.
    """
    from qcompiler.backends.openvino.dialect import DOMAIN, attributes_of

    graph = model.graph
    lifted = 0
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


Builder = Callable[[ir.Node, Sequence[object]], object]
"""(ONNX node, its OpenVINO inputs) -> the OpenVINO node computing it."""


def _gather(node: ir.Node, arguments: Sequence[object]) -> object:
    import openvino.opset13 as ops

    axis = node.attributes.get_int("axis", 0)
    return ops.gather(arguments[0], arguments[1], ops.constant(np.int64(axis)))


def _reshape(node: ir.Node, arguments: Sequence[object]) -> object:
    import openvino.opset13 as ops

    return ops.reshape(arguments[0], arguments[1], special_zero=not node.attributes.get_int("allowzero", 0))


def _transpose(node: ir.Node, arguments: Sequence[object]) -> object:
    import openvino.opset13 as ops

    perm = node.attributes.get_ints("perm", None)
    if perm is None:
        raise UnsupportedModelError(f"node {node.name!r}: Transpose without perm is not lowered to OpenVINO")
    return ops.transpose(arguments[0], ops.constant(np.array(perm, np.int64)))


def _binary(name: str) -> Builder:
    def build(node: ir.Node, arguments: Sequence[object]) -> object:
        import openvino.opset13 as ops

        return getattr(ops, name)(arguments[0], arguments[1])

    return build


def _matmul(node: ir.Node, arguments: Sequence[object]) -> object:
    import openvino.opset13 as ops

    return ops.matmul(arguments[0], arguments[1], False, False)


def _concat(node: ir.Node, arguments: Sequence[object]) -> object:
    import openvino.opset13 as ops

    return ops.concat(list(arguments), node.attributes.get_int("axis", 0))


def _shape(node: ir.Node, arguments: Sequence[object]) -> object:
    import openvino.opset13 as ops

    return ops.shape_of(arguments[0], "i64")


BUILDERS: dict[str, Builder] = {
    "MatMul": _matmul,
    "Mul": _binary("multiply"),
    "Add": _binary("add"),
    "Gather": _gather,
    "Reshape": _reshape,
    "Transpose": _transpose,
    "Shape": _shape,
    "Concat": _concat,
}
"""The ONNX ops a lifted graph may hold besides Q / DQ, and how each is built in OpenVINO."""

_LEVELS = {
    ir.DataType.INT8: (-128, 127),
    ir.DataType.UINT8: (0, 255),
    ir.DataType.INT16: (-32768, 32767),
    ir.DataType.UINT16: (0, 65535),
}


def fake_quantize(quantize: ir.Node, arguments: Sequence[object]) -> object:
    """The FakeQuantize computing QuantizeLinear(`quantize`) -> DequantizeLinear.

    `arguments` are the OpenVINO inputs of `quantize` (x; scale and zero point are read from
    its constant inputs). Range [(qmin - zp) * s, (qmax - zp) * s] with qmax - qmin + 1 levels.
    """
    import openvino.opset13 as ops

    scale_value, zero_value = quantize.inputs[1], (quantize.inputs[2] if len(quantize.inputs) > 2 else None)
    if scale_value is None or scale_value.const_value is None:
        raise UnsupportedModelError(f"node {quantize.name!r}: QuantizeLinear scale is not a constant")
    scale = scale_value.const_value.numpy().astype(np.float32)
    if zero_value is not None and zero_value.const_value is not None:
        zero_point = zero_value.const_value.numpy().astype(np.float32)
        dtype = zero_value.dtype
    else:
        zero_point, dtype = np.zeros_like(scale), ir.DataType.UINT8
    if dtype not in _LEVELS:
        raise UnsupportedModelError(
            f"node {quantize.name!r}: {dtype} activations are not lowered to OpenVINO"
        )
    low, high = _LEVELS[dtype]
    x = quantize.inputs[0]
    if scale.size > 1 and x is not None and x.shape is not None:  # per axis: broadcast along the axis
        axis = quantize.attributes.get_int("axis", 1) % len(x.shape)
        shape = [1] * len(x.shape)
        shape[axis] = -1
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    lower = ops.constant(((low - zero_point) * scale).astype(np.float32))
    upper = ops.constant(((high - zero_point) * scale).astype(np.float32))
    return ops.fake_quantize(arguments[0], lower, upper, lower, upper, high - low + 1)
