"""Target names and what each runtime can run: the data that rewrites and backends agree on.

A rewrite pass reads a `Target` to decide *what form* to emit (element types, where an output
quantizer is needed for fusion); the backend named by `Target.backend` lowers, checks and measures.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from qcompiler.errors import OptionError
from qcompiler.numerics import weight_type_beside
from qcompiler.options import CompileOptions, Preset, QuantType, RangeMethod, WeightFormat


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
        device: the OpenVINO device an ``openvino-*`` target compiles for (None: not OpenVINO).
        inference_precision: the float precision the device computes in ("f32", "f16").
        decompression: the float type compressed weights are decompressed to ("f32" keeps the
            scales exact; "f16" rounds them, as the GPU and NPU plugins compute in f16).
        symmetric_weights: compressed weights must have no zero point (NPU).
        weight_group_sizes: the group sizes the device runs (0 = per channel); None: any.
        unified_eltwise_scales: both quantized inputs of an Add / Mul share one scale (NPU).
        whole_blocks: weight groups must divide K (OpenVINO decompresses a padded last block when it
            compiles the model: measured on CPU).
        int8_embeddings: a W8A8 compile also stores the embedding tables (Gather) INT8, weight-only
            (NNCF's OpenVINO artifacts do; MiniLM: 56 -> 22 MB).
        int8_attention_scores: the transformer preset also quantizes the query and key of each
            attention score MatMul, symmetric, before their Reshape / Transpose, and leaves
            probabilities x V float: the form OpenVINO's CPU plugin runs as one int8 attention
            kernel (NNCF's artifacts have it).
        unsigned_midpoint: an asymmetric uint8 activation quantizer never gets zero point 128:
            OpenVINO reads that range, [-128 s, 127 s], as signed int8 and runs the MatMul as
            i8 x i8, slower than u8 x i8 on x86 (MiniLM: 6 of 36 FullyConnected).
        activation_types: the activation element types the runtime runs (``--activation-type``).
        symmetric_activations: activation quantizers must have zero point 0 (TensorRT's parser
            rejects any other).
        weight_block_sizes: the INT4 block sizes the runtime's weight-only kernels take (None: any);
            a target that lists them takes no INT8 blocks either.
        int8_cnn_range: the range method a default-preset INT8 compile takes when the user leaves
            it (None: the preset's). Symmetric INT8 leaves 7 bits to a tensor after a ReLU, so a
            MinMax range stretched by one outlier costs too much: PP-OCRv5 rec on tensorrt, 38.2 %
            exact lines with MinMax, 88.2 % with percentile (FP32 93.8 %).
        quantize_residual_adds: an Add that a quantized Conv's output alone feeds also gets a
            quantizer on its other (residual) input, so the runtime fuses the Add into the Conv
            (TensorRT's placement recommendation; the Conv side stays unquantized).
        min_gemm_dim: a weighted MatMul / Gemm with K or N below this, or a static M of 1 (GEMV),
            stays float (TensorRT: tensor cores cannot use it and Q/DQ there slow it down); 0: no rule.
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
    device: str | None = None
    inference_precision: str = "f32"
    decompression: str = "f32"
    symmetric_weights: bool = False
    weight_group_sizes: tuple[int, ...] | None = None
    unified_eltwise_scales: bool = False
    whole_blocks: bool = False
    int8_embeddings: bool = False
    int8_attention_scores: bool = False
    unsigned_midpoint: bool = False
    activation_types: frozenset[QuantType] = frozenset({QuantType.UINT8, QuantType.INT8})
    symmetric_activations: bool = False
    weight_block_sizes: tuple[int, ...] | None = None
    min_gemm_dim: int = 0
    int8_cnn_range: RangeMethod | None = None
    quantize_residual_adds: bool = False

    def weight_type_for(self, activation_type: QuantType) -> QuantType:
        """The W8A8 weight type beside `activation_type` (FP8 activations take FP8 weights)."""
        return weight_type_beside(activation_type, self.weight_type)


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


def _openvino(device: str, description: str, **device_rules: object) -> Target:
    """An OpenVINO device preset: the op set and types are OpenVINO's, the rest per device."""
    return Target(
        name=f"openvino-{device.lower()}",
        backend="openvino",
        description=description,
        quantizable_ops=frozenset({"MatMul", "Gemm", "Conv", "Add", "Mul", "Softmax"}),
        default_ops=frozenset({"MatMul", "Gemm", "Conv"}),
        # FakeQuantize takes either; NNCF's transformer preset also quantizes activations asymmetrically.
        activation_type=QuantType.UINT8,
        weight_type=QuantType.INT8,
        output_quantized_ops=frozenset(),  # OpenVINO's low-precision transformations need no output FQ
        int32_bias_ops=frozenset(),  # the bias stays float: the plugin fuses it after the int8 kernel
        min_opset=13,
        device=device,
        whole_blocks=True,
        int8_embeddings=True,
        int8_attention_scores=True,
        unsigned_midpoint=True,
        **device_rules,  # type: ignore[arg-type]
    )


