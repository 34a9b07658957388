"""The weight-format registry: every fact about a compressed-weight format, in one table.

Every other table (the canonical form's code types and DequantizeLinear versions, the size
budget's stored bits, the fallback ladders' bits, each backend's kernel and element types)
derives from `FORMATS`; adding a format is one row here plus its numerics in `weight_formats`.
"""

from __future__ import annotations

import dataclasses
import enum

import onnx_ir as ir


class WeightFormat(enum.Enum):
    """Weight-only formats (`--weights`)."""

    INT8 = "int8"
    INT4 = "int4"
    NF4 = "nf4"
    MXFP4 = "mxfp4"
    NVFP4 = "nvfp4"
    FP8 = "fp8"

    @property
    def spec(self) -> FormatSpec:
        """This format's row of `FORMATS`."""
        return FORMATS[self]

    @property
    def bits(self) -> int:
        """Bits per weight code."""
        return self.spec.bits

    @property
    def is_integer(self) -> bool:
        """INT8 / INT4: integer codes with an optional zero point."""
        return self.spec.integer

    @property
    def fixed_block(self) -> int | None:
        """Block size the format defines (None: the user's group size; 0: per-channel)."""
        return self.spec.fixed_block


@dataclasses.dataclass(frozen=True)
class FormatSpec:
    """What a weight format is, independent of any runtime.

    Attributes:
        bits: bits per code.
        integer: integer codes with an optional zero point (INT8 / INT4).
        fixed_block: the block the format defines (None: the user's group size; 0: per channel).
        scale_bits: bits per stored block scale (E8M0 / E4M3 for the FP4 formats, else float32).
        signed_code: the ONNX element type of symmetric codes.
        unsigned_code: the ONNX element type of asymmetric codes (None: the format has no zero point).
        min_dq_opset: the first DequantizeLinear version that accepts the code type (0: no ONNX
            DequantizeLinear reads it, the canonical form uses a ``qcompiler`` op).
        global_scale: a second-level tensor scale (NVFP4's FP32 scale over the E4M3 block scales).
    """

    bits: int
    integer: bool
    fixed_block: int | None
    scale_bits: int
    signed_code: ir.DataType
    unsigned_code: ir.DataType | None
    min_dq_opset: int
    global_scale: bool = False

    def code_type(self, symmetric: bool) -> ir.DataType:
        """The ONNX element type of the codes (asymmetric integers are unsigned)."""
        if symmetric or self.unsigned_code is None:
            return self.signed_code
        return self.unsigned_code


FORMATS: dict[WeightFormat, FormatSpec] = {
    WeightFormat.INT8: FormatSpec(8, True, None, 32, ir.DataType.INT8, ir.DataType.UINT8, 13),
    WeightFormat.INT4: FormatSpec(4, True, None, 32, ir.DataType.INT4, ir.DataType.UINT4, 21),
    # NF4 codes are indices into the NormalFloat table: stored uint4, read by qcompiler.DequantizeNF4
    WeightFormat.NF4: FormatSpec(4, False, None, 32, ir.DataType.UINT4, None, 0),
    WeightFormat.MXFP4: FormatSpec(4, False, 32, 8, ir.DataType.FLOAT4E2M1, None, 23),
    WeightFormat.NVFP4: FormatSpec(4, False, 16, 8, ir.DataType.FLOAT4E2M1, None, 23, global_scale=True),
    WeightFormat.FP8: FormatSpec(8, False, 0, 32, ir.DataType.FLOAT8E4M3FN, None, 19),
}
"""The registry (see the module docstring)."""

FLOAT_RUNG_BITS = {"fp16": 16, "float": 32}
"""Bits of the weight ladders' unquantized rungs."""


@dataclasses.dataclass(frozen=True)
class WeightRung:
    """A step of a weight ladder: a format (``int4``), a format at a group size (``int4-g32``), or float.

    Ladders and reports carry rungs as their text (`str`); every reading of that text is `parse`.
    """

    name: str
    """A `WeightFormat` value, or a float rung (``fp16``, ``float``)."""
    group_size: int | None = None

    @classmethod
    def parse(cls, text: str) -> WeightRung:
        """The rung `str` wrote."""
        name, _, group = text.partition("-g")
        if name not in FLOAT_RUNG_BITS:
            WeightFormat(name)  # a ValueError names an unknown rung
        return cls(name, int(group) if group else None)

    def __str__(self) -> str:
        return self.name if self.group_size is None else f"{self.name}-g{self.group_size}"

    @property
    def format(self) -> WeightFormat | None:
        """The weight format (None for a float rung)."""
        return None if self.name in FLOAT_RUNG_BITS else WeightFormat(self.name)

    @property
    def bits(self) -> int:
        """Bits per weight code (16 / 32 for the float rungs)."""
        return FLOAT_RUNG_BITS[self.name] if self.format is None else self.format.bits
