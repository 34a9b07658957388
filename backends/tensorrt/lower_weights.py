"""Compressed weights for TensorRT: the canonical DequantizeLinear is its form, NVFP4 as two chained DQs.

TensorRT's weight-only path is ``DQ(low-bit initializer, scales) -> MatMul`` (INT4 blocked on K
with ``axis=0, block_size``, INT8 / FP8 per output channel), symmetric, the DQ feeding the GEMM
directly (`../shared/TENSORRT.md` §2.3). The canonical form written by compression is exactly
that, so lowering keeps it, checks each weight's format and raises the opset to the
DequantizeLinear version its codes need (INT4 and blocks: 21).

NVFP4 (§2.4) becomes the pattern TensorRT's parser reads for pre-quantized FP4 weights:
``DQ(E4M3 block scales, FP32 tensor scale) -> DQ(FP4 codes [K, N], those, axis=0, block_size=16)
-> MatMul`` (opset 23). The first DQ names its output type (``output_dtype``, DequantizeLinear
23), so the tensor scale stays FP32 while the block scales come out in the compute type and no
Cast sits before the GEMM. onnxruntime has no FP4 DequantizeLinear kernel: the CPU verification
folds both DQs into their values (`verification.fold_fp4_weights`).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir

from qcompiler.canonical import RECORD_KEY, canonical_consumer, read_canonical
from qcompiler.errors import UnsupportedModelError
from qcompiler.formats import WeightFormat
from qcompiler.irutil import add_initializer, drop_if_unused
from qcompiler.opset import upgrade_opset

WEIGHT_FORMATS = frozenset({WeightFormat.INT4, WeightFormat.INT8, WeightFormat.FP8, WeightFormat.NVFP4})
"""Weight-only formats with a plugin-free TensorRT path."""
FP4_DQ_OPSET = 23


def lower_weights(model: ir.Model) -> dict[str, str]:
    """Check (and for NVFP4 rewrite) every canonical weight; returns reader node -> its DQ's code type."""
    lowered: dict[str, str] = {}
    opset = 0
    for dq in list(model.graph):
        consumer = canonical_consumer(dq) if RECORD_KEY in dq.metadata_props else None
        if consumer is None:
            continue
        weight = read_canonical(dq)
        if (
            weight.format not in WEIGHT_FORMATS
            or not weight.symmetric
            or (weight.format is WeightFormat.NVFP4 and consumer.op_type != "MatMul")
        ):
            symmetry = "symmetric" if weight.symmetric else "asymmetric"
            raise UnsupportedModelError(
                f"{dq.name}: {symmetry} {weight.format.value} weights of a {consumer.op_type} have no TensorRT "
                "path (symmetric int4 / int8 / fp8, and nvfp4 for MatMul, do)"
            )
        if weight.format is WeightFormat.NVFP4:
            _chain_nvfp4(model.graph, dq, weight.global_scale)
        blocked = bool(dq.attributes.get_int("block_size", 0))
        opset = max(opset, weight.format.spec.min_dq_opset, 21 if blocked else 0)
        codes = dq.inputs[0]
        lowered[str(consumer.name)] = (
            f"DequantizeLinear({codes.dtype.name.lower() if codes and codes.dtype else '?'})"
        )
    upgrade_opset(model, opset)  # INT4 and block_size came with DequantizeLinear 21, FP8 with 19, FP4 with 23
    return lowered


def _chain_nvfp4(graph: ir.Graph, dq: ir.Node, global_scale: float | None) -> None:
    """Replace the canonical NVFP4 DQ's folded scales by ``DQ(E4M3 block scales, tensor scale)``."""
    assert global_scale is not None, f"{dq.name}: an NVFP4 weight without its tensor scale"
    folded = dq.inputs[1]
    assert folded is not None and folded.const_value is not None
    scales = np.asarray(folded.const_value.numpy(), np.float32)
    base = str(dq.name).removesuffix("/DequantizeLinear")
    block_scales = add_initializer(
        graph, f"{base}_block_scales", (scales / np.float32(global_scale)).astype(ml_dtypes.float8_e4m3fn)
    )
    tensor_scale = add_initializer(graph, f"{base}_tensor_scale", np.asarray(global_scale, np.float32))
    scale_type = folded.dtype or ir.DataType.FLOAT
    chained = ir.node(
        "DequantizeLinear",
        [block_scales, tensor_scale],
        {"output_dtype": int(scale_type)},
        name=f"{base}/block_scales/DequantizeLinear",
        version=FP4_DQ_OPSET,
        metadata_props={"qcompiler.compression": "NVFP4 block scales: E4M3 x FP32 tensor scale"},
    )
    result = chained.outputs[0]
    result.name, result.type, result.shape = (
        f"{base}_scales_dequantized",
        ir.TensorType(scale_type),
        folded.shape,
    )
    graph.insert_before(dq, chained)
    dq.replace_input_with(1, result)
    drop_if_unused(graph, folded)
