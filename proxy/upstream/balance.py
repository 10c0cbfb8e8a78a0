"""Choosing a deployment from a route's pool (pure; the random number is passed in).

`weighted`: random in proportion to the weights. `least_outstanding`: fewest requests in flight per
unit of weight, ties broken at random (so equal deployments share the load instead of the first one
taking every tie).
"""

from __future__ import annotations

from collections.abc import Sequence


def weighted(weights: Sequence[float], candidates: Sequence[int], rand: float) -> int:
    """One of `candidates` (indices into weights), with probability proportional to its weight."""
    total = 0.0
    for i in candidates:
        total += weights[i]
    point = rand * total
    for i in candidates:
        point -= weights[i]
        if point < 0:
            return i
    return candidates[-1]


def least_outstanding(
    weights: Sequence[float], outstanding: Sequence[int], candidates: Sequence[int], rand: float
) -> int:
    best: list[int] = []
    best_load = float("inf")
    for i in candidates:
        load = outstanding[i] / weights[i]
        if load < best_load:
            best, best_load = [i], load
        elif load == best_load:
            best.append(i)
    return best[min(int(rand * len(best)), len(best) - 1)]


def pick(
    strategy: str,
    weights: Sequence[float],
    outstanding: Sequence[int],
    candidates: Sequence[int],
    rand: float,
) -> int:
    if len(candidates) == 1:
        return candidates[0]
    if strategy == "least_outstanding":
        return least_outstanding(weights, outstanding, candidates, rand)
    return weighted(weights, candidates, rand)
