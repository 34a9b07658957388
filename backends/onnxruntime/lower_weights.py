"""Lowering compressed weights to onnxruntime's packed contrib kernels.

The canonical form (rewrites/compression.py) is codes -> DequantizeLinear -> MatMul / Gather.
onnxruntime runs blocked int4 DQ only at opset 21, and a DQ left beside its MatMul dequantizes
the whole weight on every run, so each pattern becomes one kernel on packed weights:

- INT4 / INT8 DQ -> MatMul: ``com.microsoft.MatMulNBits`` (bits 4 or 8, `accuracy_level` from
  the options and recorded on the node);
- NF4 (``qcompiler.DequantizeNF4``) -> MatMul: ``com.microsoft.MatMulBnb4`` (quant_type 1);
- INT4 / INT8 DQ -> Gather (embeddings): ``com.microsoft.GatherBlockQuantized``;
- MXFP4 / NVFP4 DQ -> MatMul: our ``ai.onnx.contrib.MatMulFP4`` (`fp4_matmul`), since
  onnxruntime has no float4e2m1 DequantizeLinear kernel.

The model's opset is untouched (none of these needs opset 21). Anything else keeps its DQ; the
legality checker names what onnxruntime cannot run.
"""

from __future__ import annotations

import onnx_ir as ir

from qcompiler.backends.onnxruntime import fp4_matmul
from qcompiler.backends.onnxruntime.legality import DEQUANTIZABLE_TYPES
from qcompiler.backends.onnxruntime.packing import (
    pack_gather_block_quantized,
    pack_matmul_bnb4,
    pack_matmul_nbits,
)
from qcompiler.canonical import COMPRESSION_KEY, RECORD_KEY, canonical_consumer, read_canonical
from qcompiler.errors import UnsupportedModelError
from qcompiler.formats import FORMATS, WeightFormat
from qcompiler.irutil import add_initializer, drop_if_unused
from qcompiler.opset import upgrade_opset
from qcompiler.precision import as_scale, as_type, float_type_of
from qcompiler.weight_formats import CompressedWeight

MS_DOMAIN = "com.microsoft"
FP4_FORMATS = frozenset(fmt for fmt, spec in FORMATS.items() if spec.signed_code == ir.DataType.FLOAT4E2M1)
"""Formats lowered to our packed FP4 MatMul (onnxruntime's DequantizeLinear has no FP4 kernel)."""
LOWERED_FORMATS = frozenset(fmt for fmt in WeightFormat if fmt is not WeightFormat.FP8)
"""Formats with a packed onnxruntime kernel; FP8 stays a DequantizeLinear (ORT runs it from opset 19)."""


