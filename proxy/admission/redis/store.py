"""The Redis limiter store: limits shared by every replica that points at the same Redis.

One admission decision is one round trip: an EVALSHA of the acquire script (`scripts.py`), which
checks every window of every limit of the request (with the class's headroom) and counts it in all or
none, on Redis's clock. Settle and release are one more round trip each, only when the request holds
tokens or a lease. One keeper task per store renews this replica's leases (one call per round, not a
timer per request); a dead replica's leases are reclaimed by the next acquire after they expire.

Redis trouble never fails a request: every call is bounded (`health.py`: a slow answer is not an
outage) and goes through the store's own circuit breaker (`degrade.py`). A failed call, or any call
while the breaker is open, is decided locally on what is left of this replica's share, limit ÷ expected
replicas, counting what Redis admitted here too (`failopen.py`); the keeper probes Redis after each
cooldown, adds the local admissions to the shared counts, and shared limiting resumes by itself. An
acquire that answers after its bound is reconciled: an admission nobody used is rolled back. Each
change of state is logged once, shown by the `signalbox_limiter_degraded` gauge and in `/readyz`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from redis.exceptions import NoScriptError

from proxy.admission.limits import WINDOW, Refusal, Usage, longer
from proxy.admission.local import LocalStore
from proxy.admission.redis import codec as codec
from proxy.admission.redis.client import connect
from proxy.admission.redis.failopen import FailOpen
from proxy.admission.redis.health import FAILURES, Health, Skipped, Unavailable
from proxy.admission.redis.keeper import Keeper
from proxy.admission.redis.scripts import ACQUIRE, ADJUST, LEASES, SCRIPTS, SNAPSHOT, Script
from proxy.admission.store import Reservation
from proxy.policy.plan import Limit, StateRule
from proxy.tasks import TaskSet
from proxy.telemetry.metrics import Metrics

log = logging.getLogger("signalbox.limits")
_ORPHANS = 4096
"""Leases to remove later (their release failed or was cancelled); beyond this they just expire."""
_CACHE = 10_000


@dataclass(slots=True)
class SharedReservation(Reservation):
    """Counted in Redis: settle and release go back there (a local one goes to the local store)."""

    prepared: tuple[codec.Prepared, ...] = ()
    stamps: tuple[tuple[int, int], ...] = ()
    """Per limit (a Cluster's nodes differ), the Redis (sec, usec) it was counted at: refunds go there."""
    lease: str = ""
    shadow: tuple[Reservation, ...] = ()
    """The same request in this replica's local shares (failopen.py), settled and released with it."""


class RedisStore:
    """A `LimiterStore` in Redis, degrading to a `LocalStore` of local shares."""

    def __init__(
        self,
        client: Any,
        rule: StateRule,
        *,
        cluster: bool = False,
        where: str = "redis",
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        window: float = WINDOW,
    ) -> None:
        self.client = client
        self.rule = rule
        self.cluster = cluster
        """Each limit in its own slot: one call per limit, run together (see `_acquire_cluster`)."""
        self.where = where
        self.metrics = metrics
        self.local = LocalStore(window=window)
        self.failopen = FailOpen(self.local, rule.expected_replicas, clock, window)
        self.health = Health(rule, where, metrics, clock)
        self._clock = clock
        self._length = window
        self._timeout = rule.timeout
        self._ttl_ms = max(1, round(rule.lease_ttl * 1000))
        self._prepared: dict[str, codec.Prepared] = {}
        self._known: dict[str, Limit] = {}
        self._current: Mapping[str, Limit] | None = None
        self._held: dict[str, dict[str, None]] = {}
        """Lease set key -> ids of the leases this replica holds there (renewed by the keeper)."""
        self._orphans: deque[tuple[tuple[str, ...], str]] = deque(maxlen=_ORPHANS)
        self._late: deque[SharedReservation] = deque(maxlen=_ORPHANS)
        """Admissions Redis made after their request was decided locally: to roll back."""
        self._instance = secrets.token_hex(6)
        self._ids = itertools.count(1)
        self._tasks = TaskSet()

    @classmethod
    def open(cls, rule: StateRule, metrics: Metrics | None = None) -> RedisStore:
        client, target = connect(rule)
        return cls(client, rule, cluster=target.kind == "cluster", where=target.where, metrics=metrics)

    # --- life cycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the scripts and start the keeper. Never fails: without Redis it starts degraded."""
        try:
            async with asyncio.timeout(max(self._timeout, 0.25)):
                for script in SCRIPTS:
                    await self.client.script_load(script.text)
        except FAILURES as exc:
            self.health.trip(exc)
        else:
            prefix = self.rule.key_prefix
            log.info("limiter store: limits shared in Redis at %s (prefix %s)", self.where, prefix)
        self._tasks.spawn(Keeper(self).run(), name="limiter-store-keeper")

    async def close(self, *, release: bool = True) -> None:
        """Stop the keeper and close the pool; `release` gives back the leases still held first
        (`release=False` leaves them to expire, as a replica that died would)."""
        await self._tasks.close()
        self.health.cancel_late()
        if release and self._held:
            held = {key: list(ids) for key, ids in self._held.items()}
            try:
                async with self.health.call("leases"):
                    await self._leases("forget", held)
            except Unavailable:
                pass
        self._held.clear()
        await self.client.aclose()

    def describe(self) -> dict[str, Any]:
        return self.health.describe()

    async def reconfigure(self, limits: Mapping[str, Limit]) -> None:
        """After a reload: the plan's limits by key. The numbers go to Redis with every call anyway;
        this makes requests still holding the older plan count under the new numbers, and hands the
        new local shares to the fallback store."""
        self._current = dict(limits)
        self._known = dict(limits)
        await self.local.reconfigure({key: self.failopen.share(limit) for key, limit in limits.items()})

    # --- the LimiterStore interface -----------------------------------------------------------------

    async def try_acquire(self, limits: Sequence[Limit], tokens: int, *, headroom: float = 0) -> Reservation | Refusal:
        current = self._current
        if current is not None:
            limits = [current.get(limit.key, limit) for limit in limits]
        prepared = tuple(self._prepare(limit) for limit in limits)
        lease = f"{self._instance}:{next(self._ids)}" if any(p.concurrent for p in prepared) else ""

        def send() -> Coroutine[Any, Any, SharedReservation | Refusal]:
            if self.cluster and len(prepared) > 1:
                return self._acquire_cluster(prepared, tokens, lease, headroom)
            return self._acquire(prepared, tokens, lease, headroom)

        try:
            result = await self.health.run("acquire", send, self._landed_late)
        except Unavailable as exc:
            if lease and not isinstance(exc, Skipped):
                self._orphan(prepared, lease)  # the script may have run before the call failed
            return await self.failopen.decide(limits, prepared, tokens, headroom)
        except asyncio.CancelledError:
            if lease:
                self._orphan(prepared, lease)
            raise
        if isinstance(result, SharedReservation):
            result.shadow = await self.failopen.shadow(limits, tokens)
            if lease:
                for p in prepared:
                    if p.concurrent:
                        self._held.setdefault(p.leases, {})[lease] = None
        return result

    async def release(self, reservation: Reservation) -> None:
        if not isinstance(reservation, SharedReservation):
            await self.local.release(reservation)
            return
        for shadow in reservation.shadow:
            await self.local.release(shadow)
        if reservation.released or not reservation.concurrent:
            return
        reservation.released = True
        prepared, lease = reservation.prepared, reservation.lease
        self._unhold(prepared, lease)
        try:
            async with self.health.call("release"):
                await self._adjust(prepared, reservation.stamps, 0, 0, 0, lease)
        except Unavailable:
            self._orphan(prepared, lease)  # removed later, or it expires
        except asyncio.CancelledError:
            self._orphan(prepared, lease)
            raise

    async def settle(self, reservation: Reservation, *, requests: int, tokens: int) -> None:
        if not isinstance(reservation, SharedReservation):
            await self.local.settle(reservation, requests=requests, tokens=tokens)
            return
        for shadow in reservation.shadow:
            await self.local.settle(shadow, requests=requests, tokens=tokens)
        if reservation.settled:
            return
        reservation.settled = True
        d_requests, d_tokens = requests - reservation.requests, tokens - reservation.tokens
        if not d_requests and not d_tokens and not reservation.tokens:
            return
        try:
            async with self.health.call("settle"):
                await self._adjust(
                    reservation.prepared, reservation.stamps, reservation.tokens, d_requests, d_tokens, ""
                )
        except Unavailable:
            pass  # the shared counters keep the estimate: errs towards admitting less, never more

    async def finish(self, reservation: Reservation, *, requests: int, tokens: int) -> None:
        """Settle and release in one script call (ADJUST does both: the deltas, then the lease)."""
        if not isinstance(reservation, SharedReservation):
            self.local.settle_now(reservation, requests, tokens)
            self.local.release_now(reservation)
            return
        for shadow in reservation.shadow:
            self.local.settle_now(shadow, requests, tokens)
            self.local.release_now(shadow)
        settle = not reservation.settled
        reservation.settled = True
        d_requests, d_tokens = requests - reservation.requests, tokens - reservation.tokens
        settle = settle and bool(d_requests or d_tokens or reservation.tokens)
        release = reservation.concurrent and not reservation.released
        if not settle and not release:
            return
        prepared, lease = reservation.prepared, reservation.lease if release else ""
        if release:
            reservation.released = True
            self._unhold(prepared, lease)
        reserved = reservation.tokens if settle else 0
        if not settle:
            d_requests = d_tokens = 0
        try:
            async with self.health.call("settle" if settle else "release"):
                await self._adjust(prepared, reservation.stamps, reserved, d_requests, d_tokens, lease)
        except Unavailable:
            if release:
                self._orphan(prepared, lease)  # removed later, or it expires
        except asyncio.CancelledError:
            if release:
                self._orphan(prepared, lease)
            raise

    async def remaining(self, keys: Iterable[str] | None = None) -> list[Usage]:
        known = self._known
        wanted = list(known) if keys is None else [key for key in keys if key in known]
        if not wanted:
            return []
        prepared = [self._prepare(known[key]) for key in wanted]
        try:
            async with self.health.call("snapshot"):
                if not self.cluster:
                    reply = await self._eval(SNAPSHOT, *codec.snapshot_call(prepared, self._length))
                    return codec.snapshot(prepared, reply, self._length)
                replies = await asyncio.gather(
                    *(self._eval(SNAPSHOT, *codec.snapshot_call([p], self._length)) for p in prepared)
                )
                usage: list[Usage] = []
                for p, reply in zip(prepared, replies, strict=True):
                    usage += codec.snapshot([p], reply, self._length)
                return usage
        except Unavailable:
            return await self.local.remaining(wanted)

    # --- Redis calls ----------------------------------------------------------------------------------

    async def _acquire(
        self, prepared: tuple[codec.Prepared, ...], tokens: int, lease: str, headroom: float
    ) -> SharedReservation | Refusal:
        keys, args = codec.acquire_call(prepared, tokens, lease, self._ttl_ms, self._length, headroom)
        reply = await self._eval(ACQUIRE, keys, args)
        if int(reply[0]) != 1:
            return codec.refusal(prepared, reply, tokens, self._length, headroom)
        return self._reserved(prepared, tokens, lease, ((int(reply[1]), int(reply[2])),) * len(prepared))

    def _reserved(self, prepared: tuple[codec.Prepared, ...], tokens: int, lease: str,
                  stamps: tuple[tuple[int, int], ...]) -> SharedReservation:
        at = codec.redis_now(*stamps[0])
        return SharedReservation(
            tuple(p.limit for p in prepared), int(at // self._length), 1, tokens, bool(lease),
            at=at, prepared=prepared, stamps=stamps, lease=lease,
        )

    async def _acquire_cluster(
        self, prepared: tuple[codec.Prepared, ...], tokens: int, lease: str, headroom: float
    ) -> SharedReservation | Refusal:
        """One call per limit (one slot each), run together. All-or-nothing is kept by rolling back the
        limits that admitted when another refused; in between they may refuse a request they would have
        admitted, never the reverse."""
        ttl, minute = self._ttl_ms, self._length
        replies = await asyncio.gather(
            *(self._eval(ACQUIRE, *codec.acquire_call([p], tokens, lease, ttl, minute, headroom)) for p in prepared),
            return_exceptions=True,
        )
        taken = [(p, (int(r[1]), int(r[2]))) for p, r in zip(prepared, replies, strict=True)
                 if not isinstance(r, BaseException) and int(r[0]) == 1]
        if len(taken) == len(prepared):
            return self._reserved(prepared, tokens, lease, tuple(stamp for _, stamp in taken))
        if taken:  # give back what the admitting limits counted
            back = tuple(p for p, _ in taken)
            await self._adjust(back, tuple(stamp for _, stamp in taken), tokens, -1, -tokens, lease)
        worst: Refusal | None = None
        for p, reply in zip(prepared, replies, strict=True):
            if isinstance(reply, BaseException):
                raise reply
            if int(reply[0]) != 1:
                found = codec.refusal([p], reply, tokens, minute, headroom)
                if longer(found, worst):
                    worst = found
        assert worst is not None
        return worst

    async def _adjust(
        self,
        prepared: Sequence[codec.Prepared],
        stamps: Sequence[tuple[int, int]],
        reserved: int,
        requests: int,
        tokens: int,
        lease: str,
    ) -> None:
        def call(group: Sequence[codec.Prepared], at: Sequence[tuple[int, int]]) -> tuple[list[str], list[Any]]:
            return codec.adjust_call(
                group, at, minute=self._length, reserved=reserved, requests=requests, tokens=tokens,
                lease=lease,
            )

        if not self.cluster or len(prepared) == 1:
            await self._eval(ADJUST, *call(prepared, stamps))
            return
        pairs = zip(prepared, stamps, strict=True)
        await asyncio.gather(*(self._eval(ADJUST, *call([p], [w])) for p, w in pairs))

    async def _leases(self, mode: str, held: dict[str, list[str]]) -> int:
        if not self.cluster or len(held) == 1:
            return int(await self._eval(LEASES, *codec.leases_call(mode, self._ttl_ms, held)))
        ttl = self._ttl_ms
        counts = await asyncio.gather(
            *(self._eval(LEASES, *codec.leases_call(mode, ttl, {key: ids})) for key, ids in held.items())
        )
        return sum(int(c) for c in counts)

    async def _eval(self, script: Script, keys: list[str], args: list[Any]) -> Any:
        """EVALSHA; after a Redis restart or failover (NOSCRIPT) load the script and run it again."""
        started = time.perf_counter()
        try:
            try:
                return await self.client.evalsha(script.sha, len(keys), *keys, *args)
            except NoScriptError:
                await self.client.script_load(script.text)
                return await self.client.evalsha(script.sha, len(keys), *keys, *args)
        finally:
            if self.metrics is not None:
                self.metrics.redis_called(script.name, time.perf_counter() - started)

    # --- bookkeeping ----------------------------------------------------------------------------------

    def _landed_late(self, result: SharedReservation | Refusal) -> None:
        """An acquire answered after the request was decided locally: an admission nobody uses goes back
        (by the keeper, once Redis answers; the local decision is added to the shared counts instead)."""
        if isinstance(result, SharedReservation):
            self._unhold(result.prepared, result.lease)
            self._late.append(result)

    def _prepare(self, limit: Limit) -> codec.Prepared:
        found = self._prepared.get(limit.key)
        if found is None or found.limit is not limit:
            if len(self._prepared) >= _CACHE:
                self._prepared.clear()
            found = self._prepared[limit.key] = codec.prepare(self.rule.key_prefix, limit)
            if self._current is None and len(self._known) < _CACHE:
                self._known[limit.key] = limit
        return found

    def _unhold(self, prepared: Sequence[codec.Prepared], lease: str) -> None:
        for p in prepared:
            ids = self._held.get(p.leases)
            if ids is not None:
                ids.pop(lease, None)
                if not ids:
                    del self._held[p.leases]

    def _orphan(self, prepared: Sequence[codec.Prepared], lease: str) -> None:
        self._unhold(prepared, lease)
        self._orphans.append((tuple(p.leases for p in prepared if p.concurrent), lease))
