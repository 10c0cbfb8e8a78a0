"""Fail-open bookkeeping of the Redis limiter store: while Redis decides, every request this replica
admits is also counted in the local store against this replica's share (limit ÷ expected replicas), so
that a local decision (Redis slower than its bound, or down) admits only what is left of that share,
never a fresh share on top of the shared count. And every request admitted locally is remembered
until Redis answers again, then added to the shared counters (reconciled), so the other replicas see it.

Concurrency is shared through leases that expire by themselves and is not pushed afterwards; a request
admitted locally holds a local lease only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from proxy.admission.limits import WINDOW, Refusal
from proxy.admission.local import LocalStore
from proxy.admission.redis import codec as codec
from proxy.admission.redis.degrade import local_share
from proxy.admission.store import Reservation
from proxy.policy.plan import Limit

_CACHE = 10_000
"""Entries kept per map (shares, unshared groups); beyond it they are dropped, erring towards less."""


@dataclass(slots=True)
class Unshared:
    """Requests admitted locally for one set of limits, not yet in Redis."""

    prepared: tuple[codec.Prepared, ...]
    requests: int
    tokens: int
    since: float


class FailOpen:
    __slots__ = ("local", "replicas", "_length", "_clock", "_shares", "_unshared")

    def __init__(
        self, local: LocalStore, replicas: int, clock: Callable[[], float] = time.monotonic, window: float = WINDOW
    ) -> None:
        self.local = local
        self.replicas = replicas
        self._length = window
        self._clock = clock
        self._shares: dict[str, tuple[Limit, Limit]] = {}
        self._unshared: dict[tuple[str, ...], Unshared] = {}

    def share(self, limit: Limit) -> Limit:
        found = self._shares.get(limit.key)
        if found is None or found[0] is not limit:
            if len(self._shares) >= _CACHE:
                self._shares.clear()
            found = self._shares[limit.key] = (limit, local_share(limit, self.replicas))
        return found[1]

    async def shadow(self, limits: Sequence[Limit], tokens: int) -> tuple[Reservation, ...]:
        """Count a request Redis admitted in this replica's local shares, limit by limit (a share already
        used up stays used up). Never suspends; settle and release the result with the request."""
        counted: list[Reservation] = []
        for limit in limits:
            found = await self.local.try_acquire([self.share(limit)], tokens)
            if not isinstance(found, Refusal):
                counted.append(found)
        return tuple(counted)

    async def decide(
        self, limits: Sequence[Limit], prepared: tuple[codec.Prepared, ...], tokens: int, headroom: float = 0.0
    ) -> Reservation | Refusal:
        """The local decision: what is left of this replica's share; an admission is remembered for Redis."""
        result = await self.local.try_acquire([self.share(limit) for limit in limits], tokens, headroom=headroom)
        if isinstance(result, Refusal) or not any(p.units for p in prepared):
            return result
        key = tuple(p.window for p in prepared)
        found = self._unshared.get(key)
        if found is None:
            if len(self._unshared) >= _CACHE:
                return result
            found = self._unshared[key] = Unshared(prepared, 0, 0, self._clock())
        found.requests += 1
        found.tokens += tokens if any(u.tokens for p in prepared for u in p.units) else 0
        return result

    def drain(self) -> list[Unshared]:
        """What to add to Redis now (admissions older than a window no longer matter)."""
        now = self._clock()
        out = [u for u in self._unshared.values() if now - u.since < self._length]
        self._unshared.clear()
        return out

    def restore(self, items: Sequence[Unshared]) -> None:
        """Pushing failed: keep them for the next round."""
        for item in items:
            key = tuple(p.window for p in item.prepared)
            found = self._unshared.get(key)
            if found is None:
                self._unshared[key] = item
            else:
                found.requests += item.requests
                found.tokens += item.tokens
                found.since = min(found.since, item.since)

    def pending(self) -> bool:
        return bool(self._unshared)
