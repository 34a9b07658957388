"""TensorRT's ONNX-parser rules for explicit quantization, as code (`../shared/TENSORRT.md` §1, §6).

No machine here can run TensorRT's parser (its builder needs a CUDA device), so each rule below
re-states one check of onnx-tensorrt's ``QuantDequantLinearHelper`` or an ``NvInfer.h`` layer
rule, with the parser's own wording in the message where it has one. `check` runs the structural
rules on every lowered model; with ``strongly_typed`` (the artifact after `finalize`) also the
rules about the FP16 remainder and onnx's own full checker.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import onnx_ir as ir

from qcompiler.errors import LegalityError

TRT_DOMAIN = "trt"
QUANTIZED_TYPES = frozenset(
    {ir.DataType.INT8, ir.DataType.FLOAT8E4M3FN, ir.DataType.INT4, ir.DataType.FLOAT4E2M1}
)
"""What TensorRT quantizes to: "TensorRT only allows FP8, INT8, INT4, and FP4 quantization"."""
SCALE_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16})
GEMMS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose"})
MAX_OPSET = 25
"""The highest default-domain opset TensorRT 11.x parses (its ONNX opset guide)."""
TYPE_OPSETS = {
    ir.DataType.FLOAT8E4M3FN: 19,
    ir.DataType.FLOAT16: 19,
    ir.DataType.BFLOAT16: 19,
    ir.DataType.INT4: 21,
    ir.DataType.FLOAT4E2M1: 23,
}
"""The first opset whose QuantizeLinear / DequantizeLinear take this code or scale type."""
LARGE_FLOAT32 = 1024
"""An FP32 initializer with more elements than this is a weight left in FP32 (a strongly typed
network runs it in FP32)."""


def _is_qdq(node: ir.Node, op_type: str | None = None) -> bool:
    ops = (op_type,) if op_type else ("QuantizeLinear", "DequantizeLinear")
    return node.domain in ("", "ai.onnx", TRT_DOMAIN) and node.op_type in ops


def _constant(value: ir.Value | None) -> np.ndarray | None:
    """The value of an initializer or a Constant node's output (None if computed)."""
    if value is None:
        return None
    if value.const_value is not None:
        return np.asarray(value.const_value.numpy())
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant":
        attribute = producer.attributes.get("value")
        if attribute is not None and attribute.type == ir.AttributeType.TENSOR:
            return np.asarray(attribute.value.numpy())
    return None


def _rooted_at_constant(value: ir.Value | None) -> bool:
    """A weight: a constant, or a Q of a constant (what the parser reads as an IConstantLayer)."""
    if value is None:
        return False
    if _constant(value) is not None:
        return True
    producer = value.producer()
    return (
        producer is not None
        and _is_qdq(producer, "QuantizeLinear")
        and _constant(producer.inputs[0]) is not None
    )


def quantized_type(node: ir.Node) -> ir.DataType:
    """The type a QuantizeLinear produces as TensorRT reads it: zero point, else output_dtype, else INT8."""
    zero = node.inputs[2] if len(node.inputs) > 2 else None
    if zero is not None and zero.dtype is not None:
        return zero.dtype
    output_dtype = node.attributes.get_int("output_dtype", 0)
    return ir.DataType(output_dtype) if output_dtype else ir.DataType.INT8


def _dq_input_type(node: ir.Node) -> ir.DataType | None:
    source = node.inputs[0]
    if source is None:
        return None
    producer = source.producer()
    if producer is not None and _is_qdq(producer, "QuantizeLinear"):
        return quantized_type(producer)
    return source.dtype


def _quantize_types(model: ir.Model) -> list[str]:
    problems = []
    for node in model.graph:
        if _is_qdq(node, "QuantizeLinear"):
            kind = quantized_type(node)
            if kind not in QUANTIZED_TYPES:
                problems.append(
                    f"{node.name}: quantizes to {kind}: TensorRT only allows FP8, INT8, INT4, and FP4 quantization"
                )
            elif kind in (ir.DataType.INT4, ir.DataType.FLOAT4E2M1) and not _rooted_at_constant(
                node.inputs[0]
            ):
                problems.append(
                    f"{node.name}: a {kind} QuantizeLinear on an activation (TensorRT takes 4-bit weights only, "
                    "FP4 activations through trt::TRT_FP4DynamicQuantize)"
                )
            zero = node.inputs[2] if len(node.inputs) > 2 else None
            if zero is None and not node.attributes.get_int("output_dtype", 0):
                problems.append(
                    f"{node.name}: QuantizeLinear without zero point or output_dtype: TensorRT imports it as INT8"
                )
        elif _is_qdq(node, "DequantizeLinear"):
            source_kind = _dq_input_type(node)
            if (
                source_kind is not None
                and source_kind not in QUANTIZED_TYPES
                and source_kind != ir.DataType.INT32
            ):
                problems.append(
                    f"{node.name}: dequantizes {source_kind}: TensorRT only allows FP8, INT8, INT4, and FP4 quantization"
                )
            elif source_kind == ir.DataType.INT32:
                problems.append(f"{node.name}: an int32 bias DequantizeLinear (TensorRT keeps biases float)")
    return problems


