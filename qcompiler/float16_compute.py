"""An FP32 graph made to compute in FP16, keeping FP32 only where FP16 would break it.

Strongly typed runtimes (TensorRT 10.x/11.x) run each tensor in the type the ONNX gives it: an
FP32 remainder beside the Q/DQ nodes runs in FP32. So the unquantized part must be FP16 in the
file. The interface keeps its types (a Cast after each FP32 input, before each FP32 output, as
ModelOpt's ``high_precision_dtype=fp16`` does), and three kinds of tensors stay FP32, each for a
reason the report names:

- **integer-valued**: what follows a Cast from an integer (position ids, masks, shapes) until it
  meets an activation: FP16 holds integers exactly only up to 2048, so rotary angles of positions
  past that, or shape arithmetic, would be wrong;
- **squares**: what follows a ``Pow`` / ``ReduceSumSquare`` / ``ReduceL2`` until it meets an
  activation: the variance of a decomposed LayerNorm / RMSNorm overflows FP16 (65504) once
  hidden values pass ~256 (transformers upcasts these in its own FP16 models);
- **shape math**: float tensors read only (transitively) by Casts to integers;
- **subgraphs**: nodes holding a graph attribute (If / Loop / Scan) are left alone.

Q/DQ follow their neighbours (a quantizer of a kept tensor keeps FP32 scales; a weight DQ read
only by kept nodes too), so no Cast lands between a DQ and its GEMM. Constants are rounded once
to FP16, clipped to its range (an attention mask's -3.4e38 becomes -65504); quantization scales
stay positive (`precision.as_scale`).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from qcompiler.irutil import add_initializer, cast_graph_output
from qcompiler.precision import as_scale

FP32, FP16 = ir.DataType.FLOAT, ir.DataType.FLOAT16
SQUARE_OPS = frozenset({"Pow", "ReduceSumSquare", "ReduceL2"})
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
FLOAT32_INPUTS = frozenset({("Resize", 2), ("Upsample", 1)})
"""(op type, input index) that ONNX types as float32 whatever the data's type (Resize's scales)."""


@dataclasses.dataclass
class Float16Report:
    """What the conversion did: counts, and the nodes kept FP32 by reason."""

    retyped: int = 0
    constants: int = 0
    casts: int = 0
    kept: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    @property
    def line(self) -> str:
        """One line for the report's warnings."""
        kept = ", ".join(f"{len(names)} {reason}" for reason, names in sorted(self.kept.items()))
        return (
            f"float32 -> float16: {self.retyped} tensors and {self.constants} constants in float16, "
            f"{self.casts} Casts at the float32 boundaries" + (f"; kept float32: {kept}" if kept else "")
        )


def _is_float32_constant(value: ir.Value) -> bool:
    if value.dtype != FP32:
        return False
    if value.const_value is not None or value.is_initializer():
        return True
    producer = value.producer()
    return producer is not None and producer.op_type == "Constant" and producer.domain in ("", "ai.onnx")


def _activation_inputs(node: ir.Node) -> list[ir.Value]:
    """The FP32 inputs of `node` that are computed (not constants)."""
    return [
        value
        for value in node.inputs
        if value is not None and value.dtype == FP32 and not _is_float32_constant(value)
    ]


def kept_float32(model: ir.Model) -> dict[ir.Node, str]:
    """The nodes that stay FP32, each with its reason (see the module docstring)."""
    graph = model.graph
    kept: dict[ir.Node, str] = {}
    kept_values: set[ir.Value] = set()
    for node in graph:
        reason = _seed_reason(node)
        if reason is None and node.op_type == "DequantizeLinear" and node.inputs[0] is not None:
            reason = kept.get(node.inputs[0].producer())  # type: ignore[arg-type]
        if reason is None:
            inputs = _activation_inputs(node)
            carried = [kept.get(value.producer()) for value in inputs if value in kept_values]  # type: ignore[arg-type]
            if inputs and len(carried) == len(inputs):
                reason = carried[0]
        if reason is not None:
            kept[node] = reason
            kept_values.update(output for output in node.outputs if output.dtype == FP32)
    _keep_shape_math(graph, kept)
    _keep_weight_dequantizers(graph, kept)
    return kept


