"""The in-memory cache store: least recently used first out, bounded by the bytes it holds.

Hand-written over `OrderedDict` (no library bounds an asyncio-friendly LRU by bytes with per-entry
expiry and a route to count evictions by; cachetools' TTLCache has one ttl for all entries).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

from proxy.telemetry.cache import CacheMetrics

OVERHEAD = 100
"""Bytes counted per entry beyond its value: the key (64 hex), the dict slot and the tuple."""


class MemoryStore:
    """Values by key, each with its expiry and its route; `limit` is read from the plan at each write."""

    __slots__ = ("limit", "used", "metrics", "clock", "_items")

    def __init__(self, limit: int, metrics: CacheMetrics | None = None, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.limit = limit
        self.used = 0
        self.metrics = metrics
        self.clock = clock
        self._items: OrderedDict[str, tuple[bytes, float, str]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> bytes | None:
        found = self._items.get(key)
        if found is None:
            return None
        if found[1] <= self.clock():
            self._drop(key, found)
            return None
        self._items.move_to_end(key)
        return found[0]

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        return [self.get(key) for key in keys]

    async def put_many(self, items: Sequence[tuple[str, bytes]], ttl: float, route: str) -> None:
        self.put_now(items, ttl, route)

    def put_now(self, items: Sequence[tuple[str, bytes]], ttl: float, route: str) -> None:
        expires = self.clock() + ttl
        entries = self._items
        for key, value in items:
            size = len(value) + OVERHEAD
            if size > self.limit:
                continue  # would evict everything and still not fit
            old = entries.pop(key, None)
            if old is not None:
                self.used -= len(old[0]) + OVERHEAD
            entries[key] = (value, expires, route)
            self.used += size
        self._evict()
        if self.metrics is not None:
            self.metrics.memory.set(self.used)

    async def claim(self, key: str, seconds: float) -> bool:
        return True  # one process: its single flight (proxy/cache/flight.py) is the whole story

    async def release(self, key: str) -> None:
        return None

    async def held(self, key: str) -> bool:
        return False

    def resize(self, limit: int) -> None:
        if limit != self.limit:
            self.limit = limit
            self._evict()

    def _evict(self) -> None:
        entries = self._items
        while self.used > self.limit and entries:
            _key, (value, _expires, route) = entries.popitem(last=False)
            self.used -= len(value) + OVERHEAD
            if self.metrics is not None:
                self.metrics.evictions.inc((route,))

    def _drop(self, key: str, found: tuple[bytes, float, str]) -> None:
        del self._items[key]
        self.used -= len(found[0]) + OVERHEAD

    def describe(self) -> dict[str, object]:
        return {"backend": "memory", "entries": len(self._items), "bytes": self.used, "limit": self.limit}
