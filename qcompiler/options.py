"""Typed, frozen options for a compile: enums for every mode, one dataclass per concern.

Options say *what the user asked for*; `qcompiler.targets` says what a runtime can do, and
`resolve_options` merges the two with the preset so every later stage reads one concrete value.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Sequence
from typing import Protocol

from qcompiler.errors import OptionError
from qcompiler.formats import WeightFormat as WeightFormat  # re-exported: `--weights` names a format


class Preset(enum.Enum):
    """Bundles of defaults for a model family."""

    DEFAULT = "default"
    """Quantize every supported op (MatMul, Gemm, Conv), including activation x activation MatMul."""
    TRANSFORMER = "transformer"
    """Quantize only MatMul/Gemm with constant weights; attention score MatMuls stay float."""


class RangeMethod(enum.Enum):
    """How an activation's quantization range is chosen from calibration statistics."""

    MINMAX = "minmax"
    """Observed min and max over all calibration data."""
    MEAN_MINMAX = "mean-minmax"
    """The mean over calibration samples of each sample's min and max (NNCF's default for
    per-tensor activations): one outlier image does not set the range."""
    PERCENTILE = "percentile"
    """Clip to a percentile of the observed distribution (histogram)."""
    MSE = "mse"
    """The clipping range that minimises the expected quantization error (histogram)."""
    SEARCH = "search"
    """Per tensor, the candidate (MinMax, percentiles, MSE) whose quantized consumers' output
    error on sampled calibration rows is least."""


class QuantType(enum.Enum):
    """Element types a quantizer can produce."""

    INT8 = "int8"
    UINT8 = "uint8"
    FP8 = "fp8"
    """FLOAT8E4M3FN: symmetric by definition (zero point 0), scale = range / 448 (TensorRT)."""

    @property
    def is_float(self) -> bool:
        """A float code type (FP8): values round to its grid, not to integers."""
        return self is QuantType.FP8


class NodeLike(Protocol):
    """What ignored-scope matching needs from a node."""

    name: str | None
    op_type: str


@dataclasses.dataclass(frozen=True)
class IgnoredScope:
    """Nodes that must stay in floating point.

    Attributes:
        names: exact node names.
        patterns: regular expressions searched (``re.search``) in node names.
        op_types: ONNX op types, e.g. ``("Softmax",)``.
    """

    names: tuple[str, ...] = ()
    patterns: tuple[str, ...] = ()
    op_types: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for pattern in self.patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise OptionError(f"--ignore: invalid regular expression {pattern!r}: {exc}") from exc

    def matches(self, node: NodeLike) -> bool:
        """True if `node` is inside the ignored scope."""
        name = node.name or ""
        if node.op_type in self.op_types or name in self.names:
            return True
        return any(re.search(pattern, name) for pattern in self.patterns)


@dataclasses.dataclass(frozen=True)
class ActivationOptions:
    """How activations are quantized.

    Attributes:
        dtype: element type; None takes the target's preferred type (UINT8 on x86 ORT CPU).
        symmetric: zero point fixed at the type's midpoint when True.
        range_method: how the clipping range is chosen; None takes the preset's choice.
        percentile: the percentile kept by ``RangeMethod.PERCENTILE`` (on each side).
        sample_rows: calibration rows kept per tensor for ``RangeMethod.SEARCH``.
        bias_correction: fold the mean shift each quantized Conv's quantizers add to its output
            into its bias (one more calibration run, of the quantized model); only Convs are
            corrected, so it changes nothing on a model without them.
    """

    dtype: QuantType | None = None
    symmetric: bool = False
    range_method: RangeMethod | None = None
    percentile: float = 99.999
    sample_rows: int = 512
    bias_correction: bool = True

    def __post_init__(self) -> None:
        if not 50.0 < self.percentile <= 100.0:
            raise OptionError(f"activation percentile must be in (50, 100], got {self.percentile}")


@dataclasses.dataclass(frozen=True)
class SmoothQuantOptions:
    """SmoothQuant: migrate activation outliers into the weights before quantizing.

    Attributes:
        enabled: on/off; None takes the preset's choice (on for ``transformer``).
        alpha: one migration strength for every group; None searches `alphas` per group.
        alphas: the grid searched per group by quantized-layer output error.
        sample_rows: calibration rows kept per activation for the search.
    """

    enabled: bool | None = None
    alpha: float | None = None
    alphas: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
    sample_rows: int = 512

    def __post_init__(self) -> None:
        for alpha in (self.alpha, *self.alphas) if self.alpha is not None else self.alphas:
            if not 0.0 <= alpha <= 1.0:
                raise OptionError(f"--smooth-alpha must be in [0, 1], got {alpha}")

    def grid(self) -> tuple[float, ...]:
        """The alphas to try: the fixed one, or the grid."""
        return (self.alpha,) if self.alpha is not None else self.alphas


