"""Checks on the input model before any work, each error naming the file and the node or option.

Not already quantized, a precision the target's runtime runs, OpenVINO IR only for OpenVINO
targets; an opset below what the target's form needs is upgraded, not refused.
"""

from __future__ import annotations

import onnx_ir as ir

from qcompiler import io, precision
from qcompiler.errors import OptionError, UnsupportedModelError
from qcompiler.opset import upgrade_opset
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


def refuse_unknown_ops(model: ir.Model, target: Target, unknown: list[ir.Node]) -> None:
    """Ops the target's runtime does not have fail now, not as a legality failure after the compile."""
    if not unknown:
        return
    source = model.meta.get(io.SOURCE_PATH_KEY, "the model")
    first = unknown[0]
    kinds = sorted({f"{node.domain or 'ai.onnx'}.{node.op_type}" for node in unknown})
    raise UnsupportedModelError(
        f"{source}: node {first.name!r} is {first.domain or 'ai.onnx'}.{first.op_type}, an op the runtime of "
        f"{target.name} does not have ({len(unknown)} such nodes: {', '.join(kinds[:5])}"
        f"{' ...' if len(kinds) > 5 else ''})"
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


def upgrade_old_opset(model: ir.Model, target: Target) -> str | None:
    """Raise the opset to what the target's form needs (onnx's version converter); the report line.

    The target's minimum (per-channel QuantizeLinear: 13), and 19 where Q/DQ scales will be FP16 /
    BF16. A model in the OpenVINO dialect has no ONNX opset to raise. Only a conversion that fails
    is an error: it names the file and the converter's complaint (the op and the opset step).
    """
    if io.source_format(model) is io.SourceFormat.OPENVINO_IR:
        return None
    needed = target.min_opset
    if precision.reduced_activations(model):
        needed = max(needed, precision.REDUCED_SCALE_OPSET)
    current = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
    if current >= needed:
        return None
    source = model.meta.get(io.SOURCE_PATH_KEY, "the model")
    try:
        upgrade_opset(model, needed)
    except Exception as exc:  # the converters raise RuntimeError / ConversionError / ValueError
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedModelError(
            f"{source}: opset {current} could not be upgraded to {needed} for {target.name} ({first})"
        ) from exc
    return f"upgraded: opset {current} -> {needed} (onnx version converter) for {target.name}"


def refuse_unrunnable_precision(model: ir.Model, target: Target, runnable: frozenset[ir.DataType]) -> None:
    """A model whose precision the target's runtime cannot run at all fails here, before any work."""
    found = precision.model_precision(model)
    if found in runnable:
        return
    source = model.meta.get(io.SOURCE_PATH_KEY, "the model")
    first = next(
        (
            node
            for node in model.graph
            if any(v is not None and v.dtype == found for v in (*node.inputs, *node.outputs))
        ),
        None,
    )
    where = (
        f" (first {precision.precision_name(found)} node: {first.op_type} {first.name!r})" if first else ""
    )
    raise UnsupportedModelError(
        f"{source}: a {precision.precision_name(found)} model; {target.name} has no "
        f"{precision.precision_name(found)} kernels{where}. Compile it for openvino-cpu, or convert it to float16"
    )


def relax_nonpositive_dims(model: ir.Model) -> list[str]:
    """Declared input sizes of 0 or below become dynamic axes; the names of the inputs changed.

    Paddle2ONNX and others write -1 for a dynamic axis and the data check reads it so
    (`InputSpec.from_value`); runtimes do not agree (onnxruntime takes 0 literally, and refuses
    any batch that is not empty), so the model is made to say what the data check assumed.
    """
    changed = []
    for value in model.graph.inputs:
        if value.shape is None or value.is_initializer():
            continue
        dims = [
            ir.SymbolicDim(f"{value.name}_dim{axis}") if isinstance(dim, int) and dim <= 0 else dim
            for axis, dim in enumerate(value.shape)
        ]
        if dims != list(value.shape):
            value.shape = ir.Shape(dims)
            changed.append(str(value.name))
    return changed
