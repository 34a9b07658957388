"""Where quantizers go: which nodes become quantized units and which of their inputs are quantized.

Placement reads the graph, the target's capabilities and the options, and returns a `QuantPlan`
without touching the graph. The plan says, per quantized node, which inputs are activations
(per-tensor quantizers from calibration), which input is a constant weight (per-channel symmetric
along the output-channel axis), whether the bias becomes int32, and whether the output needs its
own quantizer for the runtime to fuse (measured after a Relu / Clip that alone reads the output:
`activation_clamps`). Nodes left in float are listed with the reason.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from qcompiler.calibration import StatKind, StatRequest
from qcompiler.errors import OptionError
from qcompiler.options import CompileOptions, Preset, RangeMethod
from qcompiler.precision import FLOAT_TYPES
from qcompiler.rewrites.activation_clamps import output_clamp
from qcompiler.rewrites.ranges import HISTOGRAM_METHODS
from qcompiler.targets import Target


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """How one op type is quantized.

    Attributes:
        inputs: indices of the inputs that carry data (activation or weight).
        weight_input: index of the input quantized per channel when it is a constant.
        bias_input: index of the bias, quantized to int32 on targets that want it.
        weight_axis: output-channel axis of the weight, given the node and the weight's rank.
        constants_float: constant data inputs stay float (an Add's bias) instead of refusing the
            node; the other inputs are still quantized.
    """

    inputs: tuple[int, ...]
    weight_input: int | None
    bias_input: int | None
    weight_axis: Callable[[ir.Node, int], int]
    constants_float: bool = False


def _gemm_weight_axis(node: ir.Node, rank: int) -> int:
    trans_b = node.attributes.get_int("transB", 0)
    return 0 if trans_b else 1


OP_SPECS: dict[str, OpSpec] = {
    # B is [..., K, N]: output channels are the last axis.
    "MatMul": OpSpec(inputs=(0, 1), weight_input=1, bias_input=None, weight_axis=lambda n, r: r - 1),
    # B is [K, N], or [N, K] with transB=1.
    "Gemm": OpSpec(inputs=(0, 1), weight_input=1, bias_input=2, weight_axis=_gemm_weight_axis),
    # W is [M, C/group, kH, kW]: output channels first.
    "Conv": OpSpec(inputs=(0, 1), weight_input=1, bias_input=2, weight_axis=lambda n, r: 0),
    # Elementwise and Softmax: only with --op-types (QLinearAdd/Mul/Softmax need a quantized output
    # too; without one these run as Q/DQ emulation, which is what a fallback search measures).
    "Add": OpSpec(
        inputs=(0, 1), weight_input=None, bias_input=None, weight_axis=lambda n, r: 0, constants_float=True
    ),
    "Mul": OpSpec(
        inputs=(0, 1), weight_input=None, bias_input=None, weight_axis=lambda n, r: 0, constants_float=True
    ),
    "Softmax": OpSpec(inputs=(0,), weight_input=None, bias_input=None, weight_axis=lambda n, r: 0),
}

PRESET_NEEDS_WEIGHT: dict[Preset, bool] = {Preset.DEFAULT: False, Preset.TRANSFORMER: True}
"""Presets that quantize only ops with a constant weight (attention score MatMuls stay float)."""


@dataclasses.dataclass
class QuantizedUnit:
    """One node to run as a quantized kernel, and how each of its inputs is quantized."""

    node: ir.Node
    activation_inputs: tuple[int, ...]
    weight_input: int | None
    weight_axis: int | None
    bias_input: int | None
    quantize_output: bool
    symmetric: bool = False
    """Its activation quantizers are symmetric whatever the options say (attention scores)."""
    output_clamp: ir.Node | None = None
    """The Relu / Clip that alone reads the output: the output quantizer takes the clamp's range."""

    def output_value(self) -> ir.Value:
        """The tensor whose range the output quantizer takes: after the clamp, when there is one."""
        return (self.output_clamp or self.node).outputs[0]


@dataclasses.dataclass
class QuantPlan:
    """Every quantized unit, plus the nodes of quantizable types left in float and why."""

    units: list[QuantizedUnit]
    skipped: dict[str, str]

    def activation_values(self) -> list[ir.Value]:
        """The distinct tensors that get an activation quantizer, in graph order."""
        seen: dict[int, ir.Value] = {}
        for unit in self.units:
            for index in unit.activation_inputs:
                value = unit.node.inputs[index]
                assert value is not None
                seen.setdefault(id(value), value)
            if unit.quantize_output:
                seen.setdefault(id(unit.output_value()), unit.output_value())
        return list(seen.values())

    def symmetric_values(self) -> set[str]:
        """Names of the tensors whose quantizer a unit wants symmetric."""
        return {
            str(unit.node.inputs[index].name)  # type: ignore[union-attr]
            for unit in self.units
            if unit.symmetric
            for index in unit.activation_inputs
        }

    def stat_requests(self, method: RangeMethod, sample_rows: int = 512) -> list[StatRequest]:
        """What calibration must measure for this plan's activation quantizers."""
        requests = []
        for value in self.activation_values():
            requests.append(StatRequest(value, StatKind.MINMAX))
            if method is RangeMethod.MEAN_MINMAX:
                requests.append(StatRequest(value, StatKind.MEAN_MINMAX))
            if method in HISTOGRAM_METHODS:
                requests.append(StatRequest(value, StatKind.HISTOGRAM))
            if method is RangeMethod.SEARCH:
                requests.append(StatRequest.row_sample(value, sample_rows))
        return requests

    def consumer_weights(self, value: ir.Value) -> list[np.ndarray]:
        """Weights [C, N] of the weighted MatMul/Gemm units that read `value` as their data input."""
        weights = []
        for unit in self.units:
            if unit.weight_input is not None and unit.node.inputs[0] is value:
                rows = linear_weight_rows(unit.node)
                if rows is not None:
                    weights.append(rows)
        return weights


def linear_weight_rows(node: ir.Node) -> np.ndarray | None:
    """A MatMul/Gemm's constant 2-D weight as [input channels, output channels], else None.

    None also when the node does not read its data from input 0 (Gemm with transA).
    """
    if node.op_type not in ("MatMul", "Gemm") or (
        node.op_type == "Gemm" and node.attributes.get_int("transA", 0) != 0
    ):
        return None
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    if weight is None or weight.const_value is None or len(weight.const_value.shape) != 2:
        return None
    array = weight.const_value.numpy()
    return array.T if node.op_type == "Gemm" and node.attributes.get_int("transB", 0) != 0 else array


def _is_float(value: ir.Value | None) -> bool:
    return value is not None and value.dtype in FLOAT_TYPES


def _try_plan_node(
    node: ir.Node, target: Target, options: CompileOptions, op_types: frozenset[str]
) -> QuantizedUnit | str:
    """A unit for `node`, or the reason it stays float."""
    spec = OP_SPECS[node.op_type]
    if options.ignored.matches(node):
        return "in the ignored scope"
    data_inputs = [node.inputs[i] if i < len(node.inputs) else None for i in spec.inputs]
    if not all(_is_float(value) for value in data_inputs):
        return "an input is not float (float32 / float16 / bfloat16)"
    weight_index = None
    weight = node.inputs[spec.weight_input] if spec.weight_input is not None else None
    if weight is not None and weight.const_value is not None:
        weight_index = spec.weight_input
    elif PRESET_NEEDS_WEIGHT[options.preset]:
        return f"no constant weight ({options.preset.value} preset quantizes only weighted ops)"
    small = _small_gemm(node, target.min_gemm_dim) if weight_index is not None else None
    if small:
        return small
    activations = tuple(i for i in spec.inputs if i != weight_index)
    if spec.constants_float:
        activations = tuple(i for i in activations if node.inputs[i].const_value is None)  # type: ignore[union-attr]
        if not activations:
            return "every input is a constant"
    for index in activations:
        value = node.inputs[index]
        assert value is not None
        if value.const_value is not None:
            return f"input {index} is a constant but not the weight input"
    axis = None
    if weight_index is not None:
        assert weight is not None and weight.shape is not None
        axis = spec.weight_axis(node, len(weight.shape)) if options.weights.per_channel else None
    bias_index = None
    if (
        spec.bias_input is not None
        and node.op_type in target.int32_bias_ops
        and weight_index is not None
        and len(node.inputs) > spec.bias_input
        and node.inputs[spec.bias_input] is not None
        and node.inputs[spec.bias_input].const_value is not None  # type: ignore[union-attr]
        # int32 bias scales (input x weight scale, ~1e-7) underflow in FP16 / BF16: such a bias stays float
        and node.inputs[spec.bias_input].dtype == ir.DataType.FLOAT  # type: ignore[union-attr]
    ):
        bias_index = spec.bias_input
    output = node.outputs[0]
    quantize_output = node.op_type in target.output_quantized_ops and not output.is_graph_output()
    clamp = output_clamp(node) if quantize_output else None
    return QuantizedUnit(
        node, activations, weight_index, axis, bias_index, quantize_output, output_clamp=clamp
    )


def _small_gemm(node: ir.Node, minimum: int) -> str | None:
    """Why a weighted MatMul / Gemm is too small for the target's GEMM kernels (None: it is not)."""
    rows = linear_weight_rows(node) if minimum else None
    if rows is None:
        return None
    k, n = rows.shape
    if k < minimum or n < minimum:
        return f"GEMM too small for the target's kernels (K = {k}, N = {n}; both must be >= {minimum})"
    shape = node.inputs[0].shape if node.inputs[0] is not None else None
    if shape is not None and len(shape) >= 2 and shape[-2] == 1:
        return "GEMV (M = 1): the target runs it faster unquantized"
    return None


def plan_quantizers(model: ir.Model, target: Target, options: CompileOptions) -> QuantPlan:
    """Decide which nodes are quantized and how (the graph is not modified)."""
    if options.op_types:
        unknown = sorted(set(options.op_types) - (frozenset(OP_SPECS) & target.quantizable_ops))
        if unknown:
            known = ", ".join(sorted(frozenset(OP_SPECS) & target.quantizable_ops))
            raise OptionError(
                f"--op-types: {', '.join(unknown)} cannot be quantized for {target.name} (known: {known})"
            )
    op_types = frozenset(options.op_types) if options.op_types else target.default_ops
    op_types &= frozenset(OP_SPECS) & target.quantizable_ops
    units: list[QuantizedUnit] = []
    skipped: dict[str, str] = {}
    for node in model.graph:
        if node.domain not in ("", "ai.onnx") or node.op_type not in op_types:
            continue
        outcome = _try_plan_node(node, target, options, op_types)
        if isinstance(outcome, str):
            skipped[str(node.name)] = outcome
        else:
            units.append(outcome)
    if target.int8_attention_scores and options.preset is Preset.TRANSFORMER and "MatMul" in op_types:
        for node in model.graph:
            # an ONNX Q Kᵀ MatMul the preset skipped; from OpenVINO IR, a MatMul left in its own
            # spelling (transpose_b of an activation) or the fused ScaledDotProductAttention
            foreign = node.domain not in ("", "ai.onnx")
            scores = node.op_type == "MatMul" and (str(node.name) in skipped or foreign)
            if not (scores or node.op_type == "ScaledDotProductAttention") or options.ignored.matches(node):
                continue
            found = _attention_score_units(node)
            if isinstance(found, str):
                skipped[str(node.name)] = found
            else:
                units.extend(found)
                skipped.pop(str(node.name), None)
    if target.quantize_residual_adds:
        units.extend(_residual_add_units(model, units, options))
    return QuantPlan(units, skipped)


def _residual_add_units(
    model: ir.Model, units: list[QuantizedUnit], options: CompileOptions
) -> list[QuantizedUnit]:
    """A quantizer on the residual input of each Add that a quantized Conv's output alone feeds.

    TensorRT fuses Conv + elementwise Add, and "the precision of the first input of the
    element-wise addition layer determines the precision of the fused output": a float residual
    keeps the Add out of the Conv's INT8 / FP8 kernel. The Conv side stays unquantized (it is the
    fused kernel's own output), as in ModelOpt's ``build_non_residual_input_map``.
    """
    convs = {id(unit.node) for unit in units if unit.node.op_type == "Conv"}
    found = []
    for node in model.graph:
        if node.op_type != "Add" or node.domain not in ("", "ai.onnx") or options.ignored.matches(node):
            continue
        inputs = [value for value in node.inputs if value is not None]
        if len(inputs) != 2 or not all(_is_float(value) and value.const_value is None for value in inputs):
            continue
        fused = [
            index
            for index, value in enumerate(inputs)
            if value.producer() is not None and id(value.producer()) in convs and len(value.uses()) == 1  # type: ignore[union-attr]
        ]
        if fused:
            residual = 1 - fused[0]  # with two fusible Convs, the second input is the residual
            found.append(QuantizedUnit(node, (residual,), None, None, None, False, symmetric=True))
    return found


SHAPE_OPS = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze"})
"""Ops that only move values: a quantizer before them is one after them."""


def _attention_score_units(matmul: ir.Node) -> list[QuantizedUnit] | str:
    """Symmetric quantizers for Q and K of a Q Kᵀ MatMul or of an OpenVINO ScaledDotProductAttention.

    Each is placed before the Reshape / Transpose chain that feeds the input (inputs 0 and 1; an
    SDPA's V stays float). A reason comes back instead if the node stays float: probabilities x V
    (an input coming from Softmax) does, as in NNCF's artifacts.
    """
    units = []
    for index in (0, 1):
        reader, position = matmul, index
        value = matmul.inputs[index]
        while (
            value is not None
            and value.producer() is not None
            and value.producer().op_type in SHAPE_OPS  # type: ignore[union-attr]
            and len(value.uses()) == 1
        ):
            reader, position = value.producer(), 0  # type: ignore[assignment]
            value = reader.inputs[0]
        if value is None or not _is_float(value) or value.const_value is not None:
            return "no constant weight and an input that is not a float activation"
        producer = value.producer()
        if producer is not None and producer.op_type == "Softmax":
            return "attention probabilities x V stay float (OpenVINO runs Q Kᵀ in int8)"
        units.append(QuantizedUnit(reader, (position,), None, None, None, False, symmetric=True))
    return units
