"""Multiple-choice knapsack: one option per item, total cost within a budget, least total loss.

Exact dynamic programming over the cost above every item's cheapest option, in units of `unit` bits; each option's
extra cost is rounded up to whole units, so a solution of the discretised problem always fits the real budget (and
is exact when unit == 1). Budget left over by the rounding is then spent greedily on the best loss-per-bit upgrades.
"""

from __future__ import annotations

import math

import numpy as np

from slimquant.errors import RecipeError


def choose_options(costs: list[list[int]], losses: list[list[float]], budget: int,
                   max_units: int = 20_000) -> list[int]:
    """The index of the chosen option for each item."""
    if not costs:
        return []
    cheapest = [min(range(len(c)), key=lambda j, c=c: c[j]) for c in costs]
    floor = sum(c[j] for c, j in zip(costs, cheapest, strict=True))
    if floor > budget:
        raise RecipeError(f"the budget ({budget} bits) is below the smallest possible size ({floor} bits: every "
                          "Linear at its cheapest candidate, scales included)")
    spare = budget - floor
    unit = max(1, math.ceil(spare / max_units))
    capacity = spare // unit
    best = np.zeros(capacity + 1)  # least loss of the items so far within b units
    picks = np.zeros((len(costs), capacity + 1), dtype=np.int16)
    for i, (item_costs, item_losses) in enumerate(zip(costs, losses, strict=True)):
        new = np.full(capacity + 1, np.inf)
        base = item_costs[cheapest[i]]
        for j, (cost, loss) in enumerate(zip(item_costs, item_losses, strict=True)):
            extra = math.ceil((cost - base) / unit)
            if extra > capacity:
                continue
            candidate = np.full(capacity + 1, np.inf)
            candidate[extra:] = best[:capacity + 1 - extra] + loss
            better = candidate < new
            new[better] = candidate[better]
            picks[i, better] = j
        best = new
    chosen, b = [0] * len(costs), capacity
    for i in range(len(costs) - 1, -1, -1):
        j = int(picks[i, b])
        chosen[i] = j
        b -= math.ceil((costs[i][j] - costs[i][cheapest[i]]) / unit)
    return _spend_leftover(chosen, costs, losses, budget)


def _spend_leftover(chosen: list[int], costs, losses, budget: int) -> list[int]:
    """Upgrades that lower the loss and still fit, best loss saved per extra bit first."""
    used = sum(c[j] for c, j in zip(costs, chosen, strict=True))
    while True:
        best_gain, best_move = 0.0, None
        for i, j in enumerate(chosen):
            for k in range(len(costs[i])):
                extra, saved = costs[i][k] - costs[i][j], losses[i][j] - losses[i][k]
                if saved <= 0 or used + extra > budget:
                    continue
                gain = saved / extra if extra > 0 else math.inf
                if gain > best_gain:
                    best_gain, best_move = gain, (i, k, extra)
        if best_move is None:
            return chosen
        i, k, extra = best_move
        chosen[i] = k
        used += extra
