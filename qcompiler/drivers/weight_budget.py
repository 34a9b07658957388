"""Weight-compression candidates for `--max-drop` and the size budget (`--effective-bits`).

`WeightCandidates.build` writes each unit's cached compressed weight at its group's rung into a
clone of the AWQ-folded float model and lowers it; `size_budget_decision` picks a group size or
INT8 per group by an integer program on measured sensitivity.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir
from tqdm.auto import tqdm

from qcompiler import io
from qcompiler.backend import Backend
from qcompiler.canonical import CompressionRecord, write_canonical
from qcompiler.drivers.accuracy import mark_decision, run_search, rung_bits, rungs_of, weight_ladder
from qcompiler.drivers.context import CompileContext
from qcompiler.formats import WeightRung
from qcompiler.options import AccuracyOptions, CompressionOptions, WeightFormat
from qcompiler.precision import as_float32
from qcompiler.reducers import Gram
from qcompiler.rewrites.compression import UnitCompressor, apply_awq, assign_mixed_precision, layer_entry
from qcompiler.rewrites.fallback import (
    Decision,
    QuantGroup,
    group_by_shared_inputs,
)
from qcompiler.rewrites.mixed_precision import choose_formats
from qcompiler.rewrites.weight_plan import WeightRole, WeightUnit, backup_block
from qcompiler.targets import Target
from qcompiler.weight_formats import CompressedWeight, stored_bits

BUDGET_GROUP_SIZES = (32, 64, 128)
SENSITIVITY_TOKENS = 128
"""Sequence positions of the calibration batch the size budget's sensitivity runs read."""
"""Group sizes a size budget may choose per group (``int4-g32`` ...), beside the INT8 rung."""


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
    backend: Backend
    accuracy_level: int
    int8_accuracy_level: int = 0
    progress: bool = False

    def __post_init__(self) -> None:
        self._cache: dict[tuple[str, str], tuple[CompressedWeight, CompressionRecord, float | None]] = {}
        self._errors: dict[tuple[str, int], float] = {}
        self._by_name = {str(unit.node.name): unit for unit in self.units}

    def unit(self, name: str) -> WeightUnit:
        """The unit of node `name`."""
        return self._by_name[name]

    def variant(self, unit: WeightUnit, rung: str) -> WeightUnit:
        """The unit in the format of `rung` (its own format at rung 0)."""
        if rung == unit.format.value:
            return unit
        if rung == "int8":
            block = backup_block(unit.rows) if unit.role is not WeightRole.MATMUL else 0
            return dataclasses.replace(unit, format=WeightFormat.INT8, symmetric=False, group_size=block)
        parsed = WeightRung.parse(rung)
        if parsed.format is not None and parsed.group_size is not None:
            return dataclasses.replace(unit, format=parsed.format, group_size=parsed.group_size)
        raise ValueError(f"no weight variant for rung {rung!r}")

    def compressed(self, name: str, rung: str) -> tuple[CompressedWeight, CompressionRecord, float | None]:
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
        return rungs_of(self.groups, decision)

    def build(self, decision: Decision) -> tuple[ir.Model, dict[str, dict[str, object]], dict[str, str]]:
        """The lowered model for `decision`, the per-layer report entries and the kernels."""
        model = io.clone(self.base)
        mark_decision(model, self.groups, decision)  # before lowering, which carries node metadata over
        nodes = {str(node.name): node for node in model.graph}
        layers: dict[str, dict[str, object]] = {}
        for name, rung in self.rung_of(decision).items():
            unit = self._by_name[name]
            if rung == "float":
                layers[name] = {"role": unit.role.value, "how": "float (fallback)"}
                continue
            compressed, record, error = self.compressed(name, rung)
            write_canonical(model.graph, nodes[name], compressed, record)
            layers[name] = layer_entry(unit, record, error)
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

    One runner of the target's backend serves every group (a model read from OpenVINO IR runs
    nowhere else): the compressed weights become graph inputs, and each run feeds the float
    weights except one group's dequantized ones.
    """
    model = io.clone(candidates.base)
    floats: dict[str, np.ndarray] = {}
    for node in model.graph:
        for unit in candidates.units:
            if str(unit.node.name) == str(node.name):
                value = node.inputs[0 if unit.role is WeightRole.EMBEDDING else 1]
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
    runner = candidates.backend.runner(model)
    del model
    # A short prefix of the batch is enough to rank groups (and 4x cheaper than 512 tokens).
    short = {name: (a[:, :SENSITIVITY_TOKENS] if a.ndim >= 2 else a) for name, a in feed.items()}
    base_feed = {**short, **floats}
    reference = _log_softmax(as_float32(runner.run([output], base_feed)[0]))
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
            role = candidates.variant(candidates.unit(name), rung).role
            perturbed[weight_of[name]] = np.ascontiguousarray(
                matrix.T if role is WeightRole.EMBEDDING else matrix
            )
        log_q = _log_softmax(as_float32(runner.run([output], perturbed)[0]))
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
            [str(WeightRung(first, size)) for size in BUDGET_GROUP_SIZES]
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
        "groups_by_rung": dict(collections.Counter(group.ladder[0] for group in groups)),
        "formats": {group.name: group.ladder[0] for group in groups},
    }
    return (0,) * len(groups), summary


def compress_with_budget(
    working: ir.Model,
    units: list[WeightUnit],
    grams: dict[str, Gram],
    compression: CompressionOptions,
    context: CompileContext,
    feed: Mapping[str, np.ndarray] | None,
) -> ir.Model:
    """Formats per group by the size budget and/or the fallback search; returns the built model.

    `feed`: one calibration batch, on which the size budget measures each group's sensitivity.
    """
    options, report, progress = context.options, context.report, context.progress
    accuracy = options.accuracy
    grams = dict(grams)  # AWQ rescales the ones it folds
    with report.timed("compress"):
        assign_mixed_precision(units, grams, compression, progress=progress)
        awq = apply_awq(working, units, grams, options.ignored, progress) if compression.awq and grams else {}
        candidates = WeightCandidates(
            working,
            units,
            weight_groups(units, context.target),
            UnitCompressor(grams, compression),
            context.backend,
            compression.kernel_accuracy_level,
            # INT8 here is an accuracy fallback: float activations unless a level was asked for
            compression.accuracy_level if compression.accuracy_level is not None else 0,
        )
        decision = (0,) * len(candidates.groups)
        if accuracy.size_budget:
            decision, report.mixed_precision = size_budget_decision(
                candidates, accuracy, feed, progress=progress
            )
    if context.evaluator is not None:
        with report.timed("fallback"):
            candidates.set_proxies(decision)
            result, report.fallback = run_search(
                candidates.groups,
                decision,
                lambda d: candidates.build(d)[0],
                context.evaluator,
                accuracy,
                progress=progress,
            )
            decision = result.decision
    with report.timed("lower"):
        model, layers, kernels = candidates.build(decision)
    report.compression = {"layers": layers, "awq": awq, "kernels": kernels}
    if accuracy.size_budget:
        bits = candidates.decision_bits(decision)
        report.mixed_precision["final_mb"] = round(bits / 8e6, 3)
        report.mixed_precision["final_effective_bits"] = round(bits / candidates.params(), 4)
    return model
