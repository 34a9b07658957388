"""Accuracy-aware fallback: quantizer groups step down a precision ladder until the drop fits.

Groups are the quantizers that must change together: units that read one activation tensor share
its quantizer (Q, K and V of a block; the consumers of one SmoothQuant or AWQ scale), so they move
as one. Each group has a ladder of rungs from the most compressed to float, taken from the target
(`Target.weight_ladder` / `activation_ladder`); a decision is a rung per group.

`search` is pure: it takes the groups in ranked order (most harmful first) and a function that
scores a decision. It steps the top of the ranking down one rung (the shortest prefix that meets
the budget, found by bisection), then steps each moved group back up where the budget allows, so
the fewest groups leave their most compressed rung. It stops when done, after `max_trials`
evaluations, or at the time budget. Scores are cached by decision.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Sequence

import onnx_ir as ir

from qcompiler.disjoint_sets import DisjointSets

Decision = tuple[int, ...]
"""One rung index per group (0 = the most compressed rung)."""


@dataclasses.dataclass
class QuantGroup:
    """Quantized nodes that change format together.

    Attributes:
        name: the shared input's name (or the node's, for a lone unit).
        members: node names.
        ladder: rung names, most compressed first, e.g. ``("int4", "int8", "float")``.
        proxy: estimated harm of the group at rung 0 (larger = more harmful); ranks the search.
        size: weights it holds (parameters); the give-back phase tries the largest first, since
            each success there recovers the most bytes.
    """

    name: str
    members: list[str]
    ladder: tuple[str, ...]
    proxy: float = 0.0
    size: int = 0


def group_by_shared_inputs(units: Iterable[tuple[str, Sequence[ir.Value]]]) -> list[list[str]]:
    """Node names grouped so that nodes reading a common quantized input share a group.

    `units`: (node name, the inputs whose quantizer it uses). Union-find over shared inputs; the
    groups come out in first-member order, members in input order.
    """
    sets: DisjointSets[str] = DisjointSets()
    owner: dict[int, str] = {}
    for name, inputs in units:
        sets.add(name)
        for value in inputs:
            if id(value) in owner:
                sets.union(name, owner[id(value)])
            else:
                owner[id(value)] = name
    return sets.groups()


@dataclasses.dataclass(frozen=True)
class Trial:
    """One evaluated candidate decision."""

    number: int
    action: str
    groups: list[str]
    score: float
    drop: float
    kept: bool
    seconds: float


@dataclasses.dataclass
class SearchResult:
    """The decision reached and how."""

    decision: Decision
    score: float
    drop: float
    met: bool
    trials: list[Trial]
    evaluations: int
    stopped_by: str
    contributions: dict[str, float | None]
    """Per moved group: the drop it removes (measured by stepping it back up; None if the
    trial budget ran out first). Groups left at rung 0 are absent."""


class _Budget(Exception):
    """The trial or time budget is spent."""


def search(
    groups: Sequence[QuantGroup],
    ranked: Sequence[int],
    evaluate: Callable[[Decision], float],
    drop_of: Callable[[float], float],
    max_drop: float,
    *,
    max_trials: int = 50,
    time_budget: float | None = None,
    start: Decision | None = None,
    on_trial: Callable[[Trial], None] | None = None,
) -> SearchResult:
    """Step groups down their ladders, most harmful first, until ``drop_of(score) <= max_drop``.

    Descent: if stepping every movable group down one rung still misses the budget, that whole
    rung is taken (when it helps) and the next rung is tried; otherwise the shortest prefix of the
    ranking whose step meets the budget is found by bisection (log2(groups) trials, assuming
    stepping more groups never hurts). Give-back: each moved group, largest then least harmful
    first, is
    stepped back up and kept there if the budget still holds; a step back that breaks the budget
    is undone, and the drop it caused is the group's measured contribution.

    Args:
        groups: the groups.
        ranked: their indices, most harmful first.
        evaluate: the metric of a decision (called once per distinct decision; cached).
        drop_of: score -> drop (positive = worse than float).
        max_drop: the budget.
        max_trials: most evaluations after the starting one.
        time_budget: seconds after which no new trial starts.
        start: the initial decision (default: every group at rung 0).
        on_trial: called after each trial (progress bars).
    """
    began = time.perf_counter()
    cache: dict[Decision, float] = {}
    trials: list[Trial] = []

    def trial(
        action: str, members: Sequence[int], candidate: Decision, keep: Callable[[float], bool]
    ) -> bool:
        if len(trials) >= max_trials:
            raise _Budget(f"max trials ({max_trials})")
        if time_budget is not None and time.perf_counter() - began > time_budget:
            raise _Budget(f"time budget ({time_budget:g} s)")
        started = time.perf_counter()
        if candidate not in cache:
            cache[candidate] = evaluate(candidate)
        score = cache[candidate]
        kept = keep(drop_of(score))
        record = Trial(
            len(trials) + 1,
            action,
            [groups[i].name for i in members],
            score,
            drop_of(score),
            kept,
            round(time.perf_counter() - started, 3),
        )
        trials.append(record)
        if on_trial is not None:
            on_trial(record)
        return kept

    def stepped(decision: Decision, members: Sequence[int], delta: int) -> Decision:
        chosen = set(members)
        return tuple(rung + delta if i in chosen else rung for i, rung in enumerate(decision))

    decision = tuple(start) if start is not None else (0,) * len(groups)
    cache[decision] = evaluate(decision)
    initial = decision
    stopped_by = "budget met"
    contributions: dict[str, float | None] = {}
    try:
        while drop_of(cache[decision]) > max_drop:
            movable = [i for i in ranked if decision[i] + 1 < len(groups[i].ladder)]
            if not movable:
                stopped_by = "every group is at its last rung"
                break
            current = drop_of(cache[decision])
            everything = stepped(decision, movable, +1)
            if not trial(
                f"step all {len(movable)} movable groups down", movable, everything, lambda d: d <= max_drop
            ):
                if drop_of(cache[everything]) >= current:
                    stopped_by = "stepping every group down no longer helps"
                    break
                decision = everything
                continue
            low, high = 0, len(movable)  # prefix lengths: `low` misses the budget, `high` meets it
            while high - low > 1:
                middle = (low + high) // 2
                if trial(
                    f"step the top {middle} groups down",
                    movable[:middle],
                    stepped(decision, movable[:middle], +1),
                    lambda d: d <= max_drop,
                ):
                    high = middle
                else:
                    low = middle
            decision = stepped(decision, movable[:high], +1)
        if drop_of(cache[decision]) <= max_drop:
            moved = [i for i in ranked if decision[i] > initial[i]]
            # Largest first, then least harmful first.
            order = sorted(reversed(moved), key=lambda i: -groups[i].size)
            for index in order:
                while decision[index] > initial[index]:
                    back = stepped(decision, [index], -1)
                    if trial(f"step {groups[index].name} back up", [index], back, lambda d: d <= max_drop):
                        decision = back
                        continue
                    contributions[groups[index].name] = drop_of(cache[back]) - drop_of(cache[decision])
                    break
    except _Budget as exc:
        stopped_by = (
            str(exc) if drop_of(cache[decision]) > max_drop else f"budget met; give-back stopped by {exc}"
        )
    for index, rung in enumerate(decision):
        if rung > initial[index]:
            contributions.setdefault(groups[index].name, None)
    score = cache[decision]
    return SearchResult(
        decision,
        score,
        drop_of(score),
        drop_of(score) <= max_drop,
        trials,
        len(cache),
        stopped_by,
        contributions,
    )


def rank(groups: Sequence[QuantGroup], confirmed: dict[int, float] | None = None) -> list[int]:
    """Group indices, most harmful first: measured gains (`confirmed`) first, then by proxy.

    Ties keep graph order, so the same inputs always give the same order.
    """
    confirmed = confirmed or {}
    measured = sorted(confirmed, key=lambda index: (-confirmed[index], index))
    rest = sorted(
        (index for index in range(len(groups)) if index not in confirmed),
        key=lambda index: (-groups[index].proxy, index),
    )
    return measured + rest
