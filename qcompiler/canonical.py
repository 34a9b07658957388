"""The canonical form of a compressed weight: constant low-bit codes -> DequantizeLinear -> MatMul / Gather.

Every backend lowers from this form and every rewrite that compresses writes it; `read_canonical`
is the inverse of `write_canonical`, and `dequantize_canonical` is the float model it means.

Canonical form: blocked ``DequantizeLinear`` (``axis=0, block_size``; opset 21 semantics, the
node's own version) or per-axis (``axis=1``) for MatMul weights [K, N]; for an embedding table
[V, H], blocks along H (``axis=1``). NF4 has no ONNX element type: its DQ is
``qcompiler.DequantizeNF4`` (uint4 table indices, block scales), lowered per backend. The
DQ node's ``qcompiler.compression.record`` metadata is the machine-readable `CompressionRecord`
(format, symmetry, block, algorithms, global scale, JSON); ``qcompiler.compression`` beside it is
the same in words, for Netron. Backends read the record, never the words.
"""

from __future__ import annotations

import dataclasses
import json

import ml_dtypes
import numpy as np
import onnx_ir as ir

from qcompiler.formats import FORMATS, WeightFormat
from qcompiler.irutil import add_initializer, drop_if_unused, insert_dequantize
from qcompiler.precision import as_scale, as_type, float_type_of
from qcompiler.weight_formats import CompressedWeight

COMPRESSION_KEY = "qcompiler.compression"
"""Node metadata: how the weight was compressed, in words."""
RECORD_KEY = "qcompiler.compression.record"
"""Node metadata: the `CompressionRecord` as JSON."""
NF4_DOMAIN = "qcompiler"