def _seed_reason(node: ir.Node) -> str | None:
    if any(
        attribute.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
        for attribute in node.attributes.values()
    ):
        return "subgraphs"
    if node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type in SQUARE_OPS:
        return "squares"
    if node.op_type == "Cast" and node.attributes.get_int("to", 0) == FP32:
        source = node.inputs[0]
        if source is not None and source.dtype is not None and not source.dtype.is_floating_point():
            return "integer-valued"
    return None


def _keep_shape_math(graph: ir.Graph, kept: dict[ir.Node, str]) -> None:
    """Keep float nodes whose outputs are read only by Casts to integers or by such nodes."""
    for node in reversed(list(graph)):
        if node in kept or node.op_type in QDQ_OPS:
            continue
        floats = [output for output in node.outputs if output.dtype == FP32]
        if not floats or any(output.is_graph_output() or not output.uses() for output in floats):
            continue
        if all(_reads_as_shape(use.node, kept) for output in floats for use in output.uses()):
            kept[node] = "shape math"


def _reads_as_shape(reader: ir.Node, kept: dict[ir.Node, str]) -> bool:
    if kept.get(reader) == "shape math":
        return True
    if reader.op_type != "Cast":
        return False
    to = ir.DataType(reader.attributes.get_int("to", 0))
    return not to.is_floating_point()


def _keep_weight_dequantizers(graph: ir.Graph, kept: dict[ir.Node, str]) -> None:
    """A DQ read only by kept nodes (a subgraph's, say) stays FP32 with them.

    A DQ reading a kept Q is kept by `kept_float32`'s forward walk already.
    """
    for node in graph:
        if node.op_type != "DequantizeLinear" or node in kept:
            continue
        readers = [use.node for use in node.outputs[0].uses()]
        if readers and all(reader in kept for reader in readers) and not node.outputs[0].is_graph_output():
            kept[node] = kept[readers[0]]


def to_float16(model: ir.Model) -> Float16Report:
    """Make the FP32 graph of `model` compute in FP16 in place (see the module docstring)."""
    graph = model.graph
    kept = kept_float32(model)
    report = Float16Report()
    for node, reason in kept.items():
        report.kept.setdefault(reason, []).append(str(node.name))
    converted_constants: dict[ir.Value, ir.Value] = {}
    down_casts: dict[ir.Value, ir.Value] = {}
    up_casts: dict[ir.Value, ir.Value] = {}
    interface = [value for value in graph.outputs if value.dtype == FP32]
    originally_fp32 = {
        output for node in graph if node not in kept for output in node.outputs if output.dtype == FP32
    }
    for node in list(graph):
        if node in kept:
            for index, value in enumerate(node.inputs):
                if value is not None and value.dtype == FP16 and value in originally_fp32:
                    node.replace_input_with(index, _cast(graph, value, FP32, node, up_casts, report))
            continue
        _retype_attributes(node, report)
        for index, value in enumerate(node.inputs):
            if value is None:
                continue
            if (node.op_type, index) in FLOAT32_INPUTS:
                if value.dtype == FP16 and value in originally_fp32:
                    node.replace_input_with(index, _cast(graph, value, FP32, node, up_casts, report))
                continue
            if value.dtype != FP32 or (index == 1 and _names_output_type(node)):
                continue  # a DQ that names its output type keeps its scale's (NVFP4's FP32 tensor scale)
            if value.is_initializer() or value.const_value is not None:
                node.replace_input_with(
                    index, _float16_constant(graph, value, node, index, converted_constants, report)
                )
            elif value not in originally_fp32:  # a graph input or a kept node's output
                node.replace_input_with(index, _cast(graph, value, FP16, node, down_casts, report))
        for output in node.outputs:
            if output in originally_fp32:
                output.type = ir.TensorType(FP16)  # a new type object: values may share one
                report.retyped += 1
    for value in interface:
        if value.dtype == FP16:
            cast_graph_output(graph, value, FP32, f"{value.name}_float16")
    for original, twin in converted_constants.items():
        if original.uses() or original.is_graph_input() or original.is_graph_output():
            continue  # a kept node still reads the FP32 original
        name = str(original.name)
        graph.initializers.pop(name)
        graph.initializers.pop(str(twin.name))
        twin.name = name
        twin.const_value.name = name  # type: ignore[union-attr]
        graph.register_initializer(twin)
    return report


