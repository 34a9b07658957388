"""Applying SmoothQuant scales to the graph: find the groups, scale weights, fold 1/s upstream.

A *group* is one activation tensor X and the linear layers that read it as their data input
(MatMul input 0 or Gemm input A, with a constant 2-D weight). Every consumer of one X shares one
scale vector s (Q, K and V after one norm; gate and up projections). `ApplySmoothingPass`:

1. multiplies row c of each consumer's weight by s_c (a weight shared with nodes outside the
   group is copied first, so they keep the original);
2. divides X by s by folding 1/s into X's producer, when X feeds nothing but the group:
   - LayerNormalization over the last axis: scale / s and bias / s;
   - Mul by a constant broadcast along the channels (the tail of an RMSNorm decomposition):
     the constant / s; Mul of two same-shaped tensors (SwiGLU): into an operand's producer;
   - MatMul with a constant weight [K, C] (optionally followed by Add of a constant bias):
     weight columns / s (and bias / s); Gemm likewise, honouring transB;
3. otherwise inserts ``Mul(X, 1/s)`` in front of the group's consumers only, and records why the
   producer could not absorb it (e.g. "X also feeds Add 'residual' unscaled").

All of these are exact in float (tests assert < 1e-5 relative change).

`scale_channels` is the step SmoothQuant (`apply_smoothquant`, here) and AWQ
(`rewrites/compression.apply_awq`) share: search a scale vector per group, then apply them all.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import cast

import numpy as np
import onnx_ir as ir
from tqdm.auto import tqdm

from qcompiler.calibration import Statistics, StatKey, StatKind, StatRequest
from qcompiler.irutil import add_initializer, release_mapped
from qcompiler.options import IgnoredScope, QuantType, SmoothQuantOptions
from qcompiler.precision import FLOAT_TYPES, as_type, float_type_of
from qcompiler.rewrites.placement import linear_weight_rows
from qcompiler.rewrites.smoothquant import choose_alpha

SMOOTHQUANT_KEY = "qcompiler.smoothquant"


@dataclasses.dataclass
class SmoothGroup:
    """One activation and its linear consumers (node, weight input index)."""

    activation: ir.Value
    consumers: list[ir.Node]

    def weight_rows(self) -> list[np.ndarray]:
        """Each consumer's weight as [C, N] (input channels first), for the alpha search."""
        rows = [linear_weight_rows(node) for node in self.consumers]
        return [r for r in rows if r is not None]


def _linear_weight(node: ir.Node) -> ir.Value | None:
    """The constant 2-D weight of a MatMul/Gemm reading its data from input 0, else None."""
    return node.inputs[1] if linear_weight_rows(node) is not None else None


def find_groups(model: ir.Model, ignored: IgnoredScope | None = None) -> list[SmoothGroup]:
    """Every float activation read as data input by at least one weighted MatMul/Gemm."""
    ignored = ignored or IgnoredScope()
    groups: dict[int, SmoothGroup] = {}
    for node in model.graph:
        if node.op_type not in ("MatMul", "Gemm") or ignored.matches(node) or _linear_weight(node) is None:
            continue
        activation = node.inputs[0]
        if activation is None or activation.const_value is not None or activation.dtype not in FLOAT_TYPES:
            continue
        groups.setdefault(id(activation), SmoothGroup(activation, [])).consumers.append(node)
    return list(groups.values())