def _zero_points(model: ir.Model) -> list[str]:
    problems = []
    for node in model.graph:
        if not _is_qdq(node) or len(node.inputs) < 3 or node.inputs[2] is None:
            continue
        zero, scale = node.inputs[2], node.inputs[1]
        values = _constant(zero)
        if values is None:
            if zero.dtype != ir.DataType.FLOAT8E4M3FN:
                problems.append(f"{node.name}: the zero point must be a build-time constant")
            continue
        if zero.dtype != ir.DataType.FLOAT8E4M3FN and np.any(values.astype(np.float32) != 0):
            problems.append(
                f"{node.name}: Non-zero zero point is not supported (symmetric quantization only)"
            )
        scales = _constant(scale)
        if scales is not None and values.size != scales.size:
            problems.append(
                f"{node.name}: zero point has {values.size} values, scale {scales.size} (must match)"
            )
        if node.op_type == "DequantizeLinear" and "output_dtype" in node.attributes:
            problems.append(
                f"{node.name}: a DequantizeLinear with both a zero point and output_dtype "
                "(Mismatch between attribute output_dtype and zero-point data type, TensorRT <= 10.15)"
            )
    return problems


def _scales(model: ir.Model) -> list[str]:
    problems = []
    for node in model.graph:
        if not _is_qdq(node) or len(node.inputs) < 2 or node.inputs[1] is None:
            continue
        scale = node.inputs[1]
        if scale.dtype not in SCALE_TYPES:
            problems.append(f"{node.name}: scale of type {scale.dtype} (FP32, FP16 or BF16 only)")
        values = _constant(scale)
        if values is not None and not np.all(
            np.isfinite(values.astype(np.float32)) & (values.astype(np.float32) > 0)
        ):
            problems.append(f"{node.name}: Scale coefficients must all be positive (and finite)")
        source = node.inputs[0]
        if node.op_type == "QuantizeLinear" and source is not None and source.dtype != scale.dtype:
            problems.append(
                f"{node.name}: scale is {scale.dtype}, input {source.dtype}: for strongly typed networks the "
                "scale must match the input data type"
            )
    return problems


def _granularity(model: ir.Model) -> list[str]:
    problems = []
    for node in model.graph:
        if not _is_qdq(node) or len(node.inputs) < 2:
            continue
        data, scale = node.inputs[0], node.inputs[1]
        if data is None or scale is None or scale.shape is None or data.shape is None:
            continue
        scale_dims = [int(dim) if isinstance(dim, int) else -1 for dim in scale.shape]
        volume = int(np.prod(scale_dims)) if scale_dims else 1
        if volume == 1:
            continue
        if not _rooted_at_constant(data):
            problems.append(
                f"{node.name}: Activations cannot be quantized per-channel or per-block (per-tensor only)"
            )
            continue
        dims = [int(dim) if isinstance(dim, int) else -1 for dim in data.shape]
        rank = len(dims)
        if len(scale_dims) == 1:
            axis = node.attributes.get_int("axis", 1) % rank
            if scale_dims[0] != dims[axis]:
                problems.append(
                    f"{node.name}: The number of scales is not equal to the number of output channels "
                    f"({scale_dims[0]} scales, axis {axis} has {dims[axis]})"
                )
            continue
        problems.extend(
            f"{node.name}: {problem}" for problem in _block_problems(dims, scale_dims, data.dtype)
        )
    return problems


def _block_problems(dims: list[int], scale_dims: list[int], dtype: ir.DataType | None) -> list[str]:
    if len(scale_dims) != len(dims):
        return [f"Invalid rank for the scale tensor (rank {len(scale_dims)}, input rank {len(dims)})"]
    blocked = [axis for axis, (size, count) in enumerate(zip(dims, scale_dims, strict=True)) if size != count]
    if len(blocked) != 1:
        return [f"Only a single blocking dimension is allowed (scale {scale_dims} for input {dims})"]
    axis = blocked[0]
    problems = []
    if len(dims) > 2:
        problems.append(f"block quantization of a rank-{len(dims)} tensor (TensorRT blocks 2-D weights)")
    if axis < len(dims) - 2:
        problems.append(f"blocked axis {axis} is neither the last nor the second-to-last")
    if dims[axis] % scale_dims[axis]:
        problems.append("Inferred block size is not an integer")
    if dtype in (ir.DataType.INT4, ir.DataType.FLOAT4E2M1) and int(np.prod(dims)) % 2:
        problems.append("4-bit quantization requires an even number of elements")
    return problems


