"""Degradation of the shared limiter store, pure: the Redis circuit breaker and the local share of a limit.

The breaker is hand-written rather than taken from a library (pybreaker and friends) because it must
be driven from two places, the request path and the store's keeper task, with time injected and no
I/O or threads of its own: closed (Redis is used) -> open after `failures` consecutive failed calls
(local limits apply; no Redis call is tried) -> after `cooldown`, exactly one probe goes to Redis
(half-open) -> closed on success, open again on failure.
"""

from __future__ import annotations

import math
from dataclasses import fields, replace
from typing import Literal

from proxy.policy.plan import Limit, LimitSpec

BreakerState = Literal["closed", "open", "half_open"]


class Breaker:
    __slots__ = ("failures", "cooldown", "state", "failed", "opened_at", "changed_at")

    def __init__(self, failures: int = 3, cooldown: float = 1.0) -> None:
        self.failures = failures
        self.cooldown = cooldown
        self.state: BreakerState = "closed"
        self.failed = 0
        """Consecutive failures while closed."""
        self.opened_at = 0.0
        self.changed_at: float | None = None
        """When the store last went degraded or came back (None: never changed)."""

    @property
    def degraded(self) -> bool:
        return self.state != "closed"

    def allow(self, now: float) -> bool:
        """May this call go to Redis? In the open state, the first caller after the cooldown is the probe."""
        if self.state == "closed":
            return True
        if self.state == "open" and now - self.opened_at >= self.cooldown:
            self.state = "half_open"
            return True
        return False

    def success(self, now: float) -> bool:
        """A call succeeded; True when this ends a degraded period."""
        self.failed = 0
        if self.state == "closed":
            return False
        self.state = "closed"
        self.changed_at = now
        return True

    def failure(self, now: float) -> bool:
        """A call failed; True when this starts a degraded period."""
        if self.state == "half_open":
            self.state, self.opened_at = "open", now  # the probe failed: wait another cooldown
            return False
        if self.state == "open":
            return False
        self.failed += 1
        if self.failed < self.failures:
            return False
        self.trip(now)
        return True

    def trip(self, now: float) -> None:
        """Open at once (Redis unreachable at start-up)."""
        self.state, self.opened_at, self.changed_at, self.failed = "open", now, now, 0

    def abandon(self) -> None:
        """The probe neither failed nor succeeded (it was cancelled): let the next caller probe."""
        if self.state == "half_open":
            self.state = "open"
            self.opened_at -= self.cooldown


def local_share(limit: Limit, replicas: int) -> Limit:
    """The limit one replica applies on its own while the shared store is down: limit ÷ replicas,
    rounded down (so the replicas together stay within it) but at least 1."""
    if replicas <= 1:
        return limit
    spec = limit.spec
    shares = {f.name: _share(getattr(spec, f.name), replicas) for f in fields(LimitSpec)}
    return replace(limit, spec=LimitSpec(**shares))


def _share(value: int | None, replicas: int) -> int | None:
    return None if value is None else max(1, math.floor(value / replicas))
