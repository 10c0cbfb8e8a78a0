"""The Redis cache store: entries shared by every replica naming the same Redis and `state.key_prefix`,
each with its own TTL (`SET ... PX`), read with one `MGET`.

Redis is a cache here, never a dependency: a call that fails or takes longer than `state.timeout` is a
miss (a lookup) or a skipped write, counted in signalbox_cache_store_errors. After `state.breaker.failures`
failures in a row no call is tried for `state.breaker.cooldown`, so an outage costs a request nothing
but the first few timeouts (the breaker is the limiter store's, proxy/admission/redis/degrade.py).

Keys: `<key_prefix>:cache:<sha256 hex>`; the store opens its own small connection pool (the limiter
store's pool stays free for admission).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace
from typing import Any

from redis.exceptions import RedisError

from proxy.admission.redis.client import connect
from proxy.admission.redis.degrade import Breaker
from proxy.policy.plan import StateRule
from proxy.telemetry.cache import CacheMetrics

log = logging.getLogger("signalbox.cache")
FAILED = object()
"""What `_call` returns when Redis did not answer (a miss, a write skipped, a lock not taken)."""
_POOL = 16
"""Connections of the cache's own pool (at most the limiter store's `max_connections`)."""


class SharedStore:
    __slots__ = ("client", "prefix", "timeout", "breaker", "metrics", "clock")

    def __init__(self, client: Any, rule: StateRule, metrics: CacheMetrics | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.prefix = f"{rule.key_prefix}:cache:"
        self.timeout = rule.timeout
        self.breaker = Breaker(rule.breaker_failures, rule.breaker_cooldown)
        self.metrics = metrics
        self.clock = clock

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        names = [self.prefix + key for key in keys]
        read = getattr(self.client, "mget_nonatomic", None) or self.client.mget  # a Cluster spans slots
        found = await self._call("get", read, names)
        if found is FAILED:
            return [None] * len(keys)
        return list(found)

    async def put_many(self, items: Sequence[tuple[str, bytes]], ttl: float, route: str) -> None:
        millis = max(1, int(ttl * 1000))

        async def write() -> None:
            async with self.client.pipeline(transaction=False) as pipe:
                for key, value in items:
                    pipe.set(self.prefix + key, value, px=millis)
                await pipe.execute()

        await self._call("set", write)

    async def claim(self, key: str, seconds: float) -> bool:
        """Take the fetch of `key` for this replica for `seconds` (SET NX PX): False when another replica
        holds it. An unreachable Redis claims nothing and refuses nobody (True): the fetch goes ahead."""
        name = self.prefix + "lock:" + key
        taken = await self._call("lock", self.client.set, name, b"1", nx=True, px=max(1, int(seconds * 1000)))
        return taken is FAILED or bool(taken)  # SET NX answers None when the key exists

    async def release(self, key: str) -> None:
        await self._call("unlock", self.client.delete, self.prefix + "lock:" + key)

    async def held(self, key: str) -> bool:
        """Another replica still fetches `key` (False when Redis cannot say)."""
        found = await self._call("lock", self.client.exists, self.prefix + "lock:" + key)
        return found is not FAILED and bool(found)

    async def _call(self, op: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`fn(*args, **kwargs)` within the timeout, or FAILED (failed, slow, or skipped while the breaker
        is open)."""
        now = self.clock()
        if not self.breaker.allow(now):
            self._error(op)
            return FAILED
        try:
            async with asyncio.timeout(self.timeout):
                result = await fn(*args, **kwargs)
        except (RedisError, OSError, TimeoutError) as exc:
            if self.breaker.failure(self.clock()):
                log.warning("cache: Redis unreachable (%s); serving without the shared cache", type(exc).__name__)
            self._error(op)
            return FAILED
        except asyncio.CancelledError:
            self.breaker.abandon()
            raise
        if self.breaker.success(self.clock()):
            log.warning("cache: Redis reachable again; the shared cache is back")
        return result

    def _error(self, op: str) -> None:
        if self.metrics is not None:
            self.metrics.errors.inc((op,))

    def describe(self) -> dict[str, object]:
        return {"backend": "redis", "degraded": self.breaker.degraded}

    async def close(self) -> None:
        await self.client.aclose()


@contextlib.asynccontextmanager
async def opened(rule: StateRule, metrics: CacheMetrics) -> AsyncIterator[SharedStore]:
    """The shared store for the policy's Redis (nothing connects until the first lookup), closed at exit."""
    client, _target = connect(replace(rule, max_connections=min(rule.max_connections, _POOL)))
    store = SharedStore(client, rule, metrics)
    try:
        yield store
    finally:
        await store.close()
