"""Insert QuantizeLinear/DequantizeLinear pairs for a `QuantPlan`: the canonical quantized form.

Cases, in the order the pass handles them:

1. An activation read by quantized units gets one QuantizeLinear (per-tensor scale and zero point
   from its calibrated range) and a *dedicated* DequantizeLinear per quantized consumer, because
   onnxruntime only fuses a node unit whose DQ feeds it alone.
2. A unit's constant weight becomes an integer initializer (symmetric, per output channel) read by
   its own DequantizeLinear with ``axis`` set; the float weight stays only if something else reads it.
3. A bias on a target that wants it becomes int32 with scale = input scale * weight scale and
   zero point 0 (what QLinearConv/QGemm consume).
4. A unit whose runtime kernel needs a quantized output (QLinearConv) gets Q/DQ on its output;
   every consumer of that output then reads through its own DQ. When a Relu / Clip alone reads
   that output, the quantizer takes the clamp's output range, and the clamp is dropped where the
   quantizer's saturation does its work (`activation_clamps`).

Node names say what each new node is, and ``metadata_props`` record the decision
(``qcompiler.quantizer``), so a Netron user sees why a layer looks the way it does.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from qcompiler import errors
from qcompiler.calibration import Statistics, StatKind, StatRequest
from qcompiler.disjoint_sets import DisjointSets
from qcompiler.errors import UnsupportedModelError
from qcompiler.irutil import add_initializer, dequantized_source, drop_if_unused, insert_dequantize
from qcompiler.numerics import (
    NUMPY_TYPES,
    activation_params,
    int32_bias,
    off_midpoint,
    quantize,
    symmetric_weight_scales,
)
from qcompiler.options import ActivationOptions, QuantType, RangeMethod
from qcompiler.precision import as_scale, as_type, float_type_of
from qcompiler.rewrites.activation_clamps import clamp_bounds, makes_redundant, remove_clamp
from qcompiler.rewrites.placement import QuantizedUnit, QuantPlan
from qcompiler.rewrites.ranges import HISTOGRAM_METHODS, candidate_ranges, choose_range, search_range

ALGORITHM_KEY = "qcompiler.quantizer"
SKIPPED_KEY = "qcompiler.skipped"
"""Node metadata: why a node the options select stays float (the report's ``nodes.skipped``)."""


@dataclasses.dataclass(frozen=True)
class ActivationQuantizer:
    """The chosen parameters of one activation quantizer (reported per tensor)."""

    scale: float
    zero_point: int
    lo: float
    hi: float
    observed_lo: float
    observed_hi: float
    method: str
    symmetric: bool = False
    folded_activation: str = ""
    """The Relu / Clip node this quantizer's saturation replaced (dropped from the graph)."""
    folded_bounds: tuple[float, float] | None = None
    """That clamp's interval: what the float model computed from the quantizer's input."""


class InsertQDQPass(ir.passes.InPlacePass):
    """Rewrite the graph into QDQ form for `plan`, using calibrated `statistics`."""

    def __init__(
        self,
        plan: QuantPlan,
        statistics: Statistics,
        activations: ActivationOptions,
        activation_type: QuantType,
        weight_type: QuantType = QuantType.INT8,
        *,
        unified_eltwise_scales: bool = False,
        unsigned_midpoint: bool = False,
    ) -> None:
        super().__init__()
        self.unified_eltwise_scales = unified_eltwise_scales
        self.unsigned_midpoint = unsigned_midpoint
        self.plan = plan
        self.statistics = statistics
        self.activations = activations
        self.activation_type = activation_type
        self.weight_type = weight_type
        self.quantizers: dict[str, ActivationQuantizer] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Apply the plan; `modified` is False only for an empty plan."""
        opset = model.opset_imports.get("", 0)
        if self.plan.units and opset < 13:
            raise UnsupportedModelError(
                f"model opset {opset} < 13: per-channel QuantizeLinear needs opset 13; re-export "
                "the model with a newer opset"
            )
        graph = model.graph
        self._choose_activation_quantizers()
        if self.unified_eltwise_scales:
            self._unify_eltwise_scales()
        self._fold_output_clamps(graph)
        self._q_outputs: dict[int, ir.Value] = {}
        self._quantized_weights: dict[
            tuple[int, int | None], tuple[ir.Value, ir.Value, ir.Value, np.ndarray]
        ] = {}
        for unit in self.plan.units:
            with errors.context(node=str(unit.node.name)):
                for index in unit.activation_inputs:
                    self._dequantize_input(graph, unit.node, index, unit.node.inputs[index])
                if unit.weight_input is not None:
                    self._quantize_weight(graph, unit)
                if unit.bias_input is not None:
                    self._quantize_bias(graph, unit)
        for unit in self.plan.units:
            if unit.quantize_output:
                self._quantize_output(graph, unit)
        for node in graph:  # why a candidate stays float, visible in Netron
            reason = self.plan.skipped.get(str(node.name))
            if reason is not None:
                node.metadata_props[SKIPPED_KEY] = reason
        return ir.passes.PassResult(model, modified=bool(self.plan.units))

    # Activations -----------------------------------------------------------------------------

    def _choose_activation_quantizers(self) -> None:
        options = self.activations
        method = options.range_method or RangeMethod.MINMAX
        wanted_symmetric = self.plan.symmetric_values()
        for value in self.plan.activation_values():
            symmetric = options.symmetric or str(value.name) in wanted_symmetric
            observed = self.statistics.minmax(value)
            histogram = self.statistics.histogram(value) if method in HISTOGRAM_METHODS else None
            mean_minmax = (
                self.statistics[StatRequest(value, StatKind.MEAN_MINMAX)]
                if method is RangeMethod.MEAN_MINMAX
                else None
            )
            chosen = method.value
            if method is RangeMethod.SEARCH:
                assert histogram is not None
                candidates = candidate_ranges(observed, histogram, self.activation_type, symmetric=symmetric)
                rows = self.statistics.get(StatRequest.row_sample(value, options.sample_rows))
                chosen, (lo, hi), _ = search_range(
                    candidates,
                    histogram,
                    rows,
                    self.plan.consumer_weights(value),  # type: ignore[arg-type]
                    self.activation_type,
                    symmetric=symmetric,
                )
            else:
                lo, hi = choose_range(
                    method,
                    observed,
                    histogram,
                    self.activation_type,
                    symmetric=symmetric,
                    percentile=options.percentile,
                    mean_minmax=mean_minmax,  # type: ignore[arg-type]
                )
            scale, zero_point = activation_params(lo, hi, self.activation_type, symmetric=symmetric)
            if self.unsigned_midpoint and not symmetric:
                scale, zero_point = off_midpoint(lo, hi, scale, zero_point, self.activation_type)
            self.quantizers[str(value.name)] = ActivationQuantizer(
                float(scale), zero_point, lo, hi, observed[0], observed[1], chosen, symmetric
            )

    def _unify_eltwise_scales(self) -> None:
        """Give the quantized inputs of each Add / Mul one range, their union (NPU's eltwise kernels).

        Tensors chained through several eltwise ops end up in one set (union-find).
        """
        tied: DisjointSets[str] = DisjointSets()
        for unit in self.plan.units:
            if unit.node.op_type not in ("Add", "Mul") or len(unit.activation_inputs) < 2:
                continue
            names = [str(unit.node.inputs[index].name) for index in unit.activation_inputs]  # type: ignore[union-attr]
            for name in names[1:]:
                tied.union(name, names[0])
        sets: dict[str, list[str]] = {}
        for name in self.quantizers:
            sets.setdefault(tied.find(name), []).append(name)
        for members in sets.values():
            if len(members) < 2:
                continue
            lo = min(self.quantizers[name].lo for name in members)
            hi = max(self.quantizers[name].hi for name in members)
            scale, zero_point = activation_params(
                lo, hi, self.activation_type, symmetric=self.activations.symmetric
            )
            if self.unsigned_midpoint and not self.activations.symmetric:
                scale, zero_point = off_midpoint(lo, hi, scale, zero_point, self.activation_type)
            for name in members:
                self.quantizers[name] = dataclasses.replace(
                    self.quantizers[name],
                    scale=float(scale),
                    zero_point=zero_point,
                    lo=lo,
                    hi=hi,
                    method="unified",
                )

    def _fold_output_clamps(self, graph: ir.Graph) -> None:
        """Give each clamped output the clamp's quantizer; drop the clamps that it makes redundant.

        Values outside a range inside the clamp's interval saturate to its ends either way, so the
        Conv output quantized with the clamp output's range, then clamped, equals the clamp output
        quantized; when the quantizer's domain lies inside the interval the clamp does nothing.
        """
        for unit in self.plan.units:
            clamp = unit.output_clamp
            if not unit.quantize_output or clamp is None:
                continue
            output, result = unit.node.outputs[0], clamp.outputs[0]
            params = self.quantizers[str(result.name)]
            bounds = clamp_bounds(clamp)
            assert bounds is not None
            stored = as_scale(params.scale, float_type_of(result))
            if makes_redundant(bounds, stored, params.zero_point, self.activation_type):
                self.quantizers[str(result.name)] = dataclasses.replace(
                    params, folded_activation=str(clamp.name), folded_bounds=bounds
                )
                remove_clamp(graph, clamp)  # the Conv output now carries the clamp's tensor name
            else:
                self.quantizers[str(output.name)] = params

    def _activation_q(
        self, graph: ir.Graph, value: ir.Value, before: ir.Node
    ) -> tuple[ir.Value, ir.Value, ir.Value]:
        """The quantized tensor of `value` (one QuantizeLinear, made on first use) and its params."""
        params = self.quantizers[str(value.name)]
        if id(value) not in self._q_outputs:
            scale = add_initializer(
                graph, f"{value.name}_scale", as_scale(params.scale, float_type_of(value))
            )
            zero = add_initializer(
                graph,
                f"{value.name}_zero_point",
                np.array(params.zero_point, dtype=NUMPY_TYPES[self.activation_type]),
            )
            node = ir.node(
                "QuantizeLinear",
                [value, scale, zero],
                name=f"{value.name}/QuantizeLinear",
                metadata_props={ALGORITHM_KEY: self._describe(params)},
            )
            node.outputs[0].name = f"{value.name}_quantized"
            producer = value.producer()
            if producer is not None and producer.graph is graph:
                graph.insert_after(producer, node)
            else:
                graph.insert_before(before, node)
            self._q_outputs[id(value)] = node.outputs[0]
        q = self._q_outputs[id(value)]
        q_node = q.producer()
        assert q_node is not None
        return q, q_node.inputs[1], q_node.inputs[2]  # type: ignore[return-value]

    def _describe(self, params: ActivationQuantizer) -> str:
        return (
            f"activation {self.activation_type.value} per-tensor "
            f"{'symmetric' if params.symmetric else 'asymmetric'} "
            f"range={params.method} [{params.lo:.6g}, {params.hi:.6g}] "
            f"observed [{params.observed_lo:.6g}, {params.observed_hi:.6g}]"
            + (f"; saturation replaces {params.folded_activation}" if params.folded_activation else "")
        )

    def _dequantize_input(self, graph: ir.Graph, node: ir.Node, index: int, value: ir.Value | None) -> None:
        assert value is not None
        q, scale, zero = self._activation_q(graph, value, node)
        insert_dequantize(
            graph,
            node,
            index,
            [q, scale, zero],
            name=f"{node.name}/input{index}/DequantizeLinear",
            like=value,
        )

    # Weights and biases ----------------------------------------------------------------------

    def _quantize_weight(self, graph: ir.Graph, unit: QuantizedUnit) -> None:
        node, index, axis = unit.node, unit.weight_input, unit.weight_axis
        assert index is not None
        weight = node.inputs[index]
        assert weight is not None and weight.const_value is not None
        key = (id(weight), axis)
        if key not in self._quantized_weights:
            array = np.asarray(weight.const_value.numpy(), np.float32)
            # Scales in the weight's type, and the codes from those rounded scales (what DQ reads).
            scales = as_scale(symmetric_weight_scales(array, axis, self.weight_type), float_type_of(weight))
            q = quantize(array, scales.astype(np.float32), 0, self.weight_type, axis)
            q_value = add_initializer(graph, f"{weight.name}_quantized", q)
            scale_value = add_initializer(graph, f"{weight.name}_scale", scales)
            zero_value = add_initializer(
                graph, f"{weight.name}_zero_point", np.zeros(scales.shape, dtype=q.dtype)
            )
            self._quantized_weights[key] = (q_value, scale_value, zero_value, scales)
        q_value, scale_value, zero_value, _ = self._quantized_weights[key]
        granularity = f"per-channel axis {axis}" if axis is not None else "per-tensor"
        insert_dequantize(
            graph,
            node,
            index,
            [q_value, scale_value, zero_value],
            name=f"{node.name}/weight/DequantizeLinear",
            like=weight,
            attributes={"axis": axis} if axis is not None else None,
            metadata={ALGORITHM_KEY: f"weight {self.weight_type.value} symmetric {granularity}"},
        )
        drop_if_unused(graph, weight)

    def _quantize_bias(self, graph: ir.Graph, unit: QuantizedUnit) -> None:
        node, index = unit.node, unit.bias_input
        assert index is not None and unit.weight_input is not None
        bias = node.inputs[index]
        assert bias is not None and bias.const_value is not None
        activation = dequantized_source(node.inputs[unit.activation_inputs[0]])
        assert activation is not None
        input_scale = self.quantizers[str(activation.name)].scale
        weight_dq = node.inputs[unit.weight_input]
        assert weight_dq is not None and weight_dq.producer() is not None
        weight_scales = np.asarray(weight_dq.producer().inputs[1].const_value.numpy(), np.float32)  # type: ignore[union-attr]
        q, scales = int32_bias(np.asarray(bias.const_value.numpy(), np.float32), input_scale, weight_scales)
        q_value = add_initializer(graph, f"{node.name}.bias_quantized", q)
        scale_value = add_initializer(graph, f"{node.name}.bias_scale", as_type(scales, float_type_of(bias)))
        insert_dequantize(
            graph,
            node,
            index,
            [q_value, scale_value],
            name=f"{node.name}/bias/DequantizeLinear",
            like=bias,
            attributes={"axis": 0},
            metadata={ALGORITHM_KEY: "bias int32, scale = input scale * weight scale"},
        )
        drop_if_unused(graph, bias)

    # Outputs ---------------------------------------------------------------------------------

    def _quantize_output(self, graph: ir.Graph, unit: QuantizedUnit) -> None:
        output = unit.node.outputs[0]
        uses = [(use.node, use.idx) for use in output.uses()]
        q, _, _ = self._activation_q(graph, output, unit.node)
        for consumer, index in uses:
            if consumer is q.producer():
                continue
            self._dequantize_input(graph, consumer, index, output)
