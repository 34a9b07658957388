"""The `--max-drop` / `--effective-bits` driver: candidates per decision, ranking, the search.

`rewrites.fallback` decides (pure); this module builds and measures. A *candidate builder*
turns a decision (a rung per group) into a lowered model from a float base that already carries
every float-equivalent rewrite (SmoothQuant, AWQ), re-using calibration statistics and cached
compressed weights, so a trial costs one graph build and one validation run.

Ranking: a cheap proxy per group first (static quantization: the output noise a group adds in the
fully quantized model, measured in one run of it and one of the float model on the validation
subset; weight compression: the Gram-weighted error of the group's compressed weights), then the
top `confirm` groups are measured on the validation subset with their step taken, and the search
starts from the measured order.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from types import ModuleType

import numpy as np
import onnx_ir as ir
from tqdm.auto import tqdm

from qcompiler.calibration import Statistics
from qcompiler.errors import QCompileError
from qcompiler.evaluation import Evaluator, stream_outputs
from qcompiler.numerics import dequantize, quantize
from qcompiler.options import AccuracyOptions, CompileOptions, QuantType, WeightFormat
from qcompiler.rewrites.compression import (
    UnitCompressor,
    WeightUnit,
    backup_block,
    layer_entry,
    write_canonical,
)
from qcompiler.rewrites.fallback import (
    Decision,
    QuantGroup,
    SearchResult,
    group_by_shared_inputs,
    rank,
    search,
)
from qcompiler.rewrites.mixed_precision import choose_formats
from qcompiler.rewrites.placement import QuantizedUnit, QuantPlan, linear_weight_rows, plan_quantizers
from qcompiler.rewrites.qdq import InsertQDQPass
from qcompiler.targets import Target
from qcompiler.weight_formats import CompressedWeight, stored_bits
from qcompiler.weight_formats import quantize as quantize_weight

FALLBACK_KEY = "qcompiler.fallback"
RUNG_BITS = {"int4": 4, "nf4": 4, "mxfp4": 4, "nvfp4": 4, "int8": 8, "fp8": 8, "fp16": 16, "float": 32}
BUDGET_GROUP_SIZES = (32, 64, 128)
SENSITIVITY_TOKENS = 128
"""Sequence positions of the calibration batch the size budget's sensitivity runs read."""
"""Group sizes a size budget may choose per group (``int4-g32`` ...), beside the INT8 rung."""


def rung_bits(rung: str) -> int:
    """Code bits of a rung (``int4-g32`` -> 4)."""
    return RUNG_BITS[rung.split("-g")[0]]


class AccuracyBudgetError(QCompileError):
    """`--max-drop` could not be met; `result` holds the best model found and its report."""

    def __init__(self, message: str, result: object) -> None:
        super().__init__(message)
        self.result = result


# Ladders ------------------------------------------------------------------------------------


def weight_ladder(fmt: WeightFormat, target: Target) -> tuple[str, ...]:
    """`fmt`, then the target's weight rungs with more bits (INT4 -> INT8 -> float on ORT CPU)."""
    return (fmt.value, *(rung for rung in target.weight_ladder if RUNG_BITS[rung] > fmt.bits))