class ApplySmoothingPass(ir.passes.InPlacePass):
    """Apply per-group scales: weights x s, activation / s (folded upstream, or a Mul)."""

    def __init__(
        self, decisions: list[tuple[SmoothGroup, np.ndarray, str]], *, insert_mul: bool = True
    ) -> None:
        """`decisions`: (group, scales, label recorded in metadata, e.g. "alpha=0.5").

        `insert_mul` False leaves a group alone when its producer cannot absorb 1/s (AWQ: a
        runtime Mul would cost more than the scaling gains).
        """
        super().__init__()
        self.decisions = decisions
        self.insert_mul = insert_mul
        self.outcomes: dict[str, str] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Apply every decision; `outcomes` maps activation name -> how 1/s was applied."""
        modified = False
        for group, scales, label in self.decisions:
            name = str(group.activation.name)
            refusal = _try_fold_into_producer(model.graph, group, scales)
            if refusal is not None and not self.insert_mul:
                self.outcomes[name] = f"not applied ({refusal})"
                continue
            for consumer in group.consumers:
                _scale_weight_rows(model.graph, consumer, scales)
            if refusal is None:
                producer = group.activation.producer()
                how = f"folded into {producer.op_type} '{producer.name}'"  # type: ignore[union-attr]
            else:
                _insert_mul(model.graph, group, scales)
                how = f"Mul inserted ({refusal})"
            self.outcomes[name] = how
            modified = True
            for consumer in group.consumers:
                consumer.metadata_props[SMOOTHQUANT_KEY] = f"{label}; 1/s {how}"
        return ir.passes.PassResult(model, modified=modified)


def _own_constant(graph: ir.Graph, value: ir.Value, reader: ir.Node, array: np.ndarray) -> None:
    """Give `reader` the constant `array` in place of `value` (copying if others read `value`)."""
    dtype = value.const_value.numpy().dtype  # type: ignore[union-attr]
    _own_tensor(graph, value, reader, ir.tensor(array.astype(dtype)))


def _own_scaled_weight(
    graph: ir.Graph, value: ir.Value, reader: ir.Node, factor: np.ndarray, *, divide: bool = False
) -> None:
    """Give `reader` its weight times `factor` (or divided by it; broadcast), computed when read.

    The product is an `ir.LazyTensor`: an LLM's AWQ-scaled weights are then made one at a time
    as compression reads them, never all at once (SmolLM2: 450 MB).
    """
    source = value.const_value
    assert source is not None

    def scaled() -> ir.TensorProtocol:
        array = source.numpy()
        # In FP32, rounded once to the weight's type (an FP16 weight is never scaled in FP16).
        wide = np.asarray(array, np.float32)
        result = (wide / factor if divide else wide * factor).astype(array.dtype)
        del array, wide  # both may view the mapped file
        release_mapped(source)
        return ir.tensor(result)

    _own_tensor(
        graph, value, reader, ir.LazyTensor(scaled, dtype=source.dtype, shape=ir.Shape(source.shape.numpy()))
    )


def _own_tensor(graph: ir.Graph, value: ir.Value, reader: ir.Node, tensor: ir.TensorProtocol) -> None:
    """Make `tensor` what `reader` reads in place of `value` (a new initializer if others read `value`)."""
    if all(use.node is reader for use in value.uses()) and value.is_initializer():
        old = value.const_value
        tensor.name = value.name
        value.const_value = tensor
        release_mapped(old)
        return
    name = f"{value.name}_smoothed"
    suffix = 1
    while name in graph.initializers:
        name = f"{value.name}_smoothed_{suffix}"
        suffix += 1
    tensor.name = name
    copy = ir.Value(name=name, const_value=tensor, type=value.type, shape=value.shape)
    graph.register_initializer(copy)
    for use in list(value.uses()):
        if use.node is reader:
            reader.replace_input_with(use.idx, copy)


def _scale_weight_rows(graph: ir.Graph, node: ir.Node, scales: np.ndarray) -> None:
    weight = _linear_weight(node)
    assert weight is not None and weight.const_value is not None
    if node.op_type == "Gemm" and node.attributes.get_int("transB", 0) != 0:
        _own_scaled_weight(graph, weight, node, scales[None, :])
    else:
        _own_scaled_weight(graph, weight, node, scales[:, None])


def _channel_vector(value: ir.Value, channels: int) -> np.ndarray | None:
    """A constant broadcast only along the last (channel) axis, as a [C] vector; else None."""
    if value.const_value is None:
        return None
    array = value.const_value.numpy()
    if array.size == 1:
        return np.full(channels, array.reshape(()), dtype=array.dtype)
    if array.shape[-1] == channels and array.size == channels:
        return array.reshape(channels)
    return None


FOLDING_OPS = frozenset({"LayerNormalization", "Mul", "Add", "MatMul", "Gemm"})


def fold_precheck(group: SmoothGroup) -> str | None:
    """Why 1/s certainly cannot be folded into the group's producer, or None if it may be.

    Structural checks only, nothing changes: lets a search skip groups whose scales would be
    thrown away (AWQ does not insert a Mul).
    """
    activation = group.activation
    producer = activation.producer()
    if producer is None:
        return "the activation is a graph input"
    if activation.is_graph_output():
        return "the activation is also a graph output"
    members = {id(node) for node in group.consumers}
    others = [use.node for use in activation.uses() if id(use.node) not in members]
    if others:
        return f"it also feeds {others[0].op_type} '{others[0].name}' unscaled"
    if producer.op_type not in FOLDING_OPS:
        return f"{producer.op_type} cannot absorb a per-channel scale"
    return None


def _try_fold_into_producer(graph: ir.Graph, group: SmoothGroup, scales: np.ndarray) -> str | None:
    """Fold 1/s into the activation's producer; None on success, else the reason it cannot."""
    refusal = fold_precheck(group)
    return refusal if refusal is not None else _try_fold_into(graph, group.activation, scales)


