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
from proxy.telemetry.cache import CacheMetrics
from proxy.telemetry.hot import HotCounter, HotHistogram, HotMetrics
from proxy.telemetry.outcome import Refusals
from proxy.telemetry.queues import QueueBook
from proxy.telemetry.rows import Recorder
from proxy.telemetry.sockets import SocketMetrics

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_WAIT_BUCKETS = (0.001, *_LATENCY_BUCKETS, 600, 900, 1800)
"""Queue waits: up to 30 minutes, so a policy's max_wait of several minutes stays measurable."""
_REDIS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # Fed by every request (`record`): plain dicts exported at scrape time (see telemetry/hot.py).
        self.requests = HotCounter(
            "signalbox_requests", "Requests, once each by what the client finally got: status (the status line "
            "sent; 499 when the client left) and outcome (ok, upstream_error, timeout, rejected, cancelled, "
            "proxy_error).", ["route", "tenant", "upstream", "status", "outcome"],
        )
        self.duration = HotHistogram(
            "signalbox_request_duration_seconds", "Time from arrival to the end of the response.",
            ["route"], _LATENCY_BUCKETS,
        )
        self.processing = HotHistogram(
            "signalbox_processing_seconds", "Time from dispatch (after any queue wait) to the end of the response.",
            ["route"], _LATENCY_BUCKETS,
        )
        self.ttfb = HotHistogram(
            "signalbox_upstream_ttfb_seconds", "Time from arrival to the upstream's response headers.",
            ["upstream"], _LATENCY_BUCKETS,
        )
        self.in_flight = Gauge("signalbox_in_flight_requests", "Requests being handled now.", registry=r)
        self.sockets = SocketMetrics(r)  # the WebSocket endpoints' own (telemetry/sockets.py)
        self.errors = HotCounter(
            "signalbox_proxy_errors", "Requests the proxy itself refused or failed, by reason.", ["reason"],
        )
        self.client_gone = HotCounter(
            "signalbox_client_disconnects", "Responses the client abandoned before the end.", ["route"],
        )
        self.stream_events = HotCounter(
            "signalbox_stream_events_relayed", "SSE events relayed to clients.", ["route"],
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
        self.reloads = Counter(
            "signalbox_policy_reloads", "Policy reload attempts, by trigger (watch, sighup, admin) and result "
            "(applied, unchanged, rejected).", ["trigger", "result"], registry=r,
        )
        # Admission and the scheduler. Gauges are set at scrape time (see `before_scrape`), never per request.
        self.queue_length = Gauge(
            "signalbox_queue_length", "Requests waiting for a slot, by queue and priority class.",
            ["queue", "priority"], registry=r,
        )
        self.queue_wait = Histogram(
            "signalbox_queue_wait_seconds", "Time waited for a slot by requests that found none free "
            "(whether they got one, timed out, were cleared or left).",
            ["queue"], buckets=_WAIT_BUCKETS, registry=r,
        )
        self.rejections = Counter(
            "signalbox_rejections", "Requests refused by admission or a queue, by reason (rate_limit, "
            "token_limit, concurrency_limit, queue_full, queue_timeout, queue_cleared, ...). A client that left is a "
            "cancellation (signalbox_requests_total{outcome=\"cancelled\"}), not a rejection.",
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
            "signalbox_limiter_remaining", "What is left of a limit in its window (or concurrent slots free).",
            ["tenant", "limit"], registry=r,
        )
        # The shared limiter store (Redis): fed per Redis call; the degraded gauge changes with the state.
        self.limiter_degraded = Gauge(
            "signalbox_limiter_degraded", "1 while the shared limiter store (Redis) is unreachable and each "
            "replica applies local limits (limit / expected_replicas); 0 when limits are shared or local by design.",
            registry=r,
        )
        self.redis_call = Histogram(
            "signalbox_redis_call_seconds", "Round trips to the limiter store's Redis, by operation (acquire, "
            "settle, release, leases, snapshot, probe).", ["op"], buckets=_REDIS_BUCKETS, registry=r,
        )
        self.redis_errors = Counter(
            "signalbox_redis_errors", "Limiter store calls to Redis that failed, by operation and kind "
            "(timeout, connection, response, ...).", ["op", "kind"], registry=r,
        )
        # The batcher (embeddings coalescing), fed once per flush and once per batched caller.
        self.batch_callers = Histogram(
            "signalbox_batch_callers", "Callers that shared one batched upstream call, by route.",
            ["route"], buckets=_BATCH_BUCKETS, registry=r,
        )
        self.batch_inputs = Histogram(
            "signalbox_batch_inputs", "Inputs sent in one batched upstream call, by route.",
            ["route"], buckets=_BATCH_BUCKETS, registry=r,
        )
        self.batch_flushes = Counter(
            "signalbox_batch_flushes", "Batches sent, by route and reason (full, timeout, alone: a call "
            "that could not be merged).", ["route", "reason"], registry=r,
        )
        self.batch_wait = Histogram(
            "signalbox_batch_wait_seconds", "Time a call waited for others to join its batch.",
            ["route"], buckets=(0.0005, 0.001, 0.0025, *_LATENCY_BUCKETS[:8]), registry=r,
        )
        self.batch_saved = Counter(
            "signalbox_batch_upstream_calls_saved", "Upstream calls batching avoided (callers minus one per "
            "merged call).", ["route"], registry=r,
        )
        self.batch_splits = Counter(
            "signalbox_batch_splits", "Merged calls re-sent in two parts after a 400-class answer (bisect).",
            ["route"], registry=r,
        )
        self.split_requests = Counter(
            "signalbox_split_requests", "Embeddings requests above their upstream's batch_limits, split into "
            "several upstream calls.", ["route"], registry=r,
        )
        self.split_parts = Counter(
            "signalbox_split_parts", "Parts of split embeddings requests sent upstream (each one upstream call).",
            ["route"], registry=r,
        )
        # Upstream resilience (proxy/upstream): per attempt from the Call, state gauges at scrape time,
        # transitions and rare events (retry, budget, fallback) when they happen.
        self.upstream_requests = HotCounter(
            "signalbox_upstream_requests", "Upstream attempts, by deployment and status (or upstream_timeout, "
            "upstream_unreachable, cancelled when no response came).", ["deployment", "status"],
        )
        self.upstream_latency = HotHistogram(
            "signalbox_upstream_latency_seconds", "Time from sending an attempt to its response headers (or "
            "its failure), by deployment.", ["deployment"], _LATENCY_BUCKETS,
        )
        self.ttft = HotHistogram(
            "signalbox_time_to_first_token_seconds", "Streams: time from dispatch (after any queue wait) to the first "
            "event relayed.",
            ["route"], _LATENCY_BUCKETS,
        )
        self.retries = Counter(
            "signalbox_upstream_retries", "Retries started, by route and the outcome retried (a status, "
            "connect_error or timeout).", ["route", "reason"], registry=r,
        )
        self.retry_budget_exhausted = Counter(
            "signalbox_retry_budget_exhausted", "Retries refused by an upstream's retry budget.",
            ["upstream"], registry=r,
        )
        self.fallbacks = Counter(
            "signalbox_fallbacks", "Fallback routes tried after a route's pool gave up.",
            ["route", "fallback"], registry=r,
        )
        self.circuit_open = Gauge(
            "signalbox_upstream_circuit_open", "1 while the deployment's circuit breaker is open or "
            "half-open (probing), 0 when closed.", ["deployment"], registry=r,
        )
        self.circuit_transitions = Counter(
            "signalbox_upstream_circuit_transitions", "Circuit breaker transitions, by deployment and new state "
            "(open, half_open, closed).", ["deployment", "state"], registry=r,
        )
        self.upstream_outstanding = Gauge(
            "signalbox_upstream_outstanding", "Requests sent to the deployment and not yet fully relayed.",
            ["deployment"], registry=r,
        )
        self.pacing_hold = Gauge(
            "signalbox_upstream_pacing_hold_seconds", "Seconds until adaptive pacing lets new requests reach "
            "the deployment (0: not held).", ["deployment"], registry=r,
        )
        self.cache = CacheMetrics(r)
        """The response cache's counters (proxy/telemetry/cache.py)."""
        # Resumable streams (proxy/streaming/resume/): the gauges read the hub at scrape time.
        self.stream_resumes = Counter(
            "signalbox_stream_resumes", "Readers that resumed a stream from an id (Last-Event-ID, starting_after), "
            "by where its events came from (local: this replica's buffer, shared: Redis).", ["source"], registry=r,
        )
        self.stream_resume_failures = Counter(
            "signalbox_stream_resume_failures", "Resumes refused or cut, by reason (unknown: no such stream for "
            "this tenant, dropped: the events after the id left the buffer, bad_id, store: Redis failed).",
            ["reason"], registry=r,
        )
        self.streams_detached = Gauge(
            "signalbox_streams_detached", "Generations running on after their client left (resumable streams).",
            registry=r,
        )
        self.stream_buffered_bytes = Gauge(
            "signalbox_stream_buffered_bytes", "Bytes of events this process holds for resumable streams.",
            registry=r,
        )
        self.streams_stopped = Counter(
            "signalbox_resumable_streams_stopped", "Detached generations the proxy stopped, by reason (ttl: nobody "
            "read it, detached_limit: too many detached streams, cancelled: a cancel request).", ["reason"],
            registry=r,
        )
        self.before_scrape: list[Callable[[], Awaitable[None]]] = []
        """Refreshers for state gauges (queues, limiters), awaited at each scrape."""
        self._children: dict[tuple[Any, ...], Any] = {}
        self.queues = QueueBook()
        """Per-queue totals and recent times for the admin API (proxy/telemetry/queues.py)."""
        self.refusals = Refusals()
        """The last refused requests and why, for the dashboard (proxy/telemetry/outcome.py)."""
        recorder = Recorder(self)
        self.record: Callable[[Call], None] = recorder.record
        """Called once per request, after the response ended (or failed) and its outcome was judged
        (proxy/telemetry/rows.py)."""
        r.register(HotMetrics([
            self.requests, self.duration, self.processing, self.ttfb, self.errors, self.client_gone, self.stream_events,
            self.upstream_requests, self.upstream_latency, self.ttft,
        ], recorder.fold))

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def set_policy(self, digest: str) -> None:
        self.policy_version.clear()
        self.policy_version.labels(digest[:12]).set(1)

    def reject(self, reason: str) -> None:
        self._child(self.rejections, reason).inc()

    def count_tokens(self, tenant: str, kind: str, amount: int) -> None:
        self._child(self.tokens, tenant, kind).inc(amount)

    def redis_called(self, op: str, seconds: float) -> None:
        self._child(self.redis_call, op).observe(seconds)

    def redis_failed(self, op: str, kind: str) -> None:
        self._child(self.redis_errors, op, kind).inc()

    def queue_waited(self, queue: str, seconds: float) -> None:
        self._child(self.queue_wait, queue).observe(seconds)

    def batch_flushed(self, route: str, reason: str, callers: int, inputs: int) -> None:
        self._child(self.batch_flushes, route, reason).inc()
        self._child(self.batch_callers, route).observe(callers)
        self._child(self.batch_inputs, route).observe(inputs)
        if callers > 1:
            self._child(self.batch_saved, route).inc(callers - 1)

    def batch_waited(self, route: str, seconds: float) -> None:
        self._child(self.batch_wait, route).observe(seconds)

    def batch_split(self, route: str) -> None:
        self._child(self.batch_splits, route).inc()

    def split_request(self, route: str) -> None:
        self._child(self.split_requests, route).inc()

    def split_part(self, route: str) -> None:
        self._child(self.split_parts, route).inc()

    def retried(self, route: str, reason: str) -> None:
        self._child(self.retries, route, reason).inc()

    def budget_exhausted(self, upstream: str) -> None:
        self._child(self.retry_budget_exhausted, upstream).inc()

    def fallback(self, route: str, fallback: str) -> None:
        self._child(self.fallbacks, route, fallback).inc()

    def circuit_changed(self, deployment: str, state: str, transition: bool = True) -> None:
        self._child(self.circuit_open, deployment).set(0 if state == "closed" else 1)
        if transition:
            self._child(self.circuit_transitions, deployment, state).inc()

    def deployment_gauges(self, deployment: str, outstanding: int, hold: float, circuit_open: bool) -> None:
        self._child(self.upstream_outstanding, deployment).set(outstanding)
        self._child(self.pacing_hold, deployment).set(hold)
        self._child(self.circuit_open, deployment).set(1 if circuit_open else 0)

    def forget_deployment(self, deployment: str) -> None:
        """A reload removed the deployment: drop its state gauges (counters keep their history)."""
        for metric in (self.circuit_open, self.upstream_outstanding, self.pacing_hold):
            self._children.pop((id(metric), deployment), None)
            try:
                metric.remove(deployment)
            except KeyError:
                pass

    async def handle(self, request: web.Request) -> web.Response:
        for refresh in self.before_scrape:
            await refresh()
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
