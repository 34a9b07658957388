"""Formats under a size budget: a 0/1 integer program on measured per-unit sensitivity.

Each unit (a weight, or a group of weights that move together) has a few candidate formats, each
with a size in bits and a cost (its measured error: the Gram-weighted relative output error of the
compressed weight). `choose_formats` picks one format per unit minimising the summed cost with the
summed size within the budget, using scipy's `milp` (HiGHS); the relaxation is tight enough that
this takes milliseconds for a few hundred units.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from qcompiler.errors import OptionError


def choose_formats(
    costs: Sequence[Sequence[float]], sizes: Sequence[Sequence[float]], budget: float
) -> list[int]:
    """The index of the chosen candidate per unit (min total cost, total size <= budget).

    Raises `OptionError` when even the smallest candidates exceed the budget.
    """
    if len(costs) != len(sizes) or any(len(c) != len(s) for c, s in zip(costs, sizes, strict=True)):
        raise ValueError("costs and sizes must have the same shape")
    smallest = sum(min(s) for s in sizes)
    if smallest > budget:
        raise OptionError(
            f"size budget {budget / 8e6:.2f} MB is below the smallest assignment ({smallest / 8e6:.2f} MB)"
        )
    offsets = np.cumsum([0] + [len(c) for c in costs])
    count = int(offsets[-1])
    cost = np.concatenate([np.asarray(c, np.float64) for c in costs])
    size = np.concatenate([np.asarray(s, np.float64) for s in sizes])
    one_each = np.zeros((len(costs), count))
    for unit in range(len(costs)):
        one_each[unit, offsets[unit] : offsets[unit + 1]] = 1.0
    constraints = [
        LinearConstraint(one_each, 1.0, 1.0),
        LinearConstraint(size[None, :] / 8e6, -np.inf, budget / 8e6),  # MB: keeps HiGHS well scaled
    ]
    result = milp(cost, constraints=constraints, integrality=np.ones(count), bounds=Bounds(0, 1))
    if result.x is None:
        raise OptionError(f"no format assignment fits the size budget ({result.message})")
    chosen = np.round(result.x).astype(int)
    return [int(np.argmax(chosen[offsets[u] : offsets[u + 1]])) for u in range(len(costs))]
