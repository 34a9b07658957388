"""Bring an exported graph into the canonical form the rewrite patterns expect.

Exporters leave Constant nodes, foldable shape arithmetic, duplicated subexpressions and unnamed
nodes. Patterns should see one spelling of each thing: weights as initializers (so "has a
constant weight" is `value.const_value is not None`), folded constants, unique node names (the
report and fusion counting refer to nodes by name) and inferred types on every tensor.
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common
from onnxscript.optimizer import optimize_ir


class NormalizePass(ir.passes.InPlacePass):
    """Fold constants, lift them to initializers, dedupe, name every node, infer shapes.

    Cases:
    1. Functions are inlined and constant subgraphs folded (onnxscript's optimizer, which also
       lifts every Constant to an initializer, removes unused nodes and eliminates common
       subexpressions).
    2. Initializers listed as graph inputs are removed from the inputs, so weights are constants.
    3. Every node gets a unique name; shapes and types are inferred and the graph sorted.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Normalize in place; reports `modified=True` (the passes do not all report changes)."""
        common.RemoveInitializersFromInputsPass()(model)
        optimize_ir(model)
        common.NameFixPass()(model)
        common.ShapeInferencePass()(model)
        common.TopologicalSortPass()(model)
        return ir.passes.PassResult(model, modified=True)
