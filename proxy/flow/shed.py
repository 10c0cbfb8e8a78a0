"""Class-aware shedding and reserved headroom, pure: decisions over a queue's spec and its numbers.

Shedding: once a queue holds `shed.waiting` requests, or a new arrival's estimated wait passes
`shed.wait`, the lowest class waiting is refused first (its newest waiter is pushed out with a 429 and
a `retry-after` from the estimate); a class is refused on arrival only when no lower class waits.

Headroom: with `reserve`, a class may take from a shared budget only while what is left stays above the
shares reserved for the classes above it (the top class has none to leave).
"""

from __future__ import annotations

import math

from proxy.errors import QueueShed
from proxy.policy.plan import QueueSpec


def over(spec: QueueSpec, waiting: int, eta: float | None) -> bool:
    """Is the queue past a shedding threshold for an arrival whose estimated wait is `eta`?"""
    if spec.shed_waiting is not None and waiting >= spec.shed_waiting:
        return True
    return spec.shed_wait is not None and eta is not None and eta > spec.shed_wait


def refusal(spec: QueueSpec, waiting: int, eta: float | None) -> QueueShed:
    """The 429 a shed request gets: retrying after the estimate may well succeed (x-should-retry: true)."""
    retry = eta if eta is not None and math.isfinite(eta) else spec.max_wait
    return QueueShed(
        f"queue '{spec.name}' is shedding load ({waiting} requests waiting, estimated wait "
        f"{retry:.0f}s) and lower priority classes go first; retry after the estimate",
        retry_after=retry,
        should_retry=True,
    )


def headroom(spec: QueueSpec, cls: int) -> float:
    """The share of each shared budget class `cls` must leave free (0 for the top class)."""
    shares = spec.headroom
    return shares[cls] if cls < len(shares) else 0.0