@dataclasses.dataclass(frozen=True)
class CompressionRecord:
    """What made one compressed weight (stored on its DequantizeLinear; nothing is parsed from words).

    Attributes:
        format: the weight format.
        symmetric: no zero point.
        block_size: rows of K per scale; 0 for one scale per output channel.
        algorithms: what ran, in order (``rtn``, ``hqq``, ``scale_estimation``, ``gptq``).
        global_scale: NVFP4's tensor scale, folded into the stored block scales and kept here exactly.
        note: why, when not the plan's default (e.g. a fallback).
    """

    format: WeightFormat
    symmetric: bool
    block_size: int
    algorithms: tuple[str, ...]
    global_scale: float | None = None
    note: str = ""

    @classmethod
    def of(cls, weight: CompressedWeight, algorithms: tuple[str, ...], note: str = "") -> CompressionRecord:
        """The record of `weight` made by `algorithms`."""
        per_channel = weight.block_size >= weight.shape[0]
        return cls(
            weight.format,
            weight.symmetric,
            0 if per_channel else weight.block_size,
            tuple(algorithms),
            weight.global_scale,
            note,
        )

    @property
    def line(self) -> str:
        """The record in words (the report's ``how``; Netron shows it on the node)."""
        symmetry = "sym" if self.symmetric else "asym"
        group = "per-channel" if self.block_size == 0 else f"group {self.block_size}"
        text = f"{self.format.value} {symmetry} {group}; {'+'.join(self.algorithms)}"
        return f"{text} ({self.note})" if self.note else text

    def to_json(self) -> str:
        """The record as stored in node metadata."""
        fields = dataclasses.asdict(self)
        fields["format"] = self.format.value
        fields["algorithms"] = list(self.algorithms)
        return json.dumps(fields, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CompressionRecord:
        """The inverse of `to_json`."""
        fields = json.loads(text)
        fields["format"] = WeightFormat(fields["format"])
        fields["algorithms"] = tuple(fields["algorithms"])
        return cls(**fields)


def record_of(dq: ir.Node) -> CompressionRecord | None:
    """The record `write_canonical` stored on `dq` (None on a DQ it did not write)."""
    text = dq.metadata_props.get(RECORD_KEY)
    return CompressionRecord.from_json(text) if text else None


def _add_codes(graph: ir.Graph, name: str, codes: np.ndarray, fmt: WeightFormat, symmetric: bool) -> ir.Value:
    """Register codes as an initializer of the format's ONNX element type."""
    dtype = fmt.spec.code_type(symmetric)
    if dtype == ir.DataType.FLOAT8E4M3FN:
        codes = codes.view(ml_dtypes.float8_e4m3fn)
    elif dtype == ir.DataType.FLOAT4E2M1:
        codes = codes.view(ml_dtypes.float4_e2m1fn)
    return add_initializer(graph, name, codes, dtype)


def write_canonical(
    graph: ir.Graph, reader: ir.Node, compressed: CompressedWeight, record: CompressionRecord
) -> ir.Node:
    """Replace the float weight `reader` reads by codes -> DequantizeLinear (see the module docstring).

    `reader` is a MatMul (weight = input 1, [K, N]) or a Gather (table = input 0, [V, H];
    `compressed` is its transpose).
    """
    embedding = reader.op_type == "Gather"
    weight = reader.inputs[0 if embedding else 1]
    assert weight is not None
    base = str(weight.name)
    rows = compressed.shape[0]
    blocked = compressed.block_size < rows
    codes = compressed.codes.T if embedding else compressed.codes
    scales = compressed.scales.T if embedding else compressed.scales
    zeros = compressed.zero_points
    if zeros is not None and embedding:
        zeros = zeros.T
    if not blocked:  # one scale per output channel: a vector
        scales = scales.reshape(-1)
        zeros = None if zeros is None else zeros.reshape(-1)
    inputs: list[ir.Value | None] = [
        _add_codes(graph, f"{base}_codes", codes, compressed.format, compressed.symmetric),
        add_initializer(graph, f"{base}_scales", as_scale(scales, float_type_of(weight))),
    ]
    if zeros is not None:
        inputs.append(_add_codes(graph, f"{base}_zero_points", zeros, compressed.format, False))
    axis = int(embedding == blocked)  # the axis the scales run along (blocks: the blocked axis)
    attributes: dict[str, int] = {"axis": axis}
    if blocked:
        attributes["block_size"] = compressed.block_size
    metadata = {COMPRESSION_KEY: record.line, RECORD_KEY: record.to_json()}
    if compressed.global_scale is not None:
        metadata[COMPRESSION_KEY] += f"; global scale {compressed.global_scale:.9g} folded into block scales"
    index = 0 if embedding else 1
    dq = insert_dequantize(
        graph,
        reader,
        index,
        inputs,
        name=f"{base}/DequantizeLinear",
        like=weight,
        attributes=attributes,
        metadata=metadata,
    )
    if compressed.format is WeightFormat.NF4:
        dq.domain, dq.op_type = NF4_DOMAIN, "DequantizeNF4"
    elif blocked or compressed.format is not WeightFormat.INT8:
        opset = compressed.format.spec.min_dq_opset
        dq.version = max(21, opset) if blocked else opset
    drop_if_unused(graph, weight)
    return dq


def format_of_code(dtype: ir.DataType) -> WeightFormat:
    """The first registered format whose codes have this type (FP4 codes alone read as MXFP4)."""
    for fmt, spec in FORMATS.items():
        if dtype in (spec.signed_code, spec.unsigned_code) and spec.min_dq_opset:
            return fmt
    raise ValueError(f"no weight format stores {dtype} codes")


def canonical_consumer(dq: ir.Node) -> ir.Node | None:
    """The MatMul (weight input) or Gather (table input) a canonical weight DQ feeds, else None."""
    nf4 = dq.domain == NF4_DOMAIN and dq.op_type == "DequantizeNF4"
    standard = dq.domain in ("", "ai.onnx") and dq.op_type == "DequantizeLinear"
    codes = dq.inputs[0] if dq.inputs else None
    if not (nf4 or standard) or codes is None or codes.const_value is None or len(dq.outputs[0].uses()) != 1:
        return None
    use = next(iter(dq.outputs[0].uses()))
    if use.node.op_type == "MatMul" and use.idx == 1:
        return use.node
    if use.node.op_type == "Gather" and use.idx == 0 and use.node.attributes.get_int("axis", 0) == 0:
        return use.node
    return None


def read_canonical(dq: ir.Node) -> CompressedWeight:
    """The CompressedWeight [K, N] that `write_canonical` wrote behind `dq` (its inverse).

    `dq` must pass `canonical_consumer`; an embedding's table [V, H] comes back transposed.
    """
    consumer = canonical_consumer(dq)
    assert consumer is not None, f"{dq.name} is not a canonical weight DequantizeLinear"
    codes_value = dq.inputs[0]
    assert codes_value is not None and codes_value.const_value is not None
    record = record_of(dq)
    if record is not None:
        fmt, global_scale = record.format, record.global_scale
    else:  # a static W8A8 weight (InsertQDQPass): the codes' type says it
        fmt = WeightFormat.NF4 if dq.op_type == "DequantizeNF4" else format_of_code(codes_value.dtype)  # type: ignore[arg-type]
        global_scale = None
    codes = codes_value.const_value.numpy()
    if fmt.is_integer:
        signed = codes_value.dtype in (ir.DataType.INT4, ir.DataType.INT8)
        codes = codes.astype(np.int8 if signed else np.uint8)
    else:
        codes = codes.view(np.uint8)  # table index / E2M1 / E4M3 bits, one per byte
    scales = dq.inputs[1].const_value.numpy().astype(np.float32)  # type: ignore[union-attr]
    zero_value = dq.inputs[2] if len(dq.inputs) > 2 else None
    zeros = None if zero_value is None else zero_value.const_value.numpy().astype(np.uint8)  # type: ignore[union-attr]
    if consumer.op_type == "Gather":
        codes = codes.T
        scales = scales.T if scales.ndim == 2 else scales[None, :]
        zeros = None if zeros is None else (zeros.T if zeros.ndim == 2 else zeros[None, :])
    elif scales.ndim == 1:
        scales = scales[None, :]
        zeros = None if zeros is None else zeros[None, :]
    rows = codes.shape[0]
    block_size = dq.attributes.get_int("block_size", 0) or rows
    return CompressedWeight(
        fmt, np.ascontiguousarray(codes), np.ascontiguousarray(scales), zeros, block_size, global_scale
    )


def dequantize_canonical(model: ir.Model) -> int:
    """Replace every canonical weight DQ by its float values, in place; returns how many.

    The float model computes exactly what the compressed one means: the reference the lowering
    tests compare runtime kernels against, and the benchmark's emulation of formats a runtime
    cannot run.
    """
    replaced = 0
    for dq in list(model.graph):
        consumer = canonical_consumer(dq)
        if consumer is None:
            continue
        values = read_canonical(dq).dequantize()
        values = values.T if consumer.op_type == "Gather" else values
        constants = [value for value in dq.inputs if value is not None]
        values = as_type(values, float_type_of(dq.outputs[0]))
        dq.outputs[0].replace_all_uses_with(add_initializer(model.graph, f"{dq.name}_values", values))
        model.graph.remove(dq, safe=True)
        for value in constants:
            drop_if_unused(model.graph, value)
        replaced += 1
    return replaced