def _try_fold_into(graph: ir.Graph, value: ir.Value, scales: np.ndarray) -> str | None:
    """Make `value`'s producer emit value / s; None on success (nothing changes on a refusal)."""
    producer = value.producer()
    if producer is None:
        return "the activation is a graph input"
    if producer.op_type == "LayerNormalization":
        return _try_fold_layer_norm(graph, producer, scales)
    if producer.op_type == "Mul":
        return _try_fold_mul(graph, producer, scales)
    if producer.op_type == "Add":
        return _try_fold_biased_linear(graph, producer, scales)
    if producer.op_type in ("MatMul", "Gemm"):
        return _try_fold_linear_columns(graph, producer, scales)
    return f"{producer.op_type} cannot absorb a per-channel scale"


def _try_fold_mul(graph: ir.Graph, mul: ir.Node, scales: np.ndarray) -> str | None:
    """Fold 1/s into a Mul.

    Mul by a constant channel vector: scale the constant. Mul of two tensors (SwiGLU's
    silu(gate) * up): (a / s) * b = (a * b) / s, so fold into an operand that only this Mul reads
    and whose own producer can absorb it (up_proj's weight columns).
    """
    channels = len(scales)
    for index in (0, 1):
        constant = mul.inputs[index]
        if constant is not None and constant.const_value is not None and constant.const_value.size == 1:
            # A scalar factor is part of a pattern runtimes fuse (GELU's x * 0.5): made a vector, the
            # fusion fails (OpenVINO, MiniLM: 6 GELUs left decomposed, 8x128 latency +15 %).
            return "the Mul's constant is a scalar (folding would break the GELU fusion)"
        vector = _channel_vector(constant, channels) if constant is not None else None
        if vector is not None:
            assert constant is not None and constant.const_value is not None
            shape = (
                constant.const_value.numpy().shape
                if constant.const_value.numpy().size == channels
                else (channels,)
            )
            _own_constant(graph, constant, mul, (vector / scales).reshape(shape))
            return None
    for operand in mul.inputs:
        if operand is None or operand.const_value is not None or operand.is_graph_output():
            continue
        if len(operand.uses()) != 1 or operand.shape is None or operand.shape != mul.outputs[0].shape:
            continue
        if _try_fold_into(graph, operand, scales) is None:
            return None
    return "Mul has no constant channel operand nor an operand whose producer absorbs the scale"


def _try_fold_layer_norm(graph: ir.Graph, node: ir.Node, scales: np.ndarray) -> str | None:
    rank = len(node.inputs[0].shape) if node.inputs[0] is not None and node.inputs[0].shape else None  # type: ignore[union-attr]
    axis = node.attributes.get_int("axis", -1)
    if axis != -1 and (rank is None or axis != rank - 1):
        return "LayerNormalization does not normalise over the last axis"
    for index in (1, 2):
        if index < len(node.inputs) and node.inputs[index] is not None:
            vector = _channel_vector(node.inputs[index], len(scales))  # type: ignore[arg-type]
            if vector is None:
                return "LayerNormalization scale/bias is not a constant channel vector"
            _own_constant(graph, node.inputs[index], node, vector / scales)  # type: ignore[arg-type]
    return None


def _try_fold_linear_columns(graph: ir.Graph, node: ir.Node, scales: np.ndarray) -> str | None:
    weight = _linear_weight(node)
    if weight is None:
        return f"{node.op_type} '{node.name}' has no constant 2-D weight"
    trans_b = node.op_type == "Gemm" and node.attributes.get_int("transB", 0) != 0
    if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
        bias = _channel_vector(node.inputs[2], len(scales))
        if bias is None:
            return "Gemm bias is not a constant channel vector"
        _own_constant(graph, node.inputs[2], node, bias / scales)
    _own_scaled_weight(graph, weight, node, scales[:, None] if trans_b else scales[None, :], divide=True)
    return None


def _try_fold_biased_linear(graph: ir.Graph, add: ir.Node, scales: np.ndarray) -> str | None:
    """Fold 1/s into ``y + b`` with a constant channel vector b: (y + b) / s = y / s + b / s.

    y's producer must absorb it: a weighted MatMul (a linear layer's bias) or a Mul by a channel
    vector (a LayerNorm decomposed as MVN -> Mul gamma -> Add beta, as OpenVINO IR spells it).
    """
    for index in (0, 1):
        bias, other = add.inputs[index], add.inputs[1 - index]
        if bias is None or other is None:
            continue
        vector = _channel_vector(bias, len(scales))
        producer = other.producer()
        if (
            vector is None
            or producer is None
            or producer.op_type not in ("MatMul", "Mul")
            or len(other.uses()) != 1
            or other.is_graph_output()
        ):
            continue
        refusal = _try_fold_into(graph, other, scales)
        if refusal is None:
            _own_constant(graph, bias, add, vector / scales)
        return refusal
    return "Add is not a constant bias after a weighted MatMul or a channel-vector Mul"


