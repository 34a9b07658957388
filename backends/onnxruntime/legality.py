"""The rules an artifact for onnxruntime CPU must satisfy, checked before it is saved.

Each rule returns the problems it finds as ``node name: what is wrong``; `check` raises one
`LegalityError` listing them all, so a target never receives a model it would reject or run slowly
in float by surprise.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import onnx_ir as ir

from qcompiler.backend import is_standard_op
from qcompiler.backends.onnxruntime.fp4_matmul import DOMAIN as FP4_DOMAIN
from qcompiler.backends.onnxruntime.fp4_matmul import OP_TYPE as FP4_OP
from qcompiler.errors import LegalityError

Q_TYPES = frozenset({ir.DataType.UINT8, ir.DataType.INT8})
DEQUANTIZABLE_TYPES = frozenset(
    {ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.INT4, ir.DataType.UINT4, ir.DataType.FLOAT8E4M3FN}
)
"""Weight types ORT CPU's DequantizeLinear runs (int4 from opset 21, float8 from 19; float4e2m1
is NOT_IMPLEMENTED)."""
WEIGHT_TYPES = DEQUANTIZABLE_TYPES | {ir.DataType.INT32}
"""Constant DQ inputs ORT CPU accepts: weights, and int32 biases."""


EXTENSIONS_DOMAIN = "ai.onnx.contrib"
"""onnxruntime-extensions' ops, registered in every session we make (`session.session_options`)."""


@functools.cache
def _cpu_kernels() -> frozenset[tuple[str, str]]:
    """(domain, op type) of every kernel onnxruntime's CPU provider registers."""
    from onnxruntime.capi.onnxruntime_pybind11_state import get_all_opkernel_def

    return frozenset(
        (kernel.domain, kernel.op_name)
        for kernel in get_all_opkernel_def()
        if kernel.provider == "CPUExecutionProvider"
    )


def has_kernel(node: ir.Node) -> bool:
    """Whether onnxruntime CPU runs `node`'s op: a kernel, a standard function it expands, our FP4 op, or an extensions op."""
    domain = "" if node.domain == "ai.onnx" else node.domain
    return (
        (domain, node.op_type) in _cpu_kernels()
        or is_standard_op(node)
        or (domain, node.op_type) == (FP4_DOMAIN, FP4_OP)
        or domain == EXTENSIONS_DOMAIN
    )


def unknown_ops(model: ir.Model) -> list[ir.Node]:
    """The nodes of `model` onnxruntime CPU has no kernel for (checked on the input, before any work)."""
    return [node for node in model.graph if not has_kernel(node)]


def _dq_single_consumer(model: ir.Model) -> list[str]:
    problems = []
    for node in model.graph:
        if node.op_type == "DequantizeLinear" and len(node.outputs[0].uses()) > 1:
            problems.append(
                f"{node.name}: DequantizeLinear feeds {len(node.outputs[0].uses())} nodes (ORT fuses only dedicated DQs)"
            )
    return problems


def _quantize_types(model: ir.Model) -> list[str]:
    problems = []
    for node in model.graph:
        if node.op_type == "QuantizeLinear":
            zero = node.inputs[2] if len(node.inputs) > 2 else None
            if zero is None or zero.dtype not in Q_TYPES:
                problems.append(
                    f"{node.name}: activation quantizer must be uint8/int8 with an explicit zero point"
                )
    return problems


def _constant_weight_zero_points(model: ir.Model) -> list[str]:
    problems = []
    for node in model.graph:
        if node.op_type != "DequantizeLinear" or node.inputs[0] is None or node.inputs[0].const_value is None:
            continue
        if node.inputs[0].dtype not in WEIGHT_TYPES | {ir.DataType.FLOAT4E2M1}:  # FP4: rule node-versions
            problems.append(
                f"{node.name}: constant of type {node.inputs[0].dtype} has no ORT CPU DequantizeLinear kernel"
            )
        zero = node.inputs[2] if len(node.inputs) > 2 else None
        if node.inputs[0].dtype is ir.DataType.INT32 and zero is not None and zero.const_value is not None:
            if zero.const_value.numpy().any():
                problems.append(f"{node.name}: int32 bias must have zero point 0")
    return problems


def _opset(model: ir.Model) -> list[str]:
    opset = model.opset_imports.get("", 0)
    return [] if opset >= 13 else [f"model: opset {opset} < 13 cannot express per-channel QDQ"]


def _node_versions(model: ir.Model) -> list[str]:
    opset = model.opset_imports.get("", 0)
    problems = []
    for node in model.graph:
        codes = node.inputs[0] if node.op_type == "DequantizeLinear" and node.inputs else None
        if codes is not None and codes.dtype == ir.DataType.FLOAT4E2M1:
            problems.append(
                f"{node.name}: onnxruntime CPU has no float4e2m1 DequantizeLinear kernel (MXFP4/NVFP4 weights); "
                "choose another --weights format for ort-cpu"
            )
        elif node.domain in ("", "ai.onnx") and node.version is not None and node.version > opset:
            problems.append(
                f"{node.name}: {node.op_type} needs opset {node.version} (model has {opset}); "
                "onnxruntime has no kernel this form lowers to"
            )
        elif node.domain == FP4_DOMAIN and node.op_type == FP4_OP:
            continue  # our packed-FP4 MatMul (onnxruntime-extensions Python op)
        elif node.domain not in ("", "ai.onnx", "com.microsoft"):
            problems.append(f"{node.name}: {node.domain}.{node.op_type} has no onnxruntime kernel")
    return problems


RULES: dict[str, Callable[[ir.Model], list[str]]] = {
    "dq-single-consumer": _dq_single_consumer,
    "quantize-types": _quantize_types,
    "constant-weight-types": _constant_weight_zero_points,
    "opset": _opset,
    "node-versions": _node_versions,
}


def check(model: ir.Model) -> None:
    """Raise `LegalityError` listing every broken rule (rule name and node)."""
    problems = [f"[{name}] {problem}" for name, rule in RULES.items() for problem in rule(model)]
    if problems:
        raise LegalityError.listing("onnxruntime CPU rules", problems)
