"""Bring an exported graph into the canonical form the rewrite patterns expect.

Exporters leave Constant nodes, foldable shape arithmetic, duplicated subexpressions and unnamed
nodes. Patterns should see one spelling of each thing: weights as initializers (so "has a
constant weight" is `value.const_value is not None`), folded constants, unique node names (the
report and fusion counting refer to nodes by name) and inferred types on every tensor.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common
from onnxscript.optimizer import fold_constants, optimize_ir

from qcompiler.irutil import add_initializer, forget_removed_io, release_mapped
from qcompiler.rewrites.conv_affine import FoldConvAffinePass


class FoldWeightTransposePass(ir.passes.InPlacePass):
    """Materialize ``Transpose(initializer)`` feeding MatMul/Gemm weights as a new initializer.

    Exporters write tied LM heads as ``MatMul(h, Transpose(embedding))``. The constant folder
    skips it (the output is over its size limit), which would leave the head without a constant
    weight, invisible to quantization. The embedding keeps its own initializer for the Gather.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Fold every such Transpose; `modified` tells whether one was found."""
        modified = False
        for node in list(model.graph):
            modified |= self._try_fold_transpose(model.graph, node)
        return ir.passes.PassResult(model, modified)

    @staticmethod
    def _try_fold_transpose(graph: ir.Graph, node: ir.Node) -> bool:
        if node.op_type != "Transpose" or node.inputs[0] is None or node.inputs[0].const_value is None:
            return False
        output = node.outputs[0]
        uses = list(output.uses())
        if (
            output.is_graph_output()
            or not uses
            or any(use.node.op_type not in ("MatMul", "Gemm") or use.idx != 1 for use in uses)
        ):
            return False
        array = node.inputs[0].const_value.numpy()
        perm = node.attributes.get_ints("perm", list(range(array.ndim))[::-1])
        folded = add_initializer(
            graph, f"{node.inputs[0].name}_transposed", np.ascontiguousarray(np.transpose(array, perm))
        )
        del array
        release_mapped(node.inputs[0].const_value)  # the Gather's table: read again when needed
        output.replace_all_uses_with(folded)
        graph.remove(node, safe=True)
        return True


SHAPE_PRESERVING = frozenset(
    {
        "Softmax",
        "LogSoftmax",
        "Sigmoid",
        "Relu",
        "Tanh",
        "HardSigmoid",
        "HardSwish",
        "Clip",
        "Cast",
        "Identity",
    }
)
"""Ops whose output has their first input's shape."""


class RepairOutputShapesPass(ir.passes.InPlacePass):
    """A graph output whose declared rank contradicts its shape-preserving producer takes the input's shape.

    Paddle2ONNX declares rank-0 outputs after a Softmax (PP-OCRv5 cls) or Sigmoid (det); onnx's
    shape inference then fails for the whole graph ("Inferred shape and existing shape differ in
    rank") and leaves every value untyped, and onnx's full check refuses the artifact.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Repair in place; `modified` when an output's shape changed."""
        repaired = False
        for value in model.graph.outputs:
            producer = value.producer()
            source = producer.inputs[0] if producer is not None and producer.inputs else None
            if (
                producer is not None
                and producer.op_type in SHAPE_PRESERVING
                and source is not None
                and source.shape is not None
                and value.shape is not None
                and len(value.shape) != len(source.shape)
            ):
                value.shape = source.shape
                repaired = True
        return ir.passes.PassResult(model, modified=repaired)


class NormalizePass(ir.passes.InPlacePass):
    """Fold constants, lift them to initializers, dedupe, name every node, infer shapes.

    Cases:
    1. Functions are inlined and constant subgraphs folded (onnxscript's optimizer, which also
       lifts every Constant to an initializer, removes unused nodes and eliminates common
       subexpressions).
    2. Initializers listed as graph inputs are removed from the inputs, so weights are constants.
    3. Transposes of initializers that feed MatMul/Gemm weights (tied LM heads) are folded, and
       per-channel affine ops after a Conv (bias Add, BatchNormalization, scalar Mul / Add) fold
       into its weight and bias.
    4. Every node gets a unique name; a declared output shape that contradicts its producer is
       repaired; shapes and types are inferred and the graph sorted.
    """

    def __init__(self, *, rewrite: bool = True) -> None:
        """`rewrite` False skips onnxscript's pattern rewrite rules.

        Those (cast/reshape/no-op cleanups) cost seconds on an LLM export and matter only where a
        pass matches activation patterns; constant folding, lifting and CSE always run.
        """
        super().__init__()
        self.rewrite = rewrite

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Normalize in place; reports `modified=True` (the passes do not all report changes)."""
        common.RemoveInitializersFromInputsPass()(model)
        if self.rewrite:
            optimize_ir(model)
        else:
            _fold_without_rewrites(model)
        FoldWeightTransposePass()(model)
        FoldConvAffinePass()(model)
        common.NameFixPass()(model)
        RepairOutputShapesPass()(model)  # else shape inference fails on the whole graph
        common.ShapeInferencePass()(model)
        common.TopologicalSortPass()(model)
        forget_removed_io(model.graph)
        return ir.passes.PassResult(model, modified=True)


def _fold_without_rewrites(model: ir.Model) -> None:
    """optimize_ir's sequence without its RewritePass: inline, fold, clean up, lift, dedupe, CSE."""
    common.InlinePass()(model)
    fold_constants(model)
    ir.passes.Sequential(
        common.RemoveUnusedNodesPass(),
        common.RemoveUnusedFunctionsPass(),
        common.RemoveUnusedOpsetsPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.LiftSubgraphInitializersToMainGraphPass(),
        common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(),
        common.OutputFixPass(),
        common.NameFixPass(),
    )(model)