def static_ladder(target: Target, weighted: bool) -> tuple[str, ...]:
    """Static quantization rungs: activations step to float before weights do.

    ``w8a8`` (both quantized) -> ``w8`` (weight-only INT8) -> ``float`` for a unit with a weight;
    ``a8`` -> ``float`` for one without.
    """
    low, high = target.activation_ladder[0], target.activation_ladder[-1]
    assert low == "int8", "static quantization is INT8"
    return ("w8a8", "w8", high) if weighted else ("a8", high)


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
    backend: ModuleType

    def build(self, decision: Decision) -> tuple[ir.Model, InsertQDQPass]:
        """The lowered, checked model for `decision`, and the pass (its quantizers)."""
        model = self.base.clone()
        model.meta.update(self.base.meta)
        _mark(model, self.groups, decision)  # before lowering, which carries node metadata over
        plan = plan_quantizers(model, self.target, self.options)
        rung = {
            name: group.ladder[decision[i]] for i, group in enumerate(self.groups) for name in group.members
        }
        units, weight_only = [], []
        for unit in plan.units:
            chosen = rung.get(str(unit.node.name), "float")
            if chosen in ("w8a8", "a8"):
                units.append(unit)
            elif (
                chosen == "w8" and linear_weight_rows(unit.node) is not None and unit.node.op_type == "MatMul"
            ):
                weight_only.append(WeightUnit(unit.node, "matmul", WeightFormat.INT8, True, 0))
            elif chosen == "w8" and unit.weight_input is not None:
                units.append(
                    dataclasses.replace(unit, activation_inputs=(), bias_input=None, quantize_output=False)
                )
        insert = InsertQDQPass(
            QuantPlan(units, plan.skipped),
            self.statistics,
            self.options.activations,
            self.activation_type,
            self.target.weight_type,
        )
        insert(model)
        self.backend.lower(model)
        # Weight-only MatMuls go through the weight-compression form: onnxruntime rewrites a plain
        # DQ(int8) -> MatMul into DynamicQuantizeMatMul, quantizing the activations after all.
        for unit in weight_only:
            weight = unit.matrix()
            compressed = quantize_weight(weight, WeightFormat.INT8, weight.shape[0], symmetric=True)
            write_canonical(
                model.graph, unit, compressed, "int8 sym per-channel; rtn (fallback: float activations)"
            )
        if weight_only:
            self.backend.lower_weights(model, 0, 0)
        self.backend.check(model)
        return model, insert

    def proxy(self, evaluator: Evaluator, batches: int) -> None:
        """Set each group's proxy from one run of the float and the fully quantized model.

        Two local measures of relative noise (noise / signal energy), per unit: the noise its
        activation quantizers add to the float tensors they read (catches per-tensor ranges
        stretched by outlier channels), and the noise its output gains over its noisiest input
        in the quantized model (catches ops that amplify small errors, like Softmax's consumers).
        A group's proxy is the larger of the two sums over its units.
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
            stream_outputs(self.base, feeds, names), stream_outputs(full, feeds, names), strict=True
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


def _mark(model: ir.Model, groups: Sequence[QuantGroup], decision: Decision) -> None:
    """Record each group's rung on its nodes (Netron shows node metadata)."""
    nodes = {str(node.name): node for node in model.graph}
    for group, rung in zip(groups, decision, strict=True):
        for name in group.members:
            if name in nodes:
                nodes[name].metadata_props[FALLBACK_KEY] = (
                    f"group {group.name}: {group.ladder[rung]} (ladder {' > '.join(group.ladder)})"
                )


# Weight-compression candidates ----------------------------------------------------------------


def weight_groups(units: Sequence[WeightUnit], target: Target) -> list[QuantGroup]:
    """MatMuls reading one input (Q/K/V, gate/up) form one group; each embedding is its own."""
    by_name = {str(unit.node.name): unit for unit in units}
    members = group_by_shared_inputs(
        (name, [unit.activation] if unit.activation is not None else []) for name, unit in by_name.items()
    )
    groups = []
    for names in members:
        first = by_name[names[0]]
        label = str(first.activation.name) if len(names) > 1 and first.activation is not None else names[0]
        size = sum(by_name[name].size for name in names)
        groups.append(QuantGroup(label, names, weight_ladder(first.format, target), size=size))
    return groups


