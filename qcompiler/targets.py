"""Target names and what each runtime can run: the data that rewrites and backends agree on.

A rewrite pass reads a `Target` to decide *what form* to emit (element types, where an output
quantizer is needed for fusion); the backend named by `Target.backend` lowers, checks and measures.
"""

from __future__ import annotations

import dataclasses

from qcompiler.errors import OptionError
from qcompiler.options import QuantType


@dataclasses.dataclass(frozen=True)
class Target:
    """Capabilities of one deployment target.

    Attributes:
        name: the user-facing name, e.g. ``ort-cpu``.
        backend: the package under ``qcompiler.backends`` that lowers to this target.
        description: one line for ``--help`` and the report.
        quantizable_ops: op types that can be placed under quantizers (``--op-types``).
        default_ops: the op types quantized when ``--op-types`` is not given (the fused kernels).
        activation_type: preferred activation element type (U8 is 1.5-3x faster than S8 on x86).
        weight_type: weight element type.
        output_quantized_ops: op types whose fused kernel needs a Q/DQ on the output
            (ORT's QLinearConv); other ops fuse with a float output (MatMulIntegerToFloat, QGemm).
        int32_bias_ops: op types whose bias input is quantized to int32 (scale = x_scale * w_scale).
        min_opset: lowest default-domain opset the emitted QDQ form needs (per-axis Q/DQ: 13).
        weight_ladder: the rungs `--max-drop` steps a weight down, most compressed first.
        activation_ladder: the same for activations.
    """

    name: str
    backend: str
    description: str
    quantizable_ops: frozenset[str]
    default_ops: frozenset[str]
    activation_type: QuantType
    weight_type: QuantType
    output_quantized_ops: frozenset[str]
    int32_bias_ops: frozenset[str]
    min_opset: int
    weight_ladder: tuple[str, ...] = ("int4", "int8", "float")
    activation_ladder: tuple[str, ...] = ("int8", "float")


ORT_CPU = Target(
    name="ort-cpu",
    backend="onnxruntime",
    description="ONNX Runtime CPU execution provider, x86-64 (U8 activations, S8 weights)",
    quantizable_ops=frozenset({"MatMul", "Gemm", "Conv", "Add", "Mul", "Softmax"}),
    default_ops=frozenset({"MatMul", "Gemm", "Conv"}),
    activation_type=QuantType.UINT8,
    weight_type=QuantType.INT8,
    output_quantized_ops=frozenset({"Conv"}),
    int32_bias_ops=frozenset({"Conv", "Gemm"}),
    min_opset=13,
    # No FP16 rung: not measured on onnxruntime CPU here; targets that run f16 (OpenVINO GPU) add one.
    weight_ladder=("int4", "int8", "float"),
    activation_ladder=("int8", "float"),
)

TARGETS: dict[str, Target] = {target.name: target for target in (ORT_CPU,)}


def get_target(name: str | Target) -> Target:
    """Look a target up by name; the error lists the known names."""
    if isinstance(name, Target):
        return name
    try:
        return TARGETS[name]
    except KeyError:
        known = ", ".join(sorted(TARGETS))
        raise OptionError(f"--target: unknown target {name!r} (known: {known})") from None
