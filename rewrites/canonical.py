"""The canonical form of a compressed weight: constant low-bit codes -> DequantizeLinear -> MatMul / Gather.

Every backend lowers from this form and every rewrite that compresses writes it; `read_canonical`
is the inverse of `write_canonical`, and `dequantize_canonical` is the float model it means.

Canonical form: blocked ``DequantizeLinear`` (``axis=0, block_size``; opset 21 semantics, the
node's own version) or per-axis (``axis=1``) for MatMul weights [K, N]; for an embedding table
[V, H], blocks along H (``axis=1``). NF4 has no ONNX element type: its DQ is
``qcompiler.DequantizeNF4`` (uint4 table indices, block scales), lowered per backend. The
algorithm and parameters are in each DQ node's ``qcompiler.compression`` metadata.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import ml_dtypes
import numpy as np
import onnx_ir as ir

from qcompiler.irutil import add_initializer, drop_if_unused, insert_dequantize
from qcompiler.options import WeightFormat
from qcompiler.weight_formats import CompressedWeight

if TYPE_CHECKING:
    from qcompiler.rewrites.compression import WeightUnit

COMPRESSION_KEY = "qcompiler.compression"
NF4_DOMAIN = "qcompiler"
MIN_DQ_OPSET = {
    WeightFormat.INT8: 13,
    WeightFormat.INT4: 21,
    WeightFormat.FP8: 19,
    WeightFormat.MXFP4: 23,
    WeightFormat.NVFP4: 23,
    WeightFormat.NF4: 0,
}
"""The DequantizeLinear version that first accepts each format's element type (blocks: 21)."""


_CODE_TYPES = {
    (WeightFormat.INT4, True): ir.DataType.INT4,
    (WeightFormat.INT4, False): ir.DataType.UINT4,
    (WeightFormat.INT8, True): ir.DataType.INT8,
    (WeightFormat.INT8, False): ir.DataType.UINT8,
    (WeightFormat.FP8, True): ir.DataType.FLOAT8E4M3FN,
    (WeightFormat.MXFP4, True): ir.DataType.FLOAT4E2M1,
    (WeightFormat.NVFP4, True): ir.DataType.FLOAT4E2M1,
    (WeightFormat.NF4, True): ir.DataType.UINT4,
}


def _add_codes(graph: ir.Graph, name: str, codes: np.ndarray, fmt: WeightFormat, symmetric: bool) -> ir.Value:
    """Register codes as an initializer of the format's ONNX element type."""
    dtype = _CODE_TYPES[(fmt, symmetric)]
    if dtype == ir.DataType.FLOAT8E4M3FN:
        codes = codes.view(ml_dtypes.float8_e4m3fn)
    elif dtype == ir.DataType.FLOAT4E2M1:
        codes = codes.view(ml_dtypes.float4_e2m1fn)
    return add_initializer(graph, name, codes, dtype)


def write_canonical(graph: ir.Graph, unit: WeightUnit, compressed: CompressedWeight, how: str) -> ir.Node:
    """Replace the unit's float weight by codes -> DequantizeLinear (see the module docstring)."""
    weight = unit.weight
    base = str(weight.name)
    embedding = unit.role == "embedding"
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
        add_initializer(graph, f"{base}_scales", scales.astype(np.float32)),
    ]
    if zeros is not None:
        inputs.append(_add_codes(graph, f"{base}_zero_points", zeros, compressed.format, False))
    axis = int(embedding == blocked)  # the axis the scales run along (blocks: the blocked axis)
    attributes: dict[str, int] = {"axis": axis}
    if blocked:
        attributes["block_size"] = compressed.block_size
    metadata = {COMPRESSION_KEY: how}
    if compressed.global_scale is not None:
        metadata[COMPRESSION_KEY] += f"; global scale {compressed.global_scale:.9g} folded into block scales"
    index = 0 if embedding else 1
    dq = insert_dequantize(
        graph,
        unit.node,
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
        dq.version = (
            MIN_DQ_OPSET[compressed.format] if not blocked else max(21, MIN_DQ_OPSET[compressed.format])
        )
    drop_if_unused(graph, weight)
    return dq


_FORMAT_OF_TYPE = {
    ir.DataType.INT4: WeightFormat.INT4,
    ir.DataType.UINT4: WeightFormat.INT4,
    ir.DataType.INT8: WeightFormat.INT8,
    ir.DataType.UINT8: WeightFormat.INT8,
    ir.DataType.FLOAT8E4M3FN: WeightFormat.FP8,
    ir.DataType.FLOAT4E2M1: WeightFormat.MXFP4,  # NVFP4 when the metadata says so
}


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
    if dq.op_type == "DequantizeNF4":
        fmt = WeightFormat.NF4
    else:
        fmt = _FORMAT_OF_TYPE[codes_value.dtype]  # type: ignore[index]
        if fmt is WeightFormat.MXFP4 and dq.metadata_props.get(COMPRESSION_KEY, "").startswith("nvfp4"):
            fmt = WeightFormat.NVFP4
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
    global_scale = None
    if fmt is WeightFormat.NVFP4:  # folded into the float scales; kept in the metadata (exact, %.9g)
        found = re.search(r"global scale (\S+) folded", dq.metadata_props.get(COMPRESSION_KEY, ""))
        global_scale = float(found.group(1)) if found else None
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
        dq.outputs[0].replace_all_uses_with(add_initializer(model.graph, f"{dq.name}_values", values))
        model.graph.remove(dq, safe=True)
        for value in constants:
            drop_if_unused(model.graph, value)
        replaced += 1
    return replaced