@dataclasses.dataclass
class WeightCandidates:
    """Builds the compressed model of a decision from the float (AWQ-folded) base.

    Each unit is compressed at most once per rung (cached), so a trial only writes the canonical
    form and lowers it.
    """

    base: ir.Model
    units: list[WeightUnit]
    groups: list[QuantGroup]
    compressor: UnitCompressor
    backend: ModuleType
    accuracy_level: int
    int8_accuracy_level: int = 0
    progress: bool = False

    def __post_init__(self) -> None:
        self._cache: dict[tuple[str, str], tuple[CompressedWeight, str, float | None]] = {}
        self._errors: dict[tuple[str, int], float] = {}
        self._by_name = {str(unit.node.name): unit for unit in self.units}

    def variant(self, unit: WeightUnit, rung: str) -> WeightUnit:
        """The unit in the format of `rung` (its own format at rung 0)."""
        if rung == unit.format.value:
            return unit
        if rung == "int8":
            block = backup_block(unit.rows) if unit.role != "matmul" else 0
            return dataclasses.replace(unit, format=WeightFormat.INT8, symmetric=False, group_size=block)
        fmt, _, group = rung.partition("-g")
        if group:
            return dataclasses.replace(unit, format=WeightFormat(fmt), group_size=int(group))
        raise ValueError(f"no weight variant for rung {rung!r}")

    def compressed(self, name: str, rung: str) -> tuple[CompressedWeight, str, float | None]:
        """The unit compressed at `rung` (cached).

        The INT8 fallback rung uses RTN (near-lossless already); group-size variants run the
        requested algorithms.
        """
        key = (name, rung)
        if key not in self._cache:
            unit = self._by_name[name]
            variant = self.variant(unit, rung)
            options = None
            if rung == "int8" and unit.format is not WeightFormat.INT8:  # a fallback rung
                options = dataclasses.replace(self.compressor.options, scale_estimation=False, gptq=False)
            self._cache[key] = self.compressor(variant, options)
        return self._cache[key]

    def rung_of(self, decision: Decision) -> dict[str, str]:
        """Unit name -> its rung in `decision`."""
        return {
            name: group.ladder[decision[i]] for i, group in enumerate(self.groups) for name in group.members
        }

    def build(self, decision: Decision) -> tuple[ir.Model, dict[str, dict[str, object]], dict[str, str]]:
        """The lowered model for `decision`, the per-layer report entries and the kernels."""
        model = self.base.clone()
        model.meta.update(self.base.meta)
        _mark(model, self.groups, decision)  # before lowering, which carries node metadata over
        nodes = {str(node.name): node for node in model.graph}
        layers: dict[str, dict[str, object]] = {}
        for name, rung in self.rung_of(decision).items():
            unit = self._by_name[name]
            if rung == "float":
                layers[name] = {"role": unit.role, "how": "float (fallback)"}
                continue
            compressed, how, error = self.compressed(name, rung)
            clone_unit = dataclasses.replace(self.variant(unit, rung), node=nodes[name])
            write_canonical(model.graph, clone_unit, compressed, how)
            layers[name] = layer_entry(unit, how, error)
        kernels = self.backend.lower_weights(model, self.accuracy_level, self.int8_accuracy_level)
        self.backend.check(model)
        return model, layers, kernels

    def cost_and_size(self, group: QuantGroup, rung: str) -> tuple[float, int]:
        """A group's summed output error energy per token, and its stored bits.

        Error energy: tr(ΔWᵀ H ΔW) with H = XᵀX / rows, the noise the weight adds to its output
        per token (an embedding: the mean over table rows, tokens taken as uniform). Absolute,
        not relative: noise lands in the residual stream or the logits at the scale of the
        layer's output, so an LM head's error weighs more than an inner projection's.
        """
        cost, bits = 0.0, 0
        for name in group.members:
            compressed, _, _ = self.compressed(name, rung)
            cost += self._output_error(name, compressed)
            bits += stored_bits(compressed)
        return cost, bits

    def _output_error(self, name: str, compressed: CompressedWeight) -> float:
        key = (name, id(compressed))
        if key not in self._errors:
            unit = self._by_name[name]
            error = compressed.dequantize() - unit.matrix()
            gram = (
                self.compressor.grams.get(str(unit.activation.name)) if unit.activation is not None else None
            )
            if gram is not None:
                self._errors[key] = float(gram.weighted_error(error))
            else:  # [H, V] table: row r of the table is column r here
                self._errors[key] = float(np.sum(error * error) / error.shape[1])
        return self._errors[key]

    def set_proxies(self, decision: Decision) -> None:
        """Each group's proxy: its summed error at its rung in `decision`."""
        for group, rung in zip(self.groups, decision, strict=True):
            group.proxy = (
                self.cost_and_size(group, group.ladder[rung])[0] if group.ladder[rung] != "float" else 0.0
            )

    def decision_bits(self, decision: Decision) -> int:
        """Stored bits of every compressed weight in `decision` (float weights at 32 bits)."""
        bits = 0
        for group, rung in zip(self.groups, decision, strict=True):
            if group.ladder[rung] == "float":
                bits += 32 * sum(self._by_name[name].size for name in group.members)
            else:
                bits += self.cost_and_size(group, group.ladder[rung])[1]
        return bits

    def params(self) -> int:
        """Weights counted by the size budget."""
        return sum(unit.size for unit in self.units)


