"""Lowering the canonical QDQ graph to the form onnxruntime's CPU provider fuses.

The QDQ insertion pass already emits that form for graphs it made. These rules repair what other
producers leave (a QDQ model from another tool, a later pass that shared a DQ):

1. ``dedicate_dequantize``: a DequantizeLinear read by several nodes is duplicated, one per
   consumer, because ORT's QDQ selectors accept only node units whose DQ has a single consumer.
"""

from __future__ import annotations

import onnx_ir as ir


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
        for copy_index, use in enumerate(uses[1:], start=1):
            copy = ir.node("DequantizeLinear", list(node.inputs), name=f"{node.name}/copy{copy_index}")
            for attribute in node.attributes.values():
                copy.attributes[attribute.name] = attribute
            copy.outputs[0].dtype = output.dtype
            copy.outputs[0].shape = output.shape
            copy.outputs[0].name = f"{output.name}/copy{copy_index}"
            graph.insert_before(use.node, copy)
            use.node.replace_input_with(use.idx, copy.outputs[0])
        return True


def lower(model: ir.Model) -> ir.Model:
    """Apply the ORT CPU lowering rules in place and return the model."""
    DedicateDequantizePass()(model)
    return model
