"""The `--max-drop` driver: ladders, ranking, the search and its report.

`rewrites.fallback` decides (pure); this module measures. The candidate builders live in
`static_fallback` (W8A8) and `weight_budget` (weight compression, size budgets): a builder
turns a decision (a rung per group) into a lowered model from a float base that already carries
every float-equivalent rewrite (SmoothQuant, AWQ), re-using calibration statistics and cached
compressed weights, so a trial costs one graph build and one validation run.

Ranking: a cheap proxy per group first (static quantization: the noise a group's quantizers add,
from one run of the float and one of the fully quantized model on the validation subset; weight
compression: the output error energy of the group's compressed weights), then the
top `confirm` groups are measured on the validation subset with their step taken, and the search
starts from the measured order.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import onnx_ir as ir
from tqdm.auto import tqdm

from qcompiler.evaluation import Evaluator
from qcompiler.formats import WeightRung
from qcompiler.options import AccuracyOptions, WeightFormat
from qcompiler.rewrites.fallback import (
    Decision,
    QuantGroup,
    SearchResult,
    rank,
    search,
)
from qcompiler.targets import Target

FALLBACK_KEY = "qcompiler.fallback"


def rung_bits(rung: str) -> int:
    """Code bits of a weight rung (``int4-g32`` -> 4)."""
    return WeightRung.parse(rung).bits


# Ladders ------------------------------------------------------------------------------------


def weight_ladder(fmt: WeightFormat, target: Target) -> tuple[str, ...]:
    """`fmt`, then the target's weight rungs with more bits (INT4 -> INT8 -> float on ORT CPU)."""
    return (fmt.value, *(rung for rung in target.weight_ladder if rung_bits(rung) > fmt.bits))


def static_ladder(target: Target, weighted: bool) -> tuple[str, ...]:
    """Static quantization rungs: activations step to float before weights do.

    ``w8a8`` (both quantized) -> ``w8`` (weight-only INT8) -> ``float`` for a unit with a weight;
    ``a8`` -> ``float`` for one without.
    """
    low, high = target.activation_ladder[0], target.activation_ladder[-1]
    assert low == "int8", "static quantization is INT8"
    return ("w8a8", "w8", high) if weighted else ("a8", high)


def rungs_of(groups: Sequence[QuantGroup], decision: Decision) -> dict[str, str]:
    """Member node name -> the rung `decision` gives its group."""
    return {
        name: group.ladder[rung]
        for group, rung in zip(groups, decision, strict=True)
        for name in group.members
    }


def mark_decision(model: ir.Model, groups: Sequence[QuantGroup], decision: Decision) -> None:
    """Record each group's rung on its nodes (Netron shows node metadata)."""
    nodes = {str(node.name): node for node in model.graph}
    for group, rung in zip(groups, decision, strict=True):
        for name in group.members:
            if name in nodes:
                nodes[name].metadata_props[FALLBACK_KEY] = (
                    f"group {group.name}: {group.ladder[rung]} (ladder {' > '.join(group.ladder)})"
                )


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
        accuracy.max_drop - accuracy.drop_margin,
        max_trials=accuracy.max_trials,
        time_budget=accuracy.time_budget,
        start=start,
        on_trial=lambda trial: bar.update(1),
    )
    bar.close()
    measured = evaluator.uncertainty(build(result.decision))  # the chosen model, once more, per batch
    section: dict[str, object] = {
        "metric": evaluator.metric.name,
        "output": evaluator.output,
        "drop_type": evaluator.drop_type.value,
        "max_drop": accuracy.max_drop,
        "drop_margin": accuracy.drop_margin,
        "float_score": evaluator.float_score,
        "score": result.score,
        "drop": result.drop,
        "met": result.met,
        "stopped_by": result.stopped_by,
        "validation_batches": len(evaluator.feeds),
        "validation": evaluator.describe(),
        "drop_interval": measured["interval"],
        "interval_confidence": measured["confidence"],
        "met_within_noise": bool(result.met and measured["interval"][1] > accuracy.max_drop),  # type: ignore[index]
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
