"""The Redis limiter store's background work, one round per tick: probe Redis while the breaker is open,
and ping it when nothing else did during the tick (so `Health` tells a slow Redis from a silent one);
once it answers, remove orphaned leases, roll back what acquires that answered too late counted (their
requests were decided locally), add the requests admitted locally meanwhile to the shared counts
(`failopen.py`), and renew the leases this replica holds."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from proxy.admission.redis.failopen import Unshared
from proxy.admission.redis.health import Unavailable, keeper_tick

if TYPE_CHECKING:
    from proxy.admission.redis.store import RedisStore

log = logging.getLogger("signalbox.limits")


class Keeper:
    __slots__ = ("store",)

    def __init__(self, store: RedisStore) -> None:
        self.store = store

    async def run(self) -> None:
        """Renew held leases every third of their TTL, remove orphaned ones, reconcile local admissions,
        probe Redis while degraded."""
        store = self.store
        rule = store.rule
        renew_every = rule.lease_ttl / 3
        tick = keeper_tick(rule)
        renewed = store._clock()
        while True:
            await asyncio.sleep(tick)
            try:
                health = store.health
                if health.breaker.state == "open" or store._clock() - health.answered_at >= tick:
                    await self.probe()
                if store.health.breaker.degraded:
                    continue
                if store._orphans:
                    await self.forget()
                if store._late:
                    await self.roll_back()
                if store.failopen.pending():
                    await self.reconcile()
                now = store._clock()
                if store._held and now - renewed >= renew_every - tick / 2:
                    renewed = now
                    await self.renew()
            except Exception:  # the keeper must outlive any surprise; the next round tries again
                log.exception("limiter store: keeper round failed")

    async def probe(self) -> None:
        try:
            async with self.store.health.call("probe"):
                await self.store.client.ping()
        except Unavailable:
            pass

    async def renew(self) -> None:
        store = self.store
        held = {key: list(ids) for key, ids in store._held.items() if ids}
        try:
            async with store.health.call("leases"):
                lost = await store._leases("renew", held)
        except Unavailable:
            return
        if lost:
            log.debug("limiter store: %d leases had expired before renewal (reclaimed)", lost)

    async def forget(self) -> None:
        store = self.store
        orphans: dict[str, list[str]] = {}
        while store._orphans:
            keys, lease = store._orphans.popleft()
            for key in keys:
                orphans.setdefault(key, []).append(lease)
        try:
            async with store.health.call("leases"):
                await store._leases("forget", orphans)
        except Unavailable:
            pass  # they expire by themselves

    async def reconcile(self) -> None:
        """Add the requests admitted locally to the shared counts (their current window)."""
        store = self.store
        left: list[Unshared] = store.failopen.drain()
        try:
            async with store.health.call("reconcile"):
                while left:
                    item = left[-1]
                    at = ((0, 0),) * len(item.prepared)  # additions go to the current windows whatever the stamp
                    await store._adjust(item.prepared, at, 0, item.requests, item.tokens, "")
                    left.pop()
        except Unavailable:
            store.failopen.restore(left)

    async def roll_back(self) -> None:
        """Take back what acquires that answered too late counted (their requests were decided locally)."""
        store = self.store
        try:
            async with store.health.call("rollback"):
                while store._late:
                    late = store._late[0]
                    await store._adjust(late.prepared, late.stamps, late.tokens, -1, -late.tokens, late.lease)
                    store._late.popleft()
        except Unavailable:
            pass  # the next round tries again