class LowerCompressedWeightsPass(ir.passes.InPlacePass):
    """Replace canonical compressed-weight patterns with onnxruntime's packed kernels."""

    def __init__(self, accuracy_level: int = 4, int8_accuracy_level: int = 0) -> None:
        super().__init__()
        self.accuracy_level = accuracy_level
        self.int8_accuracy_level = int8_accuracy_level
        self.lowered: dict[str, str] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Lower every pattern found; `lowered` maps consumer name -> kernel."""
        for dq in list(model.graph):
            # Only weights written by compression: a static W8A8 unit's weight DQ looks the same
            # but feeds a MatMul whose input is quantized too (MatMulIntegerToFloat's pattern).
            consumer = canonical_consumer(dq) if RECORD_KEY in dq.metadata_props else None
            if consumer is None:
                continue
            weight = read_canonical(dq)
            if weight.format not in LOWERED_FORMATS:
                continue
            if consumer.op_type == "MatMul" and weight.format in FP4_FORMATS:
                self._lower_fp4(model, dq, consumer, weight)
            elif consumer.op_type == "MatMul":
                self._lower_matmul(model, dq, consumer, weight)
            elif weight.format not in FP4_FORMATS:
                self._lower_gather(model, dq, consumer, weight)
        if any(kernel != fp4_matmul.OP_TYPE for kernel in self.lowered.values()):
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        if fp4_matmul.OP_TYPE in self.lowered.values():
            model.opset_imports.setdefault(fp4_matmul.DOMAIN, 1)
        return ir.passes.PassResult(model, modified=bool(self.lowered))

    def _replace(
        self, model: ir.Model, dq: ir.Node, consumer: ir.Node, kernel: ir.Node, *, last: ir.Node | None = None
    ) -> None:
        """Put `kernel` (and `last`, a Cast reading it, if given) in place of `consumer` and its DQ."""
        graph = model.graph
        kernel.metadata_props.update(dq.metadata_props)
        kernel.metadata_props.update(
            {
                key: value
                for key, value in consumer.metadata_props.items()
                if key not in (COMPRESSION_KEY, RECORD_KEY)
            }
        )
        output = consumer.outputs[0]
        graph.insert_before(consumer, kernel)
        result = kernel.outputs[0]
        if last is not None:
            graph.insert_after(kernel, last)
            result.name, result.shape = f"{output.name}/float32", output.shape
            result.type = ir.TensorType(ir.DataType.FLOAT)
            result = last.outputs[0]
        result.name, output.name = str(output.name), f"{output.name}_replaced"
        result.type, result.shape = output.type, output.shape
        output.replace_all_uses_with(result, replace_graph_outputs=True)
        constants = [value for value in dq.inputs if value is not None]
        graph.remove([consumer, dq], safe=True)
        for value in constants:
            drop_if_unused(graph, value)
        self.lowered[str(consumer.name)] = kernel.op_type

    def _lower_matmul(self, model: ir.Model, dq: ir.Node, matmul: ir.Node, weight: CompressedWeight) -> None:
        graph, base = model.graph, str(matmul.name)
        if weight.format is WeightFormat.NF4:
            bnb = pack_matmul_bnb4(weight)
            inputs = [
                matmul.inputs[0],
                add_initializer(graph, f"{base}_nf4", bnb.packed),
                add_initializer(
                    graph, f"{base}_absmax", as_type(bnb.absmax, float_type_of(matmul.inputs[0]))
                ),
            ]
            attributes = {"K": bnb.K, "N": bnb.N, "block_size": bnb.block_size, "quant_type": 1}
            kernel = ir.node("MatMulBnb4", inputs, attributes, domain=MS_DOMAIN, name=f"{base}_Bnb4")
        else:
            packed = pack_matmul_nbits(weight)
            inputs = [
                matmul.inputs[0],
                add_initializer(graph, f"{base}_packed", packed.packed),
                # MatMulNBits reads its scales in A's type (T1: float32 / float16)
                add_initializer(
                    graph, f"{base}_scales", as_scale(packed.scales, float_type_of(matmul.inputs[0]))
                ),
            ]
            if packed.zero_points is not None:
                inputs.append(add_initializer(graph, f"{base}_zero_points", packed.zero_points))
            attributes = {
                "K": packed.K,
                "N": packed.N,
                "bits": packed.bits,
                "block_size": packed.block_size,
                "accuracy_level": self.accuracy_level if packed.bits == 4 else self.int8_accuracy_level,
            }
            kernel = ir.node("MatMulNBits", inputs, attributes, domain=MS_DOMAIN, name=f"{base}_NBits")
        self._replace(model, dq, matmul, kernel)

    def _lower_fp4(self, model: ir.Model, dq: ir.Node, matmul: ir.Node, weight: CompressedWeight) -> None:
        graph, base = model.graph, str(matmul.name)
        packed = fp4_matmul.pack_fp4(weight)
        inputs = [
            matmul.inputs[0],
            add_initializer(graph, f"{base}_fp4", packed.packed),
            add_initializer(graph, f"{base}_fp4_scales", packed.scales),
            add_initializer(graph, f"{base}_fp4_global_scale", packed.global_scale),
        ]
        attributes = {
            "K": packed.K,
            "N": packed.N,
            "block_size": packed.block_size,
            "scale_type": packed.scale_type,
        }
        kernel = ir.node(fp4_matmul.OP_TYPE, inputs, attributes, domain=fp4_matmul.DOMAIN, name=f"{base}_FP4")
        computed = float_type_of(matmul.inputs[0])
        if computed != ir.DataType.FLOAT:  # the numpy op computes in FP32: Casts around it
            to_float = ir.node(
                "Cast", [matmul.inputs[0]], {"to": ir.DataType.FLOAT}, name=f"{base}_FP4/in/Cast"
            )
            to_float.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
            graph.insert_before(matmul, to_float)
            kernel.replace_input_with(0, to_float.outputs[0])
            back = ir.node("Cast", [kernel.outputs[0]], {"to": computed}, name=f"{base}_FP4/out/Cast")
            self._replace(model, dq, matmul, kernel, last=back)
            return
        self._replace(model, dq, matmul, kernel)

    def _lower_gather(self, model: ir.Model, dq: ir.Node, gather: ir.Node, weight: CompressedWeight) -> None:
        try:
            packed = pack_gather_block_quantized(weight)
        except UnsupportedModelError:
            return  # the DQ stays; the checker says whether onnxruntime runs it
        graph, base = model.graph, str(gather.name)
        inputs = [
            add_initializer(graph, f"{base}_data", packed.data),
            gather.inputs[1],
            add_initializer(
                graph, f"{base}_scales", as_scale(packed.scales, float_type_of(gather.outputs[0]))
            ),
        ]
        if packed.zero_points is not None:
            inputs.append(add_initializer(graph, f"{base}_zero_points", packed.zero_points))
        attributes = {
            "bits": packed.bits,
            "block_size": packed.block_size,
            "gather_axis": 0,
            "quantize_axis": 1,
        }
        kernel = ir.node(
            "GatherBlockQuantized", inputs, attributes, domain=MS_DOMAIN, name=f"{base}_BlockQuantized"
        )
        self._replace(model, dq, gather, kernel)


def lower_weights(model: ir.Model, accuracy_level: int = 4, int8_accuracy_level: int = 0) -> dict[str, str]:
    """Lower every compressed weight in place; returns consumer name -> kernel op type.

    `accuracy_level` applies to 4-bit weights, `int8_accuracy_level` to INT8 ones (INT8 weights
    in a 4-bit model are the accuracy fallback: int8 activations inside the kernel would undo it).

    DQs left over that onnxruntime runs at a newer opset (FP8 weights: 19) raise the model's
    opset to that version; any others are left for the checker to name.
    """
    lowering = LowerCompressedWeightsPass(accuracy_level, int8_accuracy_level)
    lowering(model)
    kept = [
        node
        for node in model.graph
        if node.op_type == "DequantizeLinear"
        and node.version is not None
        and node.inputs[0] is not None
        and node.inputs[0].dtype in DEQUANTIZABLE_TYPES
    ]
    needed = max((node.version or 0 for node in kept), default=0)
    if needed > model.opset_imports.get("", 0):
        upgrade_opset(model, needed)
        for node in kept:
            node.version = None
        lowering.lowered.update(
            {str(next(iter(node.outputs[0].uses())).node.name): f"DequantizeLinear-{needed}" for node in kept}
        )
    return lowering.lowered
