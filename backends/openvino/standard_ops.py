"""The OpenVINO op computing each ONNX op a lifted dialect graph holds (the way back from `lift`).

A model read from OpenVINO IR is lifted by the core frontend (`qcompiler.frontends.openvino_ir.lift`)
so the ops the passes read are ONNX ops; the passes then add ONNX ops of their own (QuantizeLinear
-> DequantizeLinear pairs, SmoothQuant's Mul, calibration's Reshape / Transpose / MatMul / Shape).
`BUILDERS` gives the OpenVINO op computing each, used by `dialect.to_openvino_model` for mixed
graphs. A Q -> DQ pair becomes one FakeQuantize (the form OpenVINO's ONNX frontend gives it);
compressed weights never reach here (`lower.to_openvino` detaches them first and attaches their
decompression subgraphs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir

from qcompiler.errors import UnsupportedModelError

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
