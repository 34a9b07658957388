"""Compressed weights for TensorRT: the canonical blocked DequantizeLinear is already its form.

TensorRT's weight-only path is ``DQ(low-bit initializer, scales) -> MatMul`` (INT4 blocked on K
with ``axis=0, block_size``, INT8 / FP8 per output channel), symmetric, the DQ feeding the GEMM
directly (`../shared/TENSORRT.md` §2.3). The canonical form written by compression is exactly
that, so lowering keeps it, checks each weight's format and raises the opset to the DequantizeLinear
version its codes need (INT4 and blocks: 21). Formats TensorRT has no path for are refused with the weight's name.
"""

from __future__ import annotations

import onnx_ir as ir

from qcompiler.canonical import RECORD_KEY, canonical_consumer, read_canonical
from qcompiler.errors import UnsupportedModelError
from qcompiler.formats import WeightFormat
from qcompiler.opset import upgrade_opset

WEIGHT_FORMATS = frozenset({WeightFormat.INT4, WeightFormat.INT8, WeightFormat.FP8})
"""Weight-only formats with a plugin-free TensorRT path from the canonical DQ."""


def lower_weights(model: ir.Model) -> dict[str, str]:
    """Check every canonical weight; returns reader node -> the element type its DQ dequantizes."""
    lowered: dict[str, str] = {}
    opset = 0
    for dq in model.graph:
        consumer = canonical_consumer(dq) if RECORD_KEY in dq.metadata_props else None
        if consumer is None:
            continue
        weight = read_canonical(dq)
        if weight.format not in WEIGHT_FORMATS or not weight.symmetric:
            symmetry = "symmetric" if weight.symmetric else "asymmetric"
            raise UnsupportedModelError(
                f"{dq.name}: {symmetry} {weight.format.value} weights have no TensorRT path "
                "(symmetric int4 / int8 / fp8 do)"
            )
        blocked = bool(dq.attributes.get_int("block_size", 0))
        opset = max(opset, weight.format.spec.min_dq_opset, 21 if blocked else 0)
        codes = dq.inputs[0]
        lowered[str(consumer.name)] = (
            f"DequantizeLinear({codes.dtype.name.lower() if codes and codes.dtype else '?'})"
        )
    upgrade_opset(model, opset)  # INT4 and block_size came with DequantizeLinear 21, FP8 with 19
    return lowered
