"""The response cache on the data path: `ResponseCache.serve(call)` for a route with `cache:`, called by
ingress after the tenant is known and the route resolved, before limits, queue and upstream.

- A hit replays the stored answer. It takes no queue slot and no upstream limit, but it does take the
  call's own limits (tenant and route: a request counted, no tokens), so a tenant cannot go past its quota
  through the cache.
- A miss goes `onward` (limits, queue, dispatch, relay, as without a cache) and the answer is stored when
  the rules allow (proxy/cache/rules.py). Identical misses wait for the first one's answer (single
  flight, per process; bounded by the route's `timeouts.total`).
  With the Redis store, replicas do the same through a short claim in Redis (SET NX with a lease): the
  first replica fetches, the others look again until the answer is stored or the claim is gone.
- A bypass goes onward and stores nothing: a stream, a method other than GET and POST, a client's
  `Cache-Control: no-store`; `no-cache` skips the lookup but refreshes the entry.
Embeddings are cached per input (proxy/cache/inputs.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from aiohttp import web

from proxy.cache import answer, inputs
from proxy.cache.entry import decode, encode
from proxy.cache.flight import Flights, follow
from proxy.cache.memory import MemoryStore
from proxy.cache.rules import CACHED_METHODS, ClientMode, body_bytes, client_mode, request_key
from proxy.call import Call
from proxy.errors import ProxyError
from proxy.policy.cache_rule import CacheRule
from proxy.telemetry.cache import CacheMetrics

LOCK_LEASE = 30.0
"""Longest one replica holds the fetch of an answer (Redis store) before another may fetch it too."""
Onward = Callable[[], Awaitable[web.StreamResponse]]
"""The rest of the data path (limits, queue, dispatch or the batcher, relay)."""
Limits = Callable[[], AbstractAsyncContextManager[None]]
"""The call's own limits only (a hit): proxy.flow.scheduler.Scheduler.own_limits."""


class Store(Protocol):
    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]: ...

    async def put_many(self, items: Sequence[tuple[str, bytes]], ttl: float, route: str) -> None: ...

    async def claim(self, key: str, seconds: float) -> bool: ...

    async def release(self, key: str) -> None: ...

    async def held(self, key: str) -> bool: ...

    def describe(self) -> dict[str, object]: ...


class ResponseCache:
    """One per app: the store (memory, or Redis once the app opened it) and the fetches in flight."""

    __slots__ = ("memory", "store", "flights", "metrics", "wall")

    def __init__(self, metrics: CacheMetrics, limit: int = 64 * 1024 * 1024,
                 wall: Callable[[], float] = time.time) -> None:
        self.memory = MemoryStore(limit, metrics)
        self.store: Store = self.memory
        self.flights = Flights()
        self.metrics = metrics
        self.wall = wall

    async def serve(self, request: web.Request, call: Call, onward: Onward, limits: Limits) -> web.StreamResponse:
        route = call.route
        assert route is not None and route.cache is not None and call.tenant is not None
        rule = route.cache
        mode = client_mode(request.headers.get("Cache-Control"))
        if call.stream or mode == "skip" or call.method not in CACHED_METHODS:
            return await self.onward(call, onward, "bypass")
        if self.store is self.memory:
            self.memory.resize(call.plan.cache_memory)
        if call.body is not None and call.path.endswith("/embeddings"):
            served = await inputs.serve(self, request, call, onward, limits, use=mode == "use")
            if served is not None:
                return served
        parts = (call.method, call.path, request.rel_url.raw_query_string)
        credentials = call.plan.identify.passthrough_auth
        key = request_key(rule, call.tenant.name, parts, body_bytes(call.body, call.raw_body), request.headers,
                          credentials)
        return await self._keyed(call, key, rule, mode, onward, limits)

    async def _keyed(self, call: Call, key: str, rule: CacheRule, mode: ClientMode, onward: Onward,
                     limits: Limits) -> web.StreamResponse:
        if mode == "refresh":
            return await self._fetch(call, key, rule, onward, "bypass", lead=False)
        hit = await self._hit(call, key, limits)
        if hit is not None:
            return hit
        leader = self.flights.waiting(key)
        if leader is None:
            return await self._fetch(call, key, rule, onward, "miss", lead=True, limits=limits)
        assert call.route is not None
        await follow(leader, call.route.timeouts.total)
        hit = await self._hit(call, key, limits)
        if hit is not None:
            return hit
        return await self._fetch(call, key, rule, onward, "miss", lead=False)  # the leader's was not kept

    async def _hit(self, call: Call, key: str, limits: Limits) -> web.Response | None:
        data = (await self.store.get_many((key,)))[0]
        entry = decode(data) if data is not None else None
        if entry is None:
            return None
        call.cache = "hit"
        async with limits():  # counted against the tenant's and the route's request limits
            call.mark("dispatch")
            response = answer.replay(call, entry, self.wall())
        assert call.route is not None
        self.metrics.result(call.route.name, "hit")
        return response

    async def _fetch(self, call: Call, key: str, rule: CacheRule, onward: Onward, result: str, *, lead: bool,
                     limits: Limits | None = None) -> web.StreamResponse:
        flight = self.flights.lead(key) if lead else None
        claimed = False
        try:
            if lead and limits is not None:  # one replica fetches, the others look again (Redis store)
                assert call.route is not None
                lease = min(call.route.timeouts.total, LOCK_LEASE)
                claimed = await self.store.claim(key, lease)
                if not claimed:
                    hit = await self._elsewhere(call, key, limits, lease)
                    if hit is not None:
                        return hit
            response = await self.onward(call, onward, result)
            kept = answer.storable(response, rule)
            if kept is not None:
                body, ttl = kept
                data = encode(answer.to_entry(response, body, self.wall()))
                assert call.route is not None
                await self.store.put_many(((key, data),), ttl, call.route.name)
                self.metrics.stored.inc((call.route.name,), len(data))
            return response
        finally:
            if claimed:
                await self.store.release(key)
            if flight is not None:
                self.flights.land(key, flight)

    async def _elsewhere(self, call: Call, key: str, limits: Limits, lease: float) -> web.Response | None:
        """Another replica is fetching this answer: look again (backing off) until it is stored, that
        replica's claim is gone (its answer was not kept) or the lease is over; then None: fetch it here."""
        loop = asyncio.get_running_loop()
        end = loop.time() + lease
        pause = 0.02
        while loop.time() < end:
            await asyncio.sleep(pause)
            hit = await self._hit(call, key, limits)
            if hit is not None:
                return hit
            if not await self.store.held(key):  # gone: stored since the look just now, or not kept at all
                return await self._hit(call, key, limits)
            pause = min(pause * 2, 0.5)
        return None

    async def onward(self, call: Call, onward: Onward, result: str) -> web.StreamResponse:
        """The rest of the path for a miss or a bypass, its answer (or error) labelled with `result`."""
        assert call.route is not None
        call.cache = result  # a stream's headers are labelled by the relay (ingress.forward)
        self.metrics.result(call.route.name, result)
        try:
            response = await onward()
        except ProxyError as err:  # a 429, a timeout, an unreachable upstream: labelled like any answer
            err.headers[answer.CACHE_HEADER] = result
            raise
        answer.label(response, result)
        return response

    def describe(self) -> dict[str, object]:
        return self.store.describe()
