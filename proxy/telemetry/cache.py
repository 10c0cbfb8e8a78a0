"""The response cache's metrics (proxy/cache/), registered in the app's registry by `Metrics`.

Counters are hot (plain dicts, exported at scrape time): a hit must not pay for prometheus-client's lock.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge

from proxy.telemetry.hot import HotCounter, HotMetrics


class CacheMetrics:
    __slots__ = ("requests", "inputs", "stored", "evictions", "errors", "memory")

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = HotCounter(
            "signalbox_cache_requests", "Requests on routes with a cache, by route and result: hit (answered "
            "from the cache), miss (sent upstream, stored if it may be) or bypass (not looked up: a stream, a "
            "method other than GET or POST, or the client's Cache-Control no-cache / no-store).",
            ["route", "result"],
        )
        self.inputs = HotCounter(
            "signalbox_cache_embedding_inputs", "Embedding inputs on routes with a cache, by route and result "
            "(hit: its vector came from the cache; miss: sent upstream).", ["route", "result"],
        )
        self.stored = HotCounter(
            "signalbox_cache_stored_bytes", "Bytes written to the cache (answers and embedding vectors), by route.",
            ["route"],
        )
        self.evictions = HotCounter(
            "signalbox_cache_evictions", "Entries the in-memory cache dropped before their ttl to stay within "
            "cache_memory, by route.", ["route"],
        )
        self.errors = HotCounter(
            "signalbox_cache_store_errors", "Cache store calls to Redis that failed or were skipped while its "
            "breaker was open (each served as a miss, never as an error), by operation.", ["op"],
        )
        self.memory = Gauge(
            "signalbox_cache_memory_bytes", "Bytes held by the in-memory cache now.", registry=registry,
        )
        registry.register(HotMetrics([self.requests, self.inputs, self.stored, self.evictions, self.errors]))

    def result(self, route: str, result: str) -> None:
        self.requests.inc((route, result))