OPENVINO_CPU = _openvino(
    "CPU",
    "OpenVINO CPU plugin: int8 FakeQuantize kernels, compressed-weight FullyConnected (u8/i8/u4/i4/nf4/f4e2m1)",
)
OPENVINO_GPU = _openvino(
    "GPU",
    "OpenVINO GPU plugin (f16 inference): weights decompressed in f16",
    inference_precision="f16",
    decompression="f16",
)
OPENVINO_NPU = _openvino(
    "NPU",
    "OpenVINO NPU plugin: symmetric INT4 per channel or group 128, unified scales on eltwise inputs",
    inference_precision="f16",
    decompression="f16",
    symmetric_weights=True,
    weight_group_sizes=(0, 128),
    unified_eltwise_scales=True,
)

TENSORRT = Target(
    name="tensorrt",
    backend="tensorrt",
    description=(
        "TensorRT 10.x/11.x explicit quantization, strongly typed: Q/DQ ONNX (INT8 or FP8 W8A8, "
        "INT4 / FP8 weight-only) with the unquantized part in FP16"
    ),
    quantizable_ops=frozenset({"MatMul", "Gemm", "Conv"}),
    default_ops=frozenset({"MatMul", "Gemm", "Conv"}),
    activation_type=QuantType.INT8,
    weight_type=QuantType.INT8,
    output_quantized_ops=frozenset(),  # TensorRT: never quantize a weighted op's output by default
    int32_bias_ops=frozenset(),  # the bias stays float: TensorRT fuses it into the GEMM / Conv
    min_opset=19,  # FP16 scales (and FP8) need QuantizeLinear / DequantizeLinear 19
    symmetric_weights=True,
    activation_types=frozenset({QuantType.INT8, QuantType.FP8}),
    symmetric_activations=True,
    weight_block_sizes=(64, 128),
    int8_cnn_range=RangeMethod.PERCENTILE,
    quantize_residual_adds=True,
    min_gemm_dim=16,  # ModelOpt's _MIN_MATMUL_DIM: "cannot utilize TensorCores"
    whole_blocks=True,  # the parser infers the block from the shapes: "Inferred block size is not an integer"
)

TARGETS: dict[str, Target] = {
    target.name: target for target in (ORT_CPU, OPENVINO_CPU, OPENVINO_GPU, OPENVINO_NPU, TENSORRT)
}


def get_target(name: str | Target) -> Target:
    """Look a target up by name; the error lists the known names."""
    if isinstance(name, Target):
        return name
    try:
        return TARGETS[name]
    except KeyError:
        known = ", ".join(sorted(TARGETS))
        raise OptionError(f"--target: unknown target {name!r} (known: {known})") from None


