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
    PERCENTILE = "percentile"
    """Clip to a percentile of the observed distribution (histogram)."""
    MSE = "mse"
    """The clipping range that minimises the expected quantization error (histogram)."""


class QuantType(enum.Enum):
    """Integer element types a quantizer can produce."""

    INT8 = "int8"
    UINT8 = "uint8"


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
        range_method: how the clipping range is chosen from calibration statistics.
        percentile: the percentile kept by ``RangeMethod.PERCENTILE`` (on each side).
    """

    dtype: QuantType | None = None
    symmetric: bool = False
    range_method: RangeMethod = RangeMethod.MINMAX
    percentile: float = 99.999

    def __post_init__(self) -> None:
        if not 50.0 < self.percentile <= 100.0:
            raise OptionError(f"activation percentile must be in (50, 100], got {self.percentile}")


@dataclasses.dataclass(frozen=True)
class WeightOptions:
    """How constant weights are quantized (always symmetric INT8 here; INT4 etc. come later).

    Attributes:
        per_channel: one scale per output channel (True) or one per tensor.
    """

    per_channel: bool = True


@dataclasses.dataclass(frozen=True)
class CalibrationOptions:
    """How much data calibration reads and how finely it records distributions.

    Attributes:
        max_batches: stop after this many batches (None: use the whole source).
        histogram_bins: bins of each activation histogram (percentile and MSE ranges).
    """

    max_batches: int | None = None
    histogram_bins: int = 2048

    def __post_init__(self) -> None:
        if self.max_batches is not None and self.max_batches < 1:
            raise OptionError(f"max_batches must be >= 1, got {self.max_batches}")
        if self.histogram_bins < 16:
            raise OptionError(f"histogram_bins must be >= 16, got {self.histogram_bins}")


@dataclasses.dataclass(frozen=True)
class CompileOptions:
    """Everything a compile can be asked to do.

    Attributes:
        preset: family defaults (which ops are quantized).
        op_types: quantize exactly these op types instead of the preset's set.
        ignored: nodes that stay in floating point.
        activations: activation quantizer settings.
        weights: weight quantizer settings.
        calibration: calibration settings.
        count_fusion: ask the runtime which quantized nodes it fused (costs one session build).
    """

    preset: Preset = Preset.DEFAULT
    op_types: tuple[str, ...] | None = None
    ignored: IgnoredScope = IgnoredScope()
    activations: ActivationOptions = ActivationOptions()
    weights: WeightOptions = WeightOptions()
    calibration: CalibrationOptions = CalibrationOptions()
    count_fusion: bool = True

    def to_dict(self) -> dict[str, object]:
        """A JSON-friendly view for the report."""
        return _jsonable(dataclasses.asdict(self))


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