@dataclasses.dataclass(frozen=True)
class WeightOptions:
    """How constant weights are quantized (always symmetric INT8 here; INT4 etc. come later).

    Attributes:
        per_channel: one scale per output channel (True) or one per tensor.
    """

    per_channel: bool = True


@dataclasses.dataclass(frozen=True)
class CompressionOptions:
    """Weight-only compression (`--weights`): activations stay float.

    Attributes:
        format: the low-bit format of the compressed MatMul weights.
        group_size: rows of K per scale (0 = per output channel); MXFP4 / NVFP4 / FP8 fix their own.
        symmetric: zero point 0 (INT4 / INT8); the other formats are symmetric by definition.
        awq: per-channel scale search folded into the producer (AWQ), on calibration statistics.
        scale_estimation: refit every block's scale against the activation-weighted error.
        gptq: GPTQ's error-feedback rounding (Hessian from calibration data).
        hqq: data-free HQQ (robust l_p fit of scales and zero points) instead of RTN for 4-bit
            asymmetric integer weights, where scale estimation does not refit them (INT8 backups
            stay RTN: HQQ on MiniLM's 30522 x 384 embedding cost 6 s for no measurable gain).
        ratio: fraction of the compressible MatMul weights (by size) in `format`; the rest, the
            most sensitive ones, in INT8.
        backup_layers: keep the embeddings and the last MatMul in INT8 (NNCF's default policy).
        symmetric_backups: those INT8 backups symmetric, one scale per channel (for runtimes
            without weight zero points or INT8 blocks: TensorRT); else asymmetric in blocks.
        damping: GPTQ's Hessian damping, relative to the mean diagonal.
        accuracy_level: MatMulNBits' ``accuracy_level`` for ORT (4: int8 activations in the
            kernel, fastest; 0: float). None: 4 for 4-bit formats, 0 for INT8 weights (whose
            point is accuracy: MiniLM mean cosine 0.9997 at 0 vs 0.9986 at 4).
        fuse_attention: on onnxruntime, replace a KV-cache decoder's attention layers with the
            fused ``GroupQueryAttention`` (rotary inside; assumes no padding inside a sequence, as
            in batch-1 generation). ``--unfused-attention`` keeps the exported nodes.
    """

    format: WeightFormat = WeightFormat.INT4
    group_size: int = 128
    symmetric: bool = False
    awq: bool = False
    scale_estimation: bool = False
    gptq: bool = False
    hqq: bool = False
    ratio: float = 1.0
    backup_layers: bool = True
    symmetric_backups: bool = False
    damping: float = 0.01
    accuracy_level: int | None = None
    fuse_attention: bool = True

    def __post_init__(self) -> None:
        if self.group_size < 0:
            raise OptionError(f"--group-size must be 0 (per-channel) or positive, got {self.group_size}")
        if not 0.0 <= self.ratio <= 1.0:
            raise OptionError(f"--ratio must be in [0, 1], got {self.ratio}")
        if self.accuracy_level not in (None, 0, 1, 2, 3, 4):
            raise OptionError(f"accuracy_level must be 0..4, got {self.accuracy_level}")
        if self.hqq and (self.symmetric or not self.format.is_integer):
            raise OptionError(
                "--hqq fits each block's scale and zero point (asymmetric INT4/INT8): drop --symmetric "
                "(a scale-only robust fit raised SmolLM2's INT4 sym g64 perplexity 34.98 -> 36.36), "
                "or use --scale-estimation with data"
            )

    @property
    def kernel_accuracy_level(self) -> int:
        """The MatMulNBits accuracy level to emit (see `accuracy_level`)."""
        if self.accuracy_level is not None:
            return self.accuracy_level
        return 0 if self.format in (WeightFormat.INT8, WeightFormat.FP8) else 4

    @property
    def int8_kernel_accuracy_level(self) -> int:
        """The level for the INT8 backup layers (embedding, LM head) of the plain compile.

        The model's own level: at 0, SmolLM2's INT8 LM head alone took 60 ms of a 70 ms decode
        step (9 ms at 4, attention fused); perplexity 29.516 at 0, 29.531 at 4. INT8 chosen as
        an accuracy fallback (`--max-drop`, size budgets) keeps 0 (`weight_budget`).
        """
        return self.kernel_accuracy_level

    @property
    def needs_data(self) -> bool:
        """Whether any chosen algorithm reads calibration statistics."""
        return self.awq or self.scale_estimation or self.gptq or self.ratio < 1.0


