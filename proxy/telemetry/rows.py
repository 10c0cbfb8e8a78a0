"""Recording a finished request into the per-request metrics (telemetry/hot.py) and its queue's books.

What a request feeds depends on its labels only, so it is bound once per label tuple (a row: the requests
counter's cell and the histogram series of its route and upstream) and then found with one dict lookup by a
tuple; recording is one addition into the counter's cell and an append of each histogram value to its series'
pending values. Folding is deferred to whoever reads (a scrape, the wall screen, the admin views: Prometheus
reads every 15-60 s) and runs in C there; the attempts of a request are appended as they are and counted at
the fold too. So that memory stays bounded between reads, everything pending is folded every `FOLD_EVERY`
requests. What a reader sees is what `HotCounter.inc`/`HotHistogram.observe` per request would give, to
the last bit of every sum (tests/test_metric_rows.py).

A series that only some requests feed (processing, TTFT, TTFB) is bound on its first value: the exposition
lists a series from its first observation on, as before.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from itertools import compress, groupby
from operator import attrgetter, itemgetter, not_
from time import perf_counter
from typing import TYPE_CHECKING

from proxy.call import Attempt, Call
from proxy.telemetry.hot import FOLD_EVERY, Buckets

if TYPE_CHECKING:
    from proxy.telemetry.metrics import Metrics
    from proxy.telemetry.queues import QueueStats

_STATUS_TEXT = {code: str(code) for code in range(100, 600)}

RequestKey = tuple[str, str, str, int, str]
"""route, tenant, upstream, status, outcome: the requests counter's labels, with the status as sent."""
AttemptKey = tuple[str, int, "str | None"]
"""deployment, status (0: no response), error: what an attempt's labels are made of."""


_SHARED = attrgetter("shared")
_ATTEMPT_KEY = attrgetter("upstream", "status", "error")
_UPSTREAM = attrgetter("upstream")
_DURATION = attrgetter("duration")
_FIRST = itemgetter(0)
_SECOND = itemgetter(1)


def status_label(status: int) -> str:
    return _STATUS_TEXT.get(status) or str(status)


Observe = Callable[[float], None]
"""A histogram series' bound `pending.append` (telemetry/hot.py's Buckets): how a row adds a value."""


class RequestRow:
    """The series one request with these labels feeds: its requests cell and its histograms' pending values'
    `append` (telemetry/hot.py's Buckets folds them when read)."""

    __slots__ = ("count", "duration", "processing", "ttft", "ttfb", "route", "upstream", "failed")

    def __init__(self, count: list[float], duration: Buckets, route: tuple[str], upstream: tuple[str],
                 failed: bool) -> None:
        self.count = count
        self.duration: Observe = duration.pending.append
        self.processing: Observe | None = None
        self.ttft: Observe | None = None
        self.ttfb: Observe | None = None
        self.route = route
        self.upstream = upstream
        self.failed = failed
        """Any outcome but ok (judge gives an error or a client that left no other)."""


class Recorder:
    """Feeds the hot families from a finished `Call` (`Metrics.record`)."""

    __slots__ = ("metrics", "rows", "attempt_rows", "attempts", "queues", "histograms", "left")

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.rows: dict[RequestKey, RequestRow] = {}
        self.attempt_rows: dict[AttemptKey, list[float]] = {}
        """The upstream requests counter's cell by attempt key."""
        self.attempts: list[Attempt] = []
        """Attempts of the requests recorded since the last fold, in order (counted in `fold`)."""
        self.queues = metrics.queues.queues
        """The queues' books by name (the same dict as the QueueBook's)."""
        self.histograms = (metrics.duration, metrics.processing, metrics.ttfb, metrics.ttft, metrics.upstream_latency)
        self.left = FOLD_EVERY
        """Requests until every pending value is folded in (what bounds them between reads)."""

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
        self.attempts.extend(attempts)
        self.left -= 1
        if not self.left:
            self.fold()

    def fold(self) -> None:
        """Fold every series' pending values in (each reader folds what it reads itself)."""
        self.left = FOLD_EVERY
        if self.attempts:
            self._fold_attempts()
        for histogram in self.histograms:
            histogram.fold()

    def _fold_attempts(self) -> None:
        """Count the pending attempts: per attempt only C; Python per attempt key and per deployment. The
        series are created in the order their first attempt came, as counting one by one would."""
        attempts = list(compress(self.attempts, map(not_, map(_SHARED, self.attempts))))
        self.attempts.clear()  # a shared attempt: another caller of the same merged call counts it
        rows = self.attempt_rows
        for key, n in Counter(map(_ATTEMPT_KEY, attempts)).items():
            (rows.get(key) or self._bind_attempt(key))[0] += n
        latency = self.metrics.upstream_latency
        # sorted() is stable: each deployment's durations stay in the order they came (so do their sums)
        by_deployment = sorted(zip(map(_UPSTREAM, attempts), map(_DURATION, attempts), strict=True), key=_FIRST)
        for deployment, group in groupby(by_deployment, key=_FIRST):
            latency.buckets((deployment,)).pending.extend(map(_SECOND, group))

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
        row.processing = self.metrics.processing.buckets(row.route).pending.append
        return row.processing

    def _ttft(self, row: RequestRow) -> Observe:
        row.ttft = self.metrics.ttft.buckets(row.route).pending.append
        return row.ttft

    def _ttfb(self, row: RequestRow) -> Observe:
        row.ttfb = self.metrics.ttfb.buckets(row.upstream).pending.append
        return row.ttfb

    def _queue(self, name: str) -> QueueStats:
        return self.metrics.queues.stats(name)

    def _bind_attempt(self, key: AttemptKey) -> list[float]:
        deployment, code, error = key
        status = status_label(code) if code else error or "error"
        metrics = self.metrics
        metrics.upstream_latency.buckets((deployment,))  # the latency series, in the order they came
        cell = self.attempt_rows[key] = metrics.upstream_requests.cell((deployment, status))
        return cell


def _discard(value: float) -> None:
    """The observer of a series a row never feeds."""