def _names_output_type(node: ir.Node) -> bool:
    """A DequantizeLinear whose ``output_dtype`` (opset 23) sets its output type, not its scale."""
    return node.op_type == "DequantizeLinear" and "output_dtype" in node.attributes


def _retype_attributes(node: ir.Node, report: Float16Report) -> None:
    """A converted node's FP32 Cast targets and tensor attributes (Constant, ConstantOfShape) become FP16."""
    if node.domain not in ("", "ai.onnx"):
        return
    if node.op_type == "Cast" and node.attributes.get_int("to", 0) == FP32:
        node.attributes["to"] = ir.AttrInt64("to", int(FP16))
    if _names_output_type(node) and node.attributes.get_int("output_dtype", 0) == FP32:
        node.attributes["output_dtype"] = ir.AttrInt64("output_dtype", int(FP16))
    attribute = node.attributes.get("value")
    if attribute is not None and attribute.type == ir.AttributeType.TENSOR and attribute.value.dtype == FP32:
        array = _clipped(np.asarray(attribute.value.numpy()))
        node.attributes["value"] = ir.AttrTensor("value", ir.tensor(array, name=attribute.value.name))
        report.constants += 1


def _clipped(array: np.ndarray) -> np.ndarray:
    limit = float(np.finfo(np.float16).max)
    return np.clip(np.asarray(array, np.float32), -limit, limit).astype(np.float16)


def _float16_constant(
    graph: ir.Graph,
    value: ir.Value,
    reader: ir.Node,
    index: int,
    converted: dict[ir.Value, ir.Value],
    report: Float16Report,
) -> ir.Value:
    """The FP16 twin of a constant FP32 input (made once; the FP32 one stays if a kept node reads it)."""
    if value in converted:
        return converted[value]
    if value.const_value is None:  # a Constant node's output: its attribute is retyped with it
        return value
    array = np.asarray(value.const_value.numpy())
    is_scale = reader.op_type in QDQ_OPS and index == 1
    fp16 = as_scale(array, FP16) if is_scale else _clipped(array)
    twin = add_initializer(graph, f"{value.name}_fp16", fp16)
    twin.meta.update(value.meta)
    converted[value] = twin
    report.constants += 1
    return twin


def _cast(
    graph: ir.Graph,
    value: ir.Value,
    dtype: ir.DataType,
    before: ir.Node,
    cache: dict[ir.Value, ir.Value],
    report: Float16Report,
) -> ir.Value:
    """``Cast(value, dtype)`` (one per value and direction), placed after its producer."""
    if value in cache:
        return cache[value]
    suffix = "float16" if dtype == FP16 else "float32"
    cast = ir.node("Cast", [value], {"to": dtype}, name=f"{value.name}/{suffix}")
    cast.outputs[0].name = f"{value.name}_{suffix}"
    cast.outputs[0].type, cast.outputs[0].shape = ir.TensorType(dtype), value.shape
    producer = value.producer()
    if producer is not None and producer.graph is graph:
        graph.insert_after(producer, cast)
    else:
        graph.insert_before(before, cast)
    cache[value] = cast.outputs[0]
    report.casts += 1
    return cast.outputs[0]
