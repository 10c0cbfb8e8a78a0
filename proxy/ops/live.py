"""The wall screen's live snapshot (`GET /admin/live`, drawn by the dashboard page): queues by class and tenant,
limits in use against their maximum, upstream circuits and pacing, traffic (TTFT, error and rejection rates)
and the latest refusals.

Nothing is computed twice: the queues and limits are `GET /admin/queues`'s answer (proxy/ops/queues.py), the
circuits `GET /admin/upstreams`'s, the overall state `/healthz/details`' (proxy/ops/health.py), and traffic is
read off the request metrics' own counters and TTFT histogram, as the difference between two readings (the
last minute, once a stream has been open that long; since start before). `gather` reads the runtime;
`snapshot` and everything under it are pure over what was read.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

from proxy.ops import health
from proxy.ops import queues as queue_status
from proxy.runtime import Runtime
from proxy.telemetry.metrics import Metrics

WINDOW_S = 60.0
"""Traffic rates and TTFT percentiles cover the last minute."""
ERRORS = ("upstream_error", "timeout", "proxy_error")
"""Outcomes counted as errors: the client asked and got a failure (a refusal or a client that left is not one)."""
_KINDS = ("tenant", "route", "route_tenant", "upstream")


@dataclass(frozen=True, slots=True)
class Counters:
    """One reading of the request metrics: counts by (route, outcome), and the TTFT histogram's buckets by
    route (one count per bound, then +Inf; not cumulative) with their sum."""

    at: float
    outcomes: dict[tuple[str, str], float]
    ttft: dict[str, tuple[tuple[int, ...], float]]


def read_counters(metrics: Metrics, at: float) -> Counters:
    outcomes: dict[tuple[str, str], float] = {}
    for (route, _tenant, _upstream, _status, outcome), value in metrics.requests.values.items():
        outcomes[(route, outcome)] = outcomes.get((route, outcome), 0.0) + value
    ttft = {key[0]: (tuple(series.counts), series.total) for key, series in metrics.ttft.series.items()}
    return Counters(at, outcomes, ttft)


class Window:
    """Readings of the counters (from every live stream of the admin app), oldest first, each kept until a
    newer one is `span` old too: the base a new reading is compared with."""

    __slots__ = ("readings", "span")

    def __init__(self, span: float = WINDOW_S, size: int = 1024) -> None:
        self.readings: deque[Counters] = deque(maxlen=size)
        self.span = span

    def base(self, now: Counters) -> Counters | None:
        """The newest reading at least `span` before `now` (None while there is none: traffic is then counted
        since start); then `now` is kept."""
        readings = self.readings
        while len(readings) > 1 and now.at - readings[1].at >= self.span:
            readings.popleft()
        base = readings[0] if readings and now.at - readings[0].at >= self.span else None
        readings.append(now)
        return base


@dataclass(frozen=True, slots=True)
class Inputs:
    """Everything one snapshot is built from, as the admin API's own builders answer it."""

    listing: dict[str, Any]
    """`GET /admin/queues`: queues and limits."""
    upstreams: dict[str, Any]
    """`GET /admin/upstreams`: deployments (circuit, pacing) and retry budgets."""
    health: dict[str, Any]
    """`GET /healthz/details`: the overall state and each check."""
    counters: Counters
    refusals: list[dict[str, Any]]
    """The latest refusals, newest first (proxy/telemetry/outcome.py)."""
    refused_total: int
    in_flight: int
    started: float
    """When the process started (wall clock): the base of the first reading."""


async def gather(runtime: Runtime, at: float) -> Inputs:
    """Read everything once; `at` is the wall clock of the reading."""
    metrics = runtime.metrics
    counters = read_counters(metrics, at)  # before the one await (a remote limiter store), at `at`
    listing = await queue_status.listing(runtime)
    return Inputs(
        listing=listing,
        upstreams=runtime.upstreams.snapshot(),
        health=health.report(runtime),
        counters=counters,
        refusals=metrics.refusals.recent(),
        refused_total=metrics.refusals.total,
        in_flight=runtime.in_flight,
        started=runtime.started_wall,
    )


def snapshot(inputs: Inputs, base: Counters | None, bounds: tuple[float, ...]) -> dict[str, Any]:
    """The page's data: `base` is the earlier reading traffic is measured from (None: since start); `bounds`
    the TTFT histogram's upper bounds."""
    return {
        "status": inputs.health["status"],
        "checks": [c for c in inputs.health["checks"] if c["state"] != "healthy"],
        "policy": next((c for c in inputs.health["checks"] if c["name"] == "policy"), None),
        "in_flight": inputs.in_flight,
        "queues": [queue_row(q) for q in inputs.listing["queues"]],
        "limits": limit_rows(inputs.listing["limits"]),
        "upstreams": inputs.upstreams["deployments"],
        "retry_budgets": inputs.upstreams["retry_budgets"],
        "traffic": traffic(inputs.counters, base, inputs.started, bounds),
        "refusals": {"total": inputs.refused_total, "recent": inputs.refusals},
    }