def measure_sensitivity(
    candidates: WeightCandidates, feed: Mapping[str, np.ndarray], rungs: Sequence[str], *, progress: bool
) -> list[float]:
    """Per group: the mean KL divergence (float || perturbed) of the output distribution.

    Perturbed: only that group's weights take their `rungs` value; on one calibration batch.

    One onnxruntime session serves every group: the compressed weights become graph inputs, and
    each run feeds the float weights except one group's dequantized ones.
    """
    from qcompiler.backends.onnxruntime import create_session, session_options

    model = candidates.base.clone()
    floats: dict[str, np.ndarray] = {}
    for node in model.graph:
        for unit in candidates.units:
            if str(unit.node.name) == str(node.name):
                value = node.inputs[0 if unit.role == "embedding" else 1]
                assert value is not None and value.const_value is not None
                floats[str(value.name)] = value.const_value.numpy()
                model.graph.initializers.pop(str(value.name))
                value.const_value = None
                model.graph.inputs.append(value)
    output = (
        "logits"
        if "logits" in {str(v.name) for v in model.graph.outputs}
        else str(model.graph.outputs[0].name)
    )
    session = create_session(model, session_options())
    del model
    # A short prefix of the batch is enough to rank groups (and 4x cheaper than 512 tokens).
    short = {name: (a[:, :SENSITIVITY_TOKENS] if a.ndim >= 2 else a) for name, a in feed.items()}
    base_feed = {**short, **floats}
    reference = _log_softmax(session.run([output], base_feed)[0])
    weight_of = {str(unit.node.name): str(unit.weight.name) for unit in candidates.units}
    scores = []
    for group, rung in tqdm(
        list(zip(candidates.groups, rungs, strict=True)),
        desc="size budget: sensitivity",
        disable=not progress,
    ):
        perturbed = dict(base_feed)
        for name in group.members:
            compressed, _, _ = candidates.compressed(name, rung)
            matrix = compressed.dequantize()
            role = candidates.variant(candidates._by_name[name], rung).role
            perturbed[weight_of[name]] = np.ascontiguousarray(matrix.T if role == "embedding" else matrix)
        log_q = _log_softmax(session.run([output], perturbed)[0])
        scores.append(float(np.mean(np.sum(np.exp(reference) * (reference - log_q), axis=-1))))
    return scores


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def size_budget_decision(
    candidates: WeightCandidates,
    accuracy: AccuracyOptions,
    feed: Mapping[str, np.ndarray] | None = None,
    *,
    progress: bool,
) -> tuple[Decision, dict[str, object]]:
    """Formats per group under `--effective-bits` / `--max-size`, by `choose_formats` (scipy milp).

    Each group chooses among its format at group sizes 32 / 64 / 128 (formats with a block of
    their own: that block) and the ladder's other non-float rungs (INT8). Cost: each variant's
    output error energy (`cost_and_size`), scaled per group so that its coarsest variant costs the
    KL divergence measured with it on `feed` (`measure_sensitivity`; without a feed, the error
    energy alone). The chosen variant becomes the group's rung 0, so the
    fallback search can start from it. Returns the all-zero decision and the report section.
    """
    groups = candidates.groups
    params = candidates.params()
    budget_bits = (
        accuracy.effective_bits * params
        if accuracy.effective_bits is not None
        else accuracy.max_size_mb * 8e6  # type: ignore[operator]
    )
    options, errors, sizes = [], [], []
    for group in tqdm(groups, desc="size budget: compressing candidates", disable=not progress):
        first = group.ladder[0]
        sized = (
            [f"{first}-g{size}" for size in BUDGET_GROUP_SIZES]
            if WeightFormat(first).fixed_block is None
            else [first]
        )
        variants = [*sized, *(rung for rung in group.ladder[1:] if rung != "float")]
        measured = [candidates.cost_and_size(group, rung) for rung in variants]
        options.append(variants)
        errors.append([c for c, _ in measured])
        sizes.append([s for _, s in measured])
    # Loss per unit of output error differs by layer (an LM head's noise lands in the logits):
    # scale each group's errors by its measured KL at its coarsest variant.
    coarsest = [int(np.argmax(e)) for e in errors]
    costs = errors
    if feed is not None:
        kl = measure_sensitivity(
            candidates, feed, [v[i] for v, i in zip(options, coarsest, strict=True)], progress=progress
        )
        costs = [
            [k * e / max(err[i], 1e-30) for e in err] for k, err, i in zip(kl, errors, coarsest, strict=True)
        ]
    chosen = choose_formats(costs, sizes, budget_bits)
    bits = sum(sizes[g][c] for g, c in enumerate(chosen))
    for group, variants, index in zip(groups, options, chosen, strict=True):
        pick = variants[index]
        group.ladder = (pick, *(rung for rung in group.ladder if rung_bits(rung) > rung_bits(pick)))
    summary = {
        "requested_effective_bits": accuracy.effective_bits,
        "requested_mb": round(budget_bits / 8e6, 3),
        "achieved_mb": round(bits / 8e6, 3),
        "achieved_effective_bits": round(bits / params, 4),
        "size_ratio": round(bits / budget_bits, 4),
        "cost": round(sum(costs[g][c] for g, c in enumerate(chosen)), 6),
        "groups_by_rung": _count([group.ladder[0] for group in groups]),
        "formats": {group.name: group.ladder[0] for group in groups},
    }
    return (0,) * len(groups), summary


