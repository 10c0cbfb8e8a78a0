"""Recording a finished request into the per-request metrics (telemetry/hot.py) and its queue's books.

What a request feeds depends on its labels only, so it is bound once per label tuple (a row: the requests
counter's cell and the histogram series of its route and upstream) and then found with one dict lookup by a
tuple; recording is a few additions into those cells. The rows hold the very cells the scrape, the wall
screen and the admin views read, so what they show is what `HotCounter.inc`/`HotHistogram.observe` would
give for the same requests.

A series that only some requests feed (processing, TTFT, TTFB) is bound on its first value: the exposition
lists a series from its first observation on, as before.
"""

from __future__ import annotations

from collections.abc import Callable
from time import perf_counter
from typing import TYPE_CHECKING

from proxy.call import Call
from proxy.telemetry.hot import Buckets

if TYPE_CHECKING:
    from proxy.telemetry.metrics import Metrics
    from proxy.telemetry.queues import QueueStats

_STATUS_TEXT = {code: str(code) for code in range(100, 600)}

RequestKey = tuple[str, str, str, int, str]
"""route, tenant, upstream, status, outcome: the requests counter's labels, with the status as sent."""
AttemptKey = tuple[str, int, "str | None"]
"""deployment, status (0: no response), error: what an attempt's labels are made of."""


def status_label(status: int) -> str:
    return _STATUS_TEXT.get(status) or str(status)


Observe = Callable[[float], None]
"""A histogram series' bound `add` (telemetry/hot.py's Buckets): how a row adds a value."""


class RequestRow:
    """The series one request with these labels feeds."""

    __slots__ = ("count", "duration", "processing", "ttft", "ttfb", "route", "upstream", "failed")

    def __init__(self, count: list[float], duration: Buckets, route: tuple[str], upstream: tuple[str],
                 failed: bool) -> None:
        self.count = count
        self.duration: Observe = duration.add
        self.processing: Observe | None = None
        self.ttft: Observe | None = None
        self.ttfb: Observe | None = None
        self.route = route
        self.upstream = upstream
        self.failed = failed
        """Any outcome but ok (judge gives an error or a client that left no other)."""


class AttemptRow:
    """The series one upstream attempt with these labels feeds."""

    __slots__ = ("count", "latency")

    def __init__(self, count: list[float], latency: Buckets) -> None:
        self.count = count
        self.latency: Observe = latency.add


class Recorder:
    """Feeds the hot families from a finished `Call` (`Metrics.record`)."""

    __slots__ = ("metrics", "rows", "attempt_rows", "queues")

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.rows: dict[RequestKey, RequestRow] = {}
        self.attempt_rows: dict[AttemptKey, AttemptRow] = {}
        self.queues = metrics.queues.queues
        """The queues' books by name (the same dict as the QueueBook's)."""

    def record(self, call: Call) -> None:
        """Called once per request, after the response ended (or failed) and its outcome was judged."""
        now = perf_counter()
        route = call.route
        tenant = call.tenant
        if route is not None:
            route_name, queue = route.name, route.queue
        else:
            route_name, queue = "", None
        key = (route_name, tenant.name if tenant is not None else "", call.upstream, call.status, call.outcome)
        row = self.rows.get(key) or self._bind(key)
        row.count[0] += 1
        elapsed = now - call.started  # call.elapsed(), with the clock read once for the queue's books too
        row.duration(elapsed)
        marks = call.marks
        attempts = call.attempts
        dispatched = marks.get("dispatch")
        processing = None
        if dispatched is not None:
            processing = elapsed - dispatched
            (row.processing or self._processing(row))(processing)
            first = marks.get("first_token")
            if first is not None:
                (row.ttft or self._ttft(row))(first - dispatched)
        ttfb = marks.get("upstream_headers")
        if ttfb is not None and not (attempts and attempts[-1].shared):
            (row.ttfb or self._ttfb(row))(ttfb)
        if queue is not None:
            (self.queues.get(queue.name) or self._queue(queue.name)).finished(now, call, processing)
        if row.failed or call.events_relayed:  # an error or a client that left is never an "ok"
            self._rare(call, row)
        for attempt in attempts:
            if not attempt.shared:  # else another caller of the same merged call counts it
                akey = (attempt.upstream, attempt.status, attempt.error)
                found = self.attempt_rows.get(akey) or self._bind_attempt(akey)
                found.count[0] += 1
                found.latency(attempt.duration)

    def _rare(self, call: Call, row: RequestRow) -> None:
        """An error, a client that left, a stream's events: not on every request."""
        metrics = self.metrics
        if call.error is not None:
            metrics.errors.inc((call.error,))
            if call.outcome == "rejected":  # a refusal always sets `error`
                metrics.refusals.add(call)
        if call.client_gone:
            metrics.client_gone.inc(row.route)
        if call.events_relayed:
            metrics.stream_events.inc(row.route, call.events_relayed)

    def _bind(self, key: RequestKey) -> RequestRow:
        route, tenant, upstream, status, outcome = key
        metrics = self.metrics
        count = metrics.requests.cell((route, tenant, upstream, status_label(status), outcome))
        row = self.rows[key] = RequestRow(
            count, metrics.duration.buckets((route,)), (route,), (upstream,), outcome != "ok",
        )
        if not upstream:
            row.ttfb = _discard  # a request that reached no upstream has no TTFB series
        return row

    def _processing(self, row: RequestRow) -> Observe:
        row.processing = self.metrics.processing.buckets(row.route).add
        return row.processing

    def _ttft(self, row: RequestRow) -> Observe:
        row.ttft = self.metrics.ttft.buckets(row.route).add
        return row.ttft

    def _ttfb(self, row: RequestRow) -> Observe:
        row.ttfb = self.metrics.ttfb.buckets(row.upstream).add
        return row.ttfb

    def _queue(self, name: str) -> QueueStats:
        return self.metrics.queues.stats(name)

    def _bind_attempt(self, key: AttemptKey) -> AttemptRow:
        deployment, code, error = key
        status = status_label(code) if code else error or "error"
        metrics = self.metrics
        row = self.attempt_rows[key] = AttemptRow(
            metrics.upstream_requests.cell((deployment, status)), metrics.upstream_latency.buckets((deployment,)),
        )
        return row


def _discard(value: float) -> None:
    """The observer of a series a row never feeds."""
