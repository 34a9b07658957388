"""Lowering the canonical QDQ graph to the form onnxruntime's CPU provider fuses.

The QDQ insertion pass already emits that form for graphs it made. These rules repair what other
producers leave (a QDQ model from another tool, a later pass that shared a DQ):

1. `DedicateDequantizePass`: a DequantizeLinear read by several nodes is duplicated, one per
   consumer (ORT duplicates them itself today; the checker still insists, so what we emit does
   not depend on that).
2. `RequantizeSharedOutputPass`: a quantized node whose output feeds a QuantizeLinear *and* float
   consumers is refused by ORT's selectors (QLinear* needs the Q as sole consumer, and
   MatMulIntegerToFloat refuses an output Q). The float consumers are made to read the quantized
   output through their own DequantizeLinear, so the node fuses as QLinearMatMul/QLinearConv.
   Graph outputs stay float: that unit stays unfused and the fusion count says why.
3. `Float32IslandsPass` (`fp32_islands`): an FP16 model's quantized MatMul / Gemm run as FP32
   islands, the only form the CPU provider fuses.
"""

from __future__ import annotations

import onnx_ir as ir

from qcompiler.backends.onnxruntime.fp32_islands import Float32IslandsPass
from qcompiler.irutil import insert_dequantize


class DedicateDequantizePass(ir.passes.InPlacePass):
    """Give every consumer of a shared DequantizeLinear its own copy."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Duplicate shared DQs; `modified` tells whether any was shared."""
        modified = False
        for node in list(model.graph):
            if node.op_type == "DequantizeLinear" and node.domain in ("", "ai.onnx"):
                modified |= self._try_dedicate(model.graph, node)
        return ir.passes.PassResult(model, modified)

    @staticmethod
    def _try_dedicate(graph: ir.Graph, node: ir.Node) -> bool:
        output = node.outputs[0]
        uses = list(output.uses())
        if len(uses) < 2 or output.is_graph_output():
            return False
        attributes = {attribute.name: attribute.value for attribute in node.attributes.values()}
        for copy_index, use in enumerate(uses[1:], start=1):
            insert_dequantize(
                graph,
                use.node,
                use.idx,
                list(node.inputs),
                name=f"{node.name}/copy{copy_index}",
                like=output,
                attributes=attributes,
            )
        return True


def _is_dequantized(value: ir.Value | None) -> bool:
    producer = value.producer() if value is not None else None
    return producer is not None and producer.op_type == "DequantizeLinear"


class RequantizeSharedOutputPass(ir.passes.InPlacePass):
    """Route float consumers of a quantized node's output-Q'd tensor through their own DQ."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Rewrite every such output; `modified` tells whether one was found."""
        modified = False
        for node in list(model.graph):
            modified |= self._try_requantize_output(model.graph, node)
        return ir.passes.PassResult(model, modified)

    @staticmethod
    def _try_requantize_output(graph: ir.Graph, node: ir.Node) -> bool:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") or not node.outputs:
            return False
        if not any(_is_dequantized(value) for value in node.inputs):
            return False
        output = node.outputs[0]
        if output.is_graph_output():
            return False
        uses = list(output.uses())
        quantizers = [use.node for use in uses if use.node.op_type == "QuantizeLinear"]
        floats = [use for use in uses if use.node.op_type != "QuantizeLinear"]
        if not quantizers or not floats:
            return False
        q = quantizers[0]
        for index, use in enumerate(floats):
            insert_dequantize(
                graph,
                use.node,
                use.idx,
                [q.outputs[0], *q.inputs[1:]],
                name=f"{q.name}/float_consumer{index}",
                like=output,
            )
        return True


def lower(model: ir.Model) -> ir.Model:
    """Apply the ORT CPU lowering rules in place and return the model."""
    RequantizeSharedOutputPass()(model)
    DedicateDequantizePass()(model)
    Float32IslandsPass()(model)
    return model
