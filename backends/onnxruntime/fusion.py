"""Count which quantized node units onnxruntime actually fused, from its own optimized graph.

onnxruntime's QDQ transformers (optimization level EXTENDED) replace a DQ -> op -> [Q] node unit
by a quantized kernel that keeps the op's node name. Reading the graph ORT writes with
``optimized_model_filepath`` therefore tells, per quantized node, what it became; a node that is
still its float op with DequantizeLinear inputs was refused by ORT's selectors.
"""

from __future__ import annotations

import collections
import dataclasses
import pathlib
import tempfile
from collections.abc import Iterable

import onnx_ir as ir

from qcompiler.backends.onnxruntime.session import PROTOBUF_LIMIT, create_session, session_options
from qcompiler.io import initializer_bytes

FUSED_OP_TYPES = frozenset(
    {
        "QLinearMatMul",
        "MatMulIntegerToFloat",
        "QGemm",
        "QLinearConv",
        "QLinearAdd",
        "QLinearMul",
        "QLinearConcat",
        "QLinearSigmoid",
        "QLinearLeakyRelu",
        "QLinearSoftmax",
        "QLinearAveragePool",
        "QLinearGlobalAveragePool",
        "QLinearWhere",
        "QAttention",
        "MatMulInteger",
        "ConvInteger",
        "DynamicQuantizeMatMul",
        "MatMulNBits",
    }
)


@dataclasses.dataclass
class FusionReport:
    """What ORT made of each quantized node."""

    fused: dict[str, str]
    """node name -> the quantized kernel ORT runs."""
    not_fused: dict[str, str]
    """node name -> why it still runs in float."""
    kernel_counts: dict[str, int]
    """quantized kernel type -> how many the optimized graph has."""

    def to_dict(self) -> dict[str, object]:
        """JSON-friendly view."""
        return {
            "fused": len(self.fused),
            "not_fused": len(self.not_fused),
            "kernels": self.kernel_counts,
            "not_fused_nodes": self.not_fused,
        }


def optimized_graph(model: ir.Model) -> ir.Model:
    """The graph onnxruntime runs after its EXTENDED-level transformations (QDQ fusions included).

    For reading structure (op types, names, which inputs are constants): weights written as
    external data lived in a temporary folder and cannot be read after this returns.
    """
    with tempfile.TemporaryDirectory(prefix="qcompile-ort-") as folder:
        path = pathlib.Path(folder) / "optimized.onnx"
        options = session_options(level="extended", optimized_path=str(path))
        if initializer_bytes(model) > PROTOBUF_LIMIT:
            options.add_session_config_entry(
                "session.optimized_model_external_initializers_file_name", "optimized.onnx.data"
            )
        create_session(model, options)
        return ir.load(path)


def count_fusion(model: ir.Model, quantized_nodes: Iterable[str]) -> FusionReport:
    """Classify each name in `quantized_nodes` as fused (and into what) or not (and why)."""
    optimized = optimized_graph(model)
    by_name = {str(node.name): node for node in optimized.graph}
    fused: dict[str, str] = {}
    not_fused: dict[str, str] = {}
    for name in quantized_nodes:
        node = by_name.get(name)
        if node is None:
            not_fused[name] = "absent from ORT's optimized graph (merged into another fusion)"
        elif node.op_type in FUSED_OP_TYPES:
            fused[name] = node.op_type
        else:
            not_fused[name] = _refusal_reason(node)
    kernels = collections.Counter(node.op_type for node in optimized.graph if node.op_type in FUSED_OP_TYPES)
    return FusionReport(fused, not_fused, dict(sorted(kernels.items())))


def _refusal_reason(node: ir.Node) -> str:
    dq_inputs = [
        index
        for index, value in enumerate(node.inputs)
        if value is not None
        and value.producer() is not None
        and value.producer().op_type == "DequantizeLinear"  # type: ignore[union-attr]
    ]
    output = node.outputs[0]
    output_q = any(use.node.op_type == "QuantizeLinear" for use in output.uses())
    others = [use for use in output.uses() if use.node.op_type != "QuantizeLinear"]
    if output_q and (others or output.is_graph_output()):
        where = f"{len(others)} float consumer(s)" if others else "a graph output"
        return (
            f"its output feeds a QuantizeLinear and also {where}; ORT fuses a unit with an "
            "output Q only when the Q is its sole consumer"
        )
    if not dq_inputs:
        return f"runs as float {node.op_type}: its inputs are not dequantized in ORT's graph"
    shared = [
        index
        for index in dq_inputs
        if len(node.inputs[index].uses()) > 1  # type: ignore[union-attr]
    ]
    if shared:
        return (
            f"DequantizeLinear on input(s) {shared} is shared with other nodes; ORT fuses only dedicated DQs"
        )
    return (
        f"ORT's QDQ selector refused {node.op_type} with DQ on input(s) {dq_inputs} and "
        f"{'a' if output_q else 'no'} Q on the output (unsupported type or shape combination)"
    )