class CalibrationRuntime(enum.Enum):
    """Where calibration runs the model."""

    ONNXRUNTIME = "onnxruntime"
    """onnxruntime CPU, fp32."""
    OPENVINO = "openvino"
    """OpenVINO CPU, fp32 (faster than onnxruntime on transformer blocks here)."""
    OPENVINO_FAST = "openvino-fast"
    """OpenVINO CPU in bf16 where the CPU has it (3-4x faster): statistics that tolerate an 8-bit
    mantissa, such as weight compression's Gram matrices."""


@dataclasses.dataclass(frozen=True)
class CalibrationOptions:
    """How much data calibration reads and how finely it records distributions.

    Attributes:
        max_batches: stop after this many batches (None: use the whole source).
        histogram_bins: bins of each activation histogram (percentile and MSE ranges).
        runtime: where the model runs; None: onnxruntime for static quantization (activation
            ranges in fp32), OpenVINO bf16-where-available for weight compression.
        piece_bytes: models with more than 4x this many weight bytes run piece by piece, each
            piece holding about this many (peak memory: one piece's weights in the runtime, not
            all; SmolLM2-135M: 11 pieces); None runs every model whole.
    """

    max_batches: int | None = None
    histogram_bins: int = 2048
    runtime: CalibrationRuntime | None = None
    piece_bytes: int | None = 48 * 2**20

    def __post_init__(self) -> None:
        if self.max_batches is not None and self.max_batches < 1:
            raise OptionError(f"max_batches must be >= 1, got {self.max_batches}")
        if self.histogram_bins < 16:
            raise OptionError(f"histogram_bins must be >= 16, got {self.histogram_bins}")
        if self.piece_bytes is not None and self.piece_bytes < 1:
            raise OptionError(f"piece_bytes must be >= 1 or None, got {self.piece_bytes}")


class DropType(enum.Enum):
    """How `--max-drop` compares a candidate's metric with the float model's."""

    ABSOLUTE = "absolute"
    RELATIVE = "relative"


@dataclasses.dataclass(frozen=True)
class AccuracyOptions:
    """Accuracy-aware fallback (`--max-drop`) and size budgets (`--effective-bits`, `--max-size`).

    Attributes:
        max_drop: the largest metric drop allowed against the float model (None: no fallback).
        drop_type: absolute (default) or relative to the float model's score.
        metric: a built-in name (cosine, sqnr, top1, perplexity), ``module:function`` or a
            callable ``f(outputs, feeds) -> float``; None: perplexity for a model with a
            ``logits`` output, else cosine.
        metric_output: the output the metric reads (None: the metric's own, else the first).
        max_trials: most evaluations the fallback loop makes.
        time_budget: seconds after which the loop starts no new trial.
        confirm: how many top-ranked groups are measured on the validation subset before the loop.
        subset_batches: validation batches used for ranking (the loop uses all of them).
        effective_bits: weight compression only: average bits per compressed weight (codes, scales
            and zero points counted) to fit, by an integer program over per-group formats.
        max_size_mb: weight compression only: the same, as a size of the compressed weights in MB.
        drop_margin: the search holds the measured drop to ``max_drop - drop_margin``, so that a
            drop measured on a sample of the data the model will meet stays inside the budget
            (the report's interval says how wide that noise is).
    """

    max_drop: float | None = None
    drop_type: DropType = DropType.ABSOLUTE
    metric: object = None
    metric_output: str | None = None
    max_trials: int = 50
    time_budget: float | None = None
    confirm: int = 8
    subset_batches: int = 2
    effective_bits: float | None = None
    max_size_mb: float | None = None
    drop_margin: float = 0.0

    def __post_init__(self) -> None:
        if self.max_drop is not None and self.max_drop < 0:
            raise OptionError(f"--max-drop must be >= 0, got {self.max_drop}")
        if self.drop_margin < 0 or (self.max_drop is not None and self.drop_margin > self.max_drop):
            raise OptionError(f"--drop-margin must be in [0, --max-drop], got {self.drop_margin}")
        if self.max_trials < 1:
            raise OptionError(f"--max-trials must be >= 1, got {self.max_trials}")
        if self.time_budget is not None and self.time_budget <= 0:
            raise OptionError(f"--time-budget must be positive, got {self.time_budget}")
        if self.effective_bits is not None and not 1.0 < self.effective_bits <= 32.0:
            raise OptionError(f"--effective-bits must be in (1, 32], got {self.effective_bits}")
        if self.max_size_mb is not None and self.max_size_mb <= 0:
            raise OptionError(f"--max-size must be positive, got {self.max_size_mb}")
        if self.effective_bits is not None and self.max_size_mb is not None:
            raise OptionError("--effective-bits and --max-size: pass one size budget, not both")

    @property
    def enabled(self) -> bool:
        """Whether any accuracy or size budget was asked for."""
        return self.max_drop is not None or self.size_budget

    @property
    def size_budget(self) -> bool:
        """Whether a size budget was asked for."""
        return self.effective_bits is not None or self.max_size_mb is not None