def _insert_mul(graph: ir.Graph, group: SmoothGroup, scales: np.ndarray) -> None:
    inverse = add_initializer(
        graph,
        f"{group.activation.name}_smoothquant_inverse_scale",
        as_type(1.0 / scales, float_type_of(group.activation)),
    )
    mul = ir.node("Mul", [group.activation, inverse], name=f"{group.activation.name}/SmoothQuant/Mul")
    mul.outputs[0].name = f"{group.activation.name}_smoothed"
    mul.outputs[0].type = group.activation.type
    mul.outputs[0].shape = group.activation.shape
    graph.insert_before(group.consumers[0], mul)
    for consumer in group.consumers:
        consumer.replace_input_with(0, mul.outputs[0])


ScaleSearch = Callable[["SmoothGroup"], tuple[float | None, np.ndarray | None]]
"""A group -> (alpha, scales); scales None leaves the group alone."""


def scale_channels(
    model: ir.Model,
    groups: list[SmoothGroup],
    search: ScaleSearch,
    *,
    label: str,
    insert_mul: bool,
    progress: bool,
    description: str,
) -> tuple[dict[str, str], list[tuple[SmoothGroup, np.ndarray]]]:
    """Search a scale vector per group, then apply them all (`ApplySmoothingPass`).

    Returns activation name -> how its 1/s was applied (groups left alone are absent), and the
    (group, scales) applied or refused.
    """
    decisions = []
    for group in tqdm(groups, desc=description, disable=not progress):
        alpha, scales = search(group)
        if alpha is not None and scales is not None:
            decisions.append((group, scales, f"{label}alpha={alpha:g}"))
    applied = ApplySmoothingPass(decisions, insert_mul=insert_mul)
    applied(model)
    return applied.outcomes, [(group, scales) for group, scales, _ in decisions]


def smoothquant_requests(groups: list[SmoothGroup], settings: SmoothQuantOptions) -> list[StatRequest]:
    """What SmoothQuant's search reads per group: per-channel extremes and a sample of rows."""
    requests = []
    for group in groups:
        requests.append(StatRequest.channel_minmax(group.activation))
        requests.append(StatRequest.row_sample(group.activation, settings.sample_rows))
    return requests


def apply_smoothquant(
    model: ir.Model,
    groups: list[SmoothGroup],
    statistics: Statistics,
    settings: SmoothQuantOptions,
    activation_type: QuantType,
    *,
    symmetric: bool,
    progress: bool,
) -> tuple[dict[str, dict[str, object]], dict[StatKey, object]]:
    """Search alpha per group on its statistics (`smoothquant_requests`) and apply the scales.

    Returns the per-group report, and the per-tensor (min, max) of every tensor the group's
    consumers now read (X / s, exact from the per-channel extremes since s > 0), so the quantizer
    step needs no second run over the data for those tensors.
    """
    summary: dict[str, dict[str, object]] = {}
    ranges: dict[int, tuple[float, float]] = {}

    def search(group: SmoothGroup) -> tuple[float | None, np.ndarray | None]:
        lo, hi = cast(tuple[np.ndarray, np.ndarray], statistics[StatRequest.channel_minmax(group.activation)])
        rows = cast(np.ndarray, statistics[StatRequest.row_sample(group.activation, settings.sample_rows)])
        choice = choose_alpha(
            rows, lo, hi, group.weight_rows(), settings.grid(), activation_type, symmetric=symmetric
        )
        summary[str(group.activation.name)] = {
            "consumers": [str(node.name) for node in group.consumers],
            "alpha": choice.alpha,
            "errors": {key: round(value, 6) for key, value in choice.errors.items()},
        }
        scales = choice.scales if choice.scales is not None else 1.0
        ranges[id(group)] = (float(np.min(lo / scales)), float(np.max(hi / scales)))
        return choice.alpha, choice.scales

    outcomes, _ = scale_channels(
        model,
        groups,
        search,
        label="",
        insert_mul=True,
        progress=progress,
        description="SmoothQuant alpha search",
    )
    for name, how in outcomes.items():
        summary[name]["applied"] = how
    derived: dict[StatKey, object] = {}
    for group in groups:
        read = group.consumers[0].inputs[0]  # X itself, or the inserted Mul's output
        assert read is not None
        derived[StatRequest(read, StatKind.MINMAX).key] = ranges[id(group)]
    return summary, derived