def _opset(model: ir.Model) -> list[str]:
    opset = model.opset_imports.get("", 0)
    problems = []
    if not 9 <= opset <= MAX_OPSET:
        problems.append(f"model: opset {opset} is outside what TensorRT parses (9 to {MAX_OPSET})")
    needed: dict[ir.DataType, str] = {}
    for node in model.graph:
        if not _is_qdq(node):
            continue
        for value in node.inputs:
            if value is not None and value.dtype in TYPE_OPSETS:
                needed.setdefault(value.dtype, str(node.name))
        if node.attributes.get_int("block_size", 0):
            needed.setdefault(ir.DataType.INT4, str(node.name))  # block_size came with opset 21
    for dtype, name in needed.items():
        if opset < TYPE_OPSETS[dtype]:
            problems.append(
                f"{name}: {dtype} Q/DQ (or block_size) needs opset {TYPE_OPSETS[dtype]}, the model has {opset}"
            )
    return problems


def required_ir_version(model: ir.Model) -> int:
    """The lowest IR version onnx allows for the model's opsets (opset 19: 9, 21: 10, 23: 11)."""
    opsets = [onnx.helper.make_opsetid(domain, version) for domain, version in model.opset_imports.items()]
    return int(onnx.helper.find_min_ir_version_for(opsets, ignore_unknown=True))


def _ir_version(model: ir.Model) -> list[str]:
    needed = required_ir_version(model)
    if model.ir_version is not None and model.ir_version < needed:
        return [
            f"model: IR version {model.ir_version} is below {needed}, the first one that allows its opsets"
        ]
    return []


def _cast_before_gemm(model: ir.Model) -> list[str]:
    problems = []
    for node in model.graph:
        if node.op_type != "Cast" or node.inputs[0] is None:
            continue
        producer = node.inputs[0].producer()
        if producer is None or not _is_qdq(producer, "DequantizeLinear"):
            continue
        for use in node.outputs[0].uses():
            if use.node.op_type in GEMMS:
                problems.append(
                    f"{node.name}: a Cast between {producer.name} and {use.node.name} (breaks Q/DQ fusion)"
                )
    return problems


def _domains(model: ir.Model) -> list[str]:
    problems = []
    for node in model.graph:
        if node.domain in ("", "ai.onnx"):
            continue
        if node.domain == TRT_DOMAIN:
            if TRT_DOMAIN not in model.opset_imports:
                problems.append(f"{node.name}: domain {TRT_DOMAIN!r} is not declared in opset_import")
            continue
        problems.append(f"{node.name}: {node.domain}.{node.op_type} has no TensorRT importer")
    return problems


def _float16_remainder(model: ir.Model) -> list[str]:
    """Strongly typed: weighted ops compute in FP16 / BF16 and no large FP32 weight is left."""
    problems = []
    for node in model.graph:
        if node.op_type in GEMMS and node.outputs[0].dtype == ir.DataType.FLOAT:
            weight = node.inputs[1] if len(node.inputs) > 1 else None
            producer = weight.producer() if weight is not None else None
            if _rooted_at_constant(weight) or (producer is not None and _is_qdq(producer)):
                problems.append(
                    f"{node.name}: {node.op_type} computes in FP32 (a strongly typed network runs it in FP32)"
                )
    for value in model.graph.initializers.values():
        if (
            value.dtype == ir.DataType.FLOAT
            and value.const_value is not None
            and value.const_value.size > LARGE_FLOAT32
        ):
            problems.append(
                f"{value.name}: FP32 initializer of {value.const_value.size} values left in the FP16 model"
            )
    return problems


RULES: dict[str, Callable[[ir.Model], list[str]]] = {
    "quantize-types": _quantize_types,
    "zero-points": _zero_points,
    "scales": _scales,
    "granularity": _granularity,
    "opset": _opset,
    "cast-before-gemm": _cast_before_gemm,
    "domains": _domains,
}
STRONGLY_TYPED_RULES: dict[str, Callable[[ir.Model], list[str]]] = {
    "float16-remainder": _float16_remainder,
    "ir-version": _ir_version,
}
"""Rules of the finished artifact (after `finalize`), not of the canonical form the stages pass on."""


def onnx_checker(model: ir.Model) -> list[str]:
    """The full `onnx.checker` (types and shapes inferred), for a model whose weights are in memory."""
    if any(isinstance(value.const_value, ir.ExternalTensor) for value in model.graph.initializers.values()):
        return []  # not checked: the proto would reference weights stored elsewhere
    try:
        onnx.checker.check_model(ir.to_proto(model), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        return [f"model: onnx.checker: {str(error).splitlines()[0]}"]
    return []


def problems_of(model: ir.Model, *, strongly_typed: bool = False) -> list[str]:
    """Every broken rule, as ``[rule] node: what``."""
    rules = {**RULES, **STRONGLY_TYPED_RULES, "onnx-checker": onnx_checker} if strongly_typed else RULES
    return [f"[{name}] {problem}" for name, rule in rules.items() for problem in rule(model)]


def check(model: ir.Model, *, strongly_typed: bool = False) -> None:
    """Raise `LegalityError` listing every broken rule (rule name and node)."""
    problems = problems_of(model, strongly_typed=strongly_typed)
    if problems:
        raise LegalityError.listing("TensorRT's rules", problems)