@dataclasses.dataclass(frozen=True)
class CompileOptions:
    """Everything a compile can be asked to do.

    Attributes:
        preset: family defaults (which ops are quantized).
        op_types: quantize exactly these op types instead of the preset's set.
        ignored: nodes that stay in floating point.
        activations: activation quantizer settings.
        weights: weight quantizer settings.
        smooth_quant: SmoothQuant settings.
        calibration: calibration settings.
        count_fusion: ask the runtime which quantized nodes it fused (costs one session build).
        compression: weight-only compression; when set, activations are not quantized.
        accuracy: accuracy-aware fallback and size budgets (need validation data).
    """

    preset: Preset = Preset.DEFAULT
    op_types: tuple[str, ...] | None = None
    ignored: IgnoredScope = IgnoredScope()
    activations: ActivationOptions = ActivationOptions()
    weights: WeightOptions = WeightOptions()
    smooth_quant: SmoothQuantOptions = SmoothQuantOptions()
    calibration: CalibrationOptions = CalibrationOptions()
    count_fusion: bool = True
    compression: CompressionOptions | None = None
    accuracy: AccuracyOptions = AccuracyOptions()

    def resolved(self) -> CompileOptions:
        """These options with every "preset decides" (None) replaced by the preset's value."""
        defaults = PRESET_DEFAULTS[self.preset]
        activations = self.activations
        if activations.range_method is None:
            activations = dataclasses.replace(activations, range_method=defaults.range_method)
        smooth_quant = self.smooth_quant
        if smooth_quant.enabled is None:
            smooth_quant = dataclasses.replace(smooth_quant, enabled=defaults.smooth_quant)
        return dataclasses.replace(self, activations=activations, smooth_quant=smooth_quant)

    def to_dict(self) -> dict[str, object]:
        """A JSON-friendly view for the report."""
        view = _jsonable(dataclasses.asdict(self))
        assert isinstance(view, dict)
        return view


@dataclasses.dataclass(frozen=True)
class PresetDefaults:
    """What a preset turns on when the user leaves a setting to it."""

    range_method: RangeMethod
    smooth_quant: bool


PRESET_DEFAULTS: dict[Preset, PresetDefaults] = {
    Preset.DEFAULT: PresetDefaults(range_method=RangeMethod.MINMAX, smooth_quant=False),
    # Range search (RangeMethod.SEARCH) measured worse than MinMax after SmoothQuant on MiniLM's
    # worst sentences (docs/benchmarks.md), so the preset keeps MinMax ranges.
    Preset.TRANSFORMER: PresetDefaults(range_method=RangeMethod.MINMAX, smooth_quant=True),
}


def parse_enum(enum_type: type[enum.Enum], value: str, option: str) -> enum.Enum:
    """Parse a user string into `enum_type`, naming the option and the allowed values if wrong."""
    try:
        return enum_type(value)
    except ValueError:
        allowed = ", ".join(str(member.value) for member in enum_type)
        raise OptionError(f"{option}: {value!r} is not one of {allowed}") from None


def as_tuple(values: Sequence[str] | None) -> tuple[str, ...]:
    """Normalise an optional sequence of strings to a tuple."""
    return tuple(values or ())


def _jsonable(value: object) -> object:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    return value