def adapt_options(options: CompileOptions, target: Target) -> tuple[CompileOptions, list[str]]:
    """`options` changed where `target` cannot run what they ask; one line per change for the report.

    Only device rules adapt a request (NPU: symmetric weights, group 128 or per channel); anything
    a target cannot do at all is an error elsewhere.
    """
    notes: list[str] = []
    options = _adapt_activations(options, target, notes)
    compression = options.compression
    if compression is None:
        return options, notes
    changes: dict[str, Any] = {}
    integer = compression.format is WeightFormat.INT4 or (
        compression.format.is_integer and target.weight_block_sizes is not None  # TensorRT: INT8 too
    )
    if target.symmetric_weights and not compression.symmetric and integer:
        changes["symmetric"] = True
        notes.append(
            f"{target.name}: asymmetric {compression.format.value} weights made symmetric (the device runs no zero point)"
        )
    if (
        target.symmetric_weights
        and target.weight_block_sizes is not None
        and not compression.symmetric_backups
    ):
        changes["symmetric_backups"] = True  # INT8 backups: no zero point, and INT8 takes no blocks
        if compression.backup_layers:
            notes.append(
                f"{target.name}: the INT8 backup layers are symmetric per channel (INT8 weights take no blocks)"
            )
    allowed = target.weight_group_sizes
    if (
        allowed is not None
        and compression.format.fixed_block is None
        and compression.group_size not in allowed
    ):
        group = max(size for size in allowed)
        changes["group_size"] = group
        notes.append(
            f"{target.name}: --group-size {compression.group_size} is not run by the device "
            f"(it runs {', '.join(str(size) if size else 'per-channel' for size in allowed)}); using {group}"
        )
    blocks = target.weight_block_sizes
    if (
        blocks is not None
        and compression.format is WeightFormat.INT4
        and changes.get("group_size", compression.group_size) not in blocks
    ):
        group = min(blocks, key=lambda size: abs(size - compression.group_size))
        changes["group_size"] = group
        notes.append(
            f"{target.name}: --group-size {compression.group_size} is not a block size its INT4 kernels take "
            f"({', '.join(map(str, blocks))}); using {group}"
        )
    if not changes:
        return options, notes
    return dataclasses.replace(options, compression=dataclasses.replace(compression, **changes)), notes


def _adapt_activations(options: CompileOptions, target: Target, notes: list[str]) -> CompileOptions:
    """Refuse an activation type the target does not run; symmetric activations and a CNN range where it wants them."""
    activations = options.activations
    if activations.dtype is not None and activations.dtype not in target.activation_types:
        known = ", ".join(sorted(qtype.value for qtype in target.activation_types))
        raise OptionError(
            f"--activation-type {activations.dtype.value}: {target.name} runs {known} activations"
        )
    if options.compression is not None:
        return options
    if (
        target.int8_cnn_range is not None
        and options.preset is Preset.DEFAULT
        and activations.range_method is None
        and activations.dtype in (None, QuantType.INT8)
    ):
        activations = dataclasses.replace(activations, range_method=target.int8_cnn_range)
        notes.append(
            f"{target.name}: INT8 activation ranges by {target.int8_cnn_range.value} (the preset leaves them; "
            "symmetric INT8 would spend its 7 bits on outliers under MinMax)"
        )
    if target.symmetric_activations and not activations.symmetric:
        activations = dataclasses.replace(activations, symmetric=True)
        notes.append(f"{target.name}: activations made symmetric (zero point 0: the runtime takes no other)")
    return dataclasses.replace(options, activations=activations)


def fitted_group_size(target: Target, fmt: WeightFormat, group: int, rows: int) -> int:
    """The group size `target` runs for a weight of `rows` input channels asked at `group` (0: per channel).

    Whole blocks: the group halved until it divides K, down to 16, else per channel; where the
    device lists its sizes (NPU), one of them for 4-bit weights.
    """
    allowed = target.weight_group_sizes
    if (
        (not target.whole_blocks and allowed is None)
        or fmt.fixed_block is not None
        or not group
        or group >= rows
    ):
        return group
    fitted = group
    if rows % group and target.whole_blocks:
        while fitted >= 16 and rows % fitted:
            fitted //= 2
        fitted = fitted if fitted >= 16 and rows % fitted == 0 else 0
    if allowed is not None and fitted not in allowed and fmt.bits == 4:
        fitted = 0
    return fitted
