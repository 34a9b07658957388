"""Checks on the input model before any work, each error naming the file and the node or option.

Not already quantized, an opset high enough for the target's form, and OpenVINO IR only for
OpenVINO targets.
"""

from __future__ import annotations

import onnx_ir as ir

from qcompiler import io
from qcompiler.errors import OptionError, UnsupportedModelError
from qcompiler.targets import Target

QUANTIZED_OPS = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "MatMulNBits",
        "MatMulInteger",
        "ConvInteger",
        "QLinearMatMul",
        "QLinearConv",
        "QGemm",
        "FakeQuantize",
    }
)


def refuse_quantized(model: ir.Model) -> None:
    """A model that already holds quantized ops would be quantized twice: name the first one."""
    for node in model.graph:
        if node.op_type in QUANTIZED_OPS:
            source = model.meta.get(io.SOURCE_PATH_KEY, "the model")
            raise UnsupportedModelError(
                f"{source}: already quantized (node {node.name!r} is {node.op_type}); pass the float model"
            )


def check_openvino_input(model: ir.Model, target: Target, runs_openvino_ir: bool) -> bool:
    """Whether `model` was read from OpenVINO IR; such a model compiles for OpenVINO targets only."""
    if io.source_format(model) is not io.SourceFormat.OPENVINO_IR:
        return False
    if not runs_openvino_ir:
        source = model.meta.get(io.SOURCE_PATH_KEY, "the model")
        raise OptionError(
            f"{source}: an OpenVINO IR model compiles for openvino-cpu/gpu/npu only, not {target.name}; "
            "pass the ONNX model for onnxruntime targets"
        )
    return True


def require_opset(model: ir.Model, target: Target) -> None:
    """Fail before any work when the model's opset is below what the target's form needs."""
    opset = model.opset_imports.get("", 0)
    if opset < target.min_opset:
        source = model.meta.get(io.SOURCE_PATH_KEY, "the model")
        raise UnsupportedModelError(
            f"{source}: opset {opset} < {target.min_opset}, the lowest {target.name} can quantize "
            "(per-channel QuantizeLinear); re-export the model with a newer opset"
        )
