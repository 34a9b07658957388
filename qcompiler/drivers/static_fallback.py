"""W8A8 candidates for `--max-drop`: groups of a `QuantPlan` and the QDQ model of a decision.

A decision gives each group a rung of `accuracy.static_ladder`; `StaticCandidates.build` re-plans
a clone of the smoothed float model, inserts Q/DQ for the units at ``w8a8`` / ``a8``, writes the
``w8`` units as weight-only INT8 (MatMulNBits, float activations) and lowers.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from qcompiler import io
from qcompiler.backend import Backend
from qcompiler.calibration import Statistics
from qcompiler.canonical import CompressionRecord, write_canonical
from qcompiler.drivers.accuracy import mark_decision, rungs_of, static_ladder
from qcompiler.evaluation import Evaluator, stream_outputs
from qcompiler.numerics import dequantize, quantize
from qcompiler.options import CompileOptions, QuantType, WeightFormat
from qcompiler.rewrites.fallback import (
    Decision,
    QuantGroup,
    group_by_shared_inputs,
)
from qcompiler.rewrites.placement import QuantizedUnit, QuantPlan, linear_weight_rows, plan_quantizers
from qcompiler.rewrites.qdq import InsertQDQPass
from qcompiler.rewrites.weight_plan import WeightRole, WeightUnit
from qcompiler.targets import Target
from qcompiler.weight_formats import quantize as quantize_weight

# Static (W8A8) candidates --------------------------------------------------------------------


def static_groups(plan: QuantPlan, target: Target) -> list[QuantGroup]:
    """Units that share an activation quantizer form one group."""
    by_name = {str(unit.node.name): unit for unit in plan.units}
    members = group_by_shared_inputs((name, _quantized_values(unit)) for name, unit in by_name.items())
    groups = []
    for names in members:
        weighted = any(by_name[name].weight_input is not None for name in names)
        shared = _quantized_values(by_name[names[0]])
        label = str(shared[0].name) if len(names) > 1 and shared else names[0]
        size = sum(_weight_size(by_name[name]) for name in names)
        groups.append(QuantGroup(label, names, static_ladder(target, weighted), size=size))
    return groups


def _weight_size(unit: QuantizedUnit) -> int:
    weight = unit.node.inputs[unit.weight_input] if unit.weight_input is not None else None
    return int(weight.const_value.size) if weight is not None and weight.const_value is not None else 0


def _quantized_values(unit: QuantizedUnit) -> list[ir.Value]:
    values = [unit.node.inputs[index] for index in unit.activation_inputs]
    if unit.quantize_output:
        values.append(unit.node.outputs[0])
    return [value for value in values if value is not None]


@dataclasses.dataclass
class StaticCandidates:
    """Builds the W8A8 model of a decision from the float (smoothed) base."""

    base: ir.Model
    groups: list[QuantGroup]
    target: Target
    options: CompileOptions
    statistics: Statistics
    activation_type: QuantType
    backend: Backend

    def build(self, decision: Decision) -> tuple[ir.Model, InsertQDQPass]:
        """The lowered, checked model for `decision`, and the pass (its quantizers)."""
        model = io.clone(self.base)
        mark_decision(model, self.groups, decision)  # before lowering, which carries node metadata over
        plan = plan_quantizers(model, self.target, self.options)
        rung = self.rung_of(decision)
        units, weight_only = [], []
        for unit in plan.units:
            chosen = rung.get(str(unit.node.name), "float")
            if chosen in ("w8a8", "a8"):
                units.append(unit)
            elif (
                chosen == "w8" and linear_weight_rows(unit.node) is not None and unit.node.op_type == "MatMul"
            ):
                weight_only.append(WeightUnit(unit.node, WeightRole.MATMUL, WeightFormat.INT8, True, 0))
            elif chosen == "w8" and unit.weight_input is not None:
                units.append(
                    dataclasses.replace(unit, activation_inputs=(), bias_input=None, quantize_output=False)
                )
        insert = InsertQDQPass(
            QuantPlan(units, plan.skipped),
            self.statistics,
            self.options.activations,
            self.activation_type,
            self.target.weight_type_for(self.activation_type),
            unified_eltwise_scales=self.target.unified_eltwise_scales,
            unsigned_midpoint=self.target.unsigned_midpoint,
        )
        insert(model)
        self.backend.lower(model)
        # Weight-only MatMuls go through the weight-compression form: onnxruntime rewrites a plain
        # DQ(int8) -> MatMul into DynamicQuantizeMatMul, quantizing the activations after all.
        for unit in weight_only:
            weight = unit.matrix()
            compressed = quantize_weight(weight, WeightFormat.INT8, weight.shape[0], symmetric=True)
            record = CompressionRecord.of(compressed, ("rtn",), note="fallback: float activations")
            write_canonical(model.graph, unit.node, compressed, record)
        if weight_only:
            self.backend.lower_weights(model, 0, 0)
        self.backend.check(model)
        return model, insert

    def rung_of(self, decision: Decision) -> dict[str, str]:
        """Node name -> its rung in `decision`."""
        return rungs_of(self.groups, decision)

    def proxy(self, evaluator: Evaluator, batches: int) -> None:
        """Set each group's proxy from one run of the float and the fully quantized model.

        Two local measures of relative noise (noise / signal energy), per unit: the noise its
        activation quantizers add to the float tensors they read (catches per-tensor ranges
        stretched by outlier channels), and the noise its output gains over its noisiest input
        in the quantized model (catches ops that amplify small errors, like Softmax's consumers).
        A group's proxy is the larger of the two sums over its units. Both models run in the
        target's runtime (`evaluator.runners`): a model read from OpenVINO IR runs nowhere else.
        """
        full, insert = self.build((0,) * len(self.groups))
        quantizers = insert.quantizers
        plan = plan_quantizers(self.base, self.target, self.options)
        reads: dict[str, tuple[str, list[str]]] = {}
        for unit in plan.units:
            inputs = [str(unit.node.inputs[i].name) for i in unit.activation_inputs]  # type: ignore[union-attr]
            reads[str(unit.node.name)] = (str(unit.node.outputs[0].name), inputs)
        names = list(dict.fromkeys(name for out, ins in reads.values() for name in (out, *ins)))
        signal = dict.fromkeys(names, 0.0)
        noise = dict.fromkeys(names, 0.0)
        quantizer_noise = dict.fromkeys(quantizers, 0.0)
        feeds = evaluator.feeds[:batches]
        for reference, quantized in zip(
            stream_outputs(self.base, feeds, names, evaluator.runners),
            stream_outputs(full, feeds, names, evaluator.runners),
            strict=True,
        ):
            for name in names:
                x = reference[name].astype(np.float32)
                signal[name] += float(np.sum(np.square(x, dtype=np.float64)))
                noise[name] += float(np.sum(np.square(x - quantized[name], dtype=np.float64)))
                if name in quantizers:
                    params = quantizers[name]
                    codes = quantize(x, np.float32(params.scale), params.zero_point, self.activation_type)
                    error = dequantize(codes, np.float32(params.scale), params.zero_point) - x
                    quantizer_noise[name] += float(np.sum(np.square(error, dtype=np.float64)))
        relative = {name: noise[name] / max(signal[name], 1e-30) for name in names}
        for group in self.groups:
            added = quantizing = 0.0
            for member in group.members:
                output, inputs = reads[member]
                added += max(relative[output] - max((relative[i] for i in inputs), default=0.0), 0.0)
                quantizing += sum(quantizer_noise.get(i, 0.0) / max(signal[i], 1e-30) for i in inputs)
            group.proxy = max(added, quantizing)