def queue_row(queue: dict[str, Any]) -> dict[str, Any]:
    """One queue: its state, and a line per priority class (highest first) with that class's tenants."""
    tenants = queue["waiting_by_tenant"]
    classes = [
        {
            "class": name,
            "waiting": waiting,
            "eta_s": queue["estimated_wait_s"].get(name),
            "tenants": [{"tenant": t, "waiting": n} for t, n in sorted(tenants.get(name, {}).items())],
        }
        for name, waiting in queue["waiting_by_class"].items()
    ]
    wait = queue["wait_ms"]
    totals = queue["totals"]
    return {
        "name": queue["name"],
        "paused": queue["paused"],
        "active": queue["active"],
        "slots": queue["slots"],
        "utilisation": queue["utilisation"],
        "waiting": queue["waiting"],
        "max_waiting": queue["max_waiting"],
        "oldest_wait_ms": queue["oldest_wait_ms"],
        "wait_p50_ms": wait["p50"],
        "wait_p95_ms": wait["p95"],
        "processing_p95_ms": queue["processing_ms"]["p95"],
        "classes": classes,
        "finished": totals["finished"],
        "rejected": totals["rejected"],
        "rate": queue["rate"],
    }


def limit_kind(key: str) -> str:
    """`tenant:a` → tenant, `route:r` → route, `route:r/tenant:a` → route_tenant, `upstream:u` → upstream."""
    if "/tenant:" in key:
        return "route_tenant"
    return key.partition(":")[0]


def limit_rows(limits: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each limit key with every window it has (requests_per_minute, tokens_per_minute, ...) and its
    concurrency, each as used against its maximum; tenants first, then routes, then upstreams."""
    rows = []
    for item in limits:
        meters = [  # no reset countdown: it would make every snapshot differ from the last
            {"name": name, "used": v["used"], "limit": v["limit"], "ratio": _ratio(v["used"], v["limit"])}
            for name, v in item.items()
            if isinstance(v, dict) and name != "concurrent"
        ]
        concurrent = item.get("concurrent")
        if concurrent is not None:
            used, limit = concurrent["in_use"], concurrent["limit"]
            meters.append({"name": "concurrent", "used": used, "limit": limit, "ratio": _ratio(used, limit)})
        kind = limit_kind(item["key"])
        rows.append({"key": item["key"], "kind": kind, "tenant": item["tenant"], "meters": meters,
                     "peak": max((m["ratio"] for m in meters if m["ratio"] is not None), default=None)})
    order = {kind: i for i, kind in enumerate(_KINDS)}
    rows.sort(key=lambda r: (order.get(r["kind"], len(order)), r["key"]))
    return rows


def _ratio(used: float, limit: float) -> float | None:
    return round(used / limit, 3) if limit > 0 else None


def traffic(now: Counters, base: Counters | None, started: float, bounds: tuple[float, ...]) -> dict[str, Any]:
    """Per route, between `base` and `now`: requests, the rate per second, counts by outcome, the error and
    rejection rates, and TTFT (from dispatch) p50/p95/average. `window_s` is whole seconds, so that readings a
    few milliseconds apart in an idle minute give the same answer."""
    since = base.at if base is not None else started
    window = max(now.at - since, 1e-9)
    before = base.outcomes if base is not None else {}
    routes: dict[str, dict[str, float]] = {}
    for (route, outcome), value in now.outcomes.items():
        delta = value - before.get((route, outcome), 0.0)
        routes.setdefault(route, {})[outcome] = delta
    rows = [_route_row(route, routes[route], _ttft_delta(now, base, route), window, bounds) for route in sorted(routes)]
    return {"window_s": int(window), "since_start": base is None, "routes": rows}


def _route_row(route: str, deltas: dict[str, float], ttft: tuple[tuple[int, ...], float] | None, window: float,
               bounds: tuple[float, ...]) -> dict[str, Any]:
    counts = {k: int(v) for k, v in deltas.items() if v}
    total = sum(counts.values())
    errors = sum(counts.get(o, 0) for o in ERRORS)
    return {
        "route": route or None,
        "requests": total,
        "per_s": round(total / window, 2),
        "outcomes": dict(sorted(counts.items())),
        "error_rate": round(errors / total, 3) if total else None,
        "rejection_rate": round(counts.get("rejected", 0) / total, 3) if total else None,
        "ttft_ms": ttft_summary(*ttft, bounds) if ttft is not None else ttft_summary((), 0.0, bounds),
    }


def _ttft_delta(now: Counters, base: Counters | None, route: str) -> tuple[tuple[int, ...], float] | None:
    current = now.ttft.get(route)
    if current is None:
        return None
    earlier = base.ttft.get(route) if base is not None else None
    if earlier is None:
        return current
    counts = tuple(a - b for a, b in zip(current[0], earlier[0], strict=True))
    return counts, current[1] - earlier[1]


def ttft_summary(counts: tuple[int, ...], total: float, bounds: tuple[float, ...]) -> dict[str, Any]:
    """Milliseconds: the average, and p50/p95 estimated from the buckets as Prometheus' histogram_quantile
    does (linear within the bucket; the highest finite bound for the +Inf bucket)."""
    n = sum(counts)
    if n == 0:
        return {"avg": None, "p50": None, "p95": None, "samples": 0}
    return {
        "avg": round(total / n * 1000, 1),
        "p50": _ms(quantile(0.5, counts, bounds)),
        "p95": _ms(quantile(0.95, counts, bounds)),
        "samples": n,
    }


def quantile(q: float, counts: tuple[int, ...], bounds: tuple[float, ...]) -> float:
    """The q-quantile of a histogram with non-cumulative `counts` (one per bound, then +Inf)."""
    rank = q * sum(counts)
    seen = 0
    for i, count in enumerate(counts):
        if count and seen + count >= rank:
            if i >= len(bounds):
                return bounds[-1]
            lower = bounds[i - 1] if i > 0 else 0.0
            return lower + (bounds[i] - lower) * (rank - seen) / count
        seen += count
    return bounds[-1]


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)
