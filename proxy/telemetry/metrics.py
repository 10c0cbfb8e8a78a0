"""Every Prometheus metric Signalbox exports, defined once, fed from the finished `Call`.

Each app owns its own registry (no process globals), so tests build as many apps as they like.
Label children are cached: `labels()` costs a lock and a dict walk we do not want per request.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from proxy.call import Call

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "signalbox_requests", "Requests answered, by route, tenant, upstream and status.",
            ["route", "tenant", "upstream", "status"], registry=r,
        )
        self.duration = Histogram(
            "signalbox_request_duration_seconds", "Time from arrival to the end of the response.",
            ["route"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.ttfb = Histogram(
            "signalbox_upstream_ttfb_seconds", "Time from arrival to the upstream's response headers.",
            ["upstream"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.in_flight = Gauge("signalbox_in_flight_requests", "Requests being handled now.", registry=r)
        self.errors = Counter(
            "signalbox_proxy_errors", "Requests the proxy itself refused or failed, by reason.",
            ["reason"], registry=r,
        )
        self.client_gone = Counter(
            "signalbox_client_disconnects", "Responses the client abandoned before the end.", ["route"], registry=r,
        )
        self.stream_events = Counter(
            "signalbox_stream_events_relayed", "SSE events relayed to clients.", ["route"], registry=r,
        )
        self.policy_version = Gauge(
            "signalbox_policy_info", "The active policy's source digest (value is always 1).", ["digest"], registry=r,
        )
        self.reload_failures = Counter(
            "signalbox_policy_reload_failures", "Policy reloads rejected (the previous policy kept serving).",
            registry=r,
        )
        self.reload_success = Gauge(
            "signalbox_policy_last_reload_success", "1 when the last reload attempt succeeded or none failed.",
            registry=r,
        )
        self.reload_success.set(1)
        # Admission and the scheduler. Gauges are set at scrape time (see `before_scrape`), never per request.
        self.queue_length = Gauge(
            "signalbox_queue_length", "Requests waiting for a slot, by queue and priority class.",
            ["queue", "priority"], registry=r,
        )
        self.queue_wait = Histogram(
            "signalbox_queue_wait_seconds", "Time waited for a slot by requests that found none free.",
            ["queue"], buckets=(0.001, *_LATENCY_BUCKETS), registry=r,
        )
        self.rejections = Counter(
            "signalbox_rejections", "Requests refused by admission or a queue, by reason (rate_limit, "
            "token_limit, concurrency_limit, queue_full, queue_timeout, queue_cleared, client_gone).",
            ["reason"], registry=r,
        )
        self.active_requests = Gauge(
            "signalbox_active_requests", "Requests holding a slot of the queue.", ["queue"], registry=r,
        )
        self.queue_slots = Gauge(
            "signalbox_queue_slots", "Slots (concurrency) of the queue.", ["queue"], registry=r,
        )
        self.tokens = Counter(
            "signalbox_tokens", "Tokens counted by token limits, by tenant and kind (reserved, settled, "
            "refunded).", ["tenant", "kind"], registry=r,
        )
        self.limiter_remaining = Gauge(
            "signalbox_limiter_remaining", "What is left of a limit this minute (or concurrent slots free).",
            ["tenant", "limit"], registry=r,
        )
        self.before_scrape: list[Callable[[], Awaitable[None]]] = []
        """Refreshers for state gauges (queues, limiters), awaited at each scrape."""
        self._children: dict[tuple[Any, ...], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def record(self, call: Call) -> None:
        """Called once per request, after the response ended (or failed)."""
        route = call.route.name if call.route is not None else ""
        tenant = call.tenant.name if call.tenant is not None else ""
        self._child(self.requests, route, tenant, call.upstream, str(call.status)).inc()
        self._child(self.duration, route).observe(call.elapsed())
        if call.upstream and "upstream_headers" in call.marks:
            self._child(self.ttfb, call.upstream).observe(call.marks["upstream_headers"])
        if call.error is not None:
            self._child(self.errors, call.error).inc()
        if call.client_gone:
            self._child(self.client_gone, route).inc()
        if call.events_relayed:
            self._child(self.stream_events, route).inc(call.events_relayed)

    def set_policy(self, digest: str) -> None:
        self.policy_version.clear()
        self.policy_version.labels(digest[:12]).set(1)

    def reject(self, reason: str) -> None:
        self._child(self.rejections, reason).inc()

    def count_tokens(self, tenant: str, kind: str, amount: int) -> None:
        self._child(self.tokens, tenant, kind).inc(amount)

    def queue_waited(self, queue: str, seconds: float) -> None:
        self._child(self.queue_wait, queue).observe(seconds)

    async def handle(self, request: web.Request) -> web.Response:
        for refresh in self.before_scrape:
            await refresh()
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