def _count(items: Sequence[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return counts


# The search ---------------------------------------------------------------------------------


def confirm_ranking(
    groups: Sequence[QuantGroup],
    start: Decision,
    build: Callable[[Decision], ir.Model],
    evaluator: Evaluator,
    accuracy: AccuracyOptions,
    *,
    progress: bool,
) -> dict[int, float]:
    """Measure the top proxy-ranked groups' next step on the validation subset: index -> gain."""
    batches = accuracy.subset_batches
    base_float = evaluator.subset_float_score(batches)
    start_drop = evaluator.drop(evaluator.score(build(start), batches), base_float)
    movable = [i for i in rank(groups) if start[i] + 1 < len(groups[i].ladder)][: accuracy.confirm]
    gains: dict[int, float] = {}
    for index in tqdm(movable, desc="confirming ranking on the validation subset", disable=not progress):
        step = start[:index] + (start[index] + 1,) + start[index + 1 :]
        gains[index] = start_drop - evaluator.drop(evaluator.score(build(step), batches), base_float)
    return gains


def run_search(
    groups: list[QuantGroup],
    start: Decision,
    build: Callable[[Decision], ir.Model],
    evaluator: Evaluator,
    accuracy: AccuracyOptions,
    *,
    progress: bool,
) -> tuple[SearchResult, dict[str, object]]:
    """Rank, confirm, search; returns the result and the report section."""
    began = time.perf_counter()
    assert accuracy.max_drop is not None
    gains = confirm_ranking(groups, start, build, evaluator, accuracy, progress=progress)
    ranked = rank(groups, gains)
    bar = tqdm(total=accuracy.max_trials, desc="fallback trials", disable=not progress)
    result = search(
        groups,
        ranked,
        lambda decision: evaluator.score(build(decision)),
        evaluator.drop,
        accuracy.max_drop,
        max_trials=accuracy.max_trials,
        time_budget=accuracy.time_budget,
        start=start,
        on_trial=lambda trial: bar.update(1),
    )
    bar.close()
    section: dict[str, object] = {
        "metric": evaluator.metric.name,
        "output": evaluator.output,
        "drop_type": evaluator.drop_type.value,
        "max_drop": accuracy.max_drop,
        "float_score": evaluator.float_score,
        "score": result.score,
        "drop": result.drop,
        "met": result.met,
        "stopped_by": result.stopped_by,
        "validation_batches": len(evaluator.feeds),
        "ranking_measured": {groups[i].name: round(gain, 6) for i, gain in gains.items()},
        "trials": [dataclasses.asdict(trial) for trial in result.trials],
        "evaluations": result.evaluations + len(gains) + 1,
        "seconds": round(time.perf_counter() - began, 2),
        "groups": {
            group.name: {
                "members": group.members,
                "format": group.ladder[rung],
                "ladder": list(group.ladder),
                "proxy": group.proxy,
                "drop_contribution": result.contributions.get(group.name, 0.0),
            }
            for group, rung in zip(groups, result.decision, strict=True)
        },
    }
    return result, section


def budget_message(section: dict[str, object]) -> str:
    """The unreachable-budget error's text."""
    return (
        f"--max-drop {section['max_drop']}: reached a {section['drop_type']} {section['metric']} drop of "
        f"{float(section['drop']):.4g} ({section['stopped_by']}, {len(section['trials'])} trials)"  # type: ignore[arg-type]
    )
