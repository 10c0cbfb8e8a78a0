"""A queue's status for `GET /admin/queues` (seed 004): who waits, how the queue did (totals by outcome),
how long requests waited and took, how fast traffic goes against the tightest limit it shares, how full the
slots are, and how long a new arrival may wait. Read-only over the gate, its stats and the plan.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

from proxy.admission.limits import Usage
from proxy.flow.gate import Queue
from proxy.policy.plan import Limit, Plan
from proxy.runtime import Runtime
from proxy.telemetry import queues as stats
from proxy.telemetry.queues import QueueStats


async def listing(runtime: Runtime) -> dict[str, Any]:
    """`GET /admin/queues`: every queue of the serving plan (and any a reload removed that still has state), and
    every limit key's usage. The dashboard's live snapshot (proxy/ops/live.py) is built from the same answer."""
    plan = runtime.plans.current
    scheduler = runtime.scheduler
    queues = [scheduler.queue(spec, plan.priorities) for spec in plan.queues.values()]
    queues += [q for name, q in scheduler.queues.items() if name not in plan.queues]  # gone from the plan
    now, perf_now = scheduler.clock(), time.perf_counter()
    usage = await runtime.admission.store.remaining()
    book = runtime.metrics.queues
    return {
        "queues": [summary(queue, book, plan, now, perf_now) for queue in queues],
        "limits": [usage_json(u) for u in sorted(usage, key=lambda u: u.key)],
    }


def usage_json(usage: Usage) -> dict[str, Any]:
    """One limit key: each window's limit, use, remaining and reset, and concurrency in use."""
    out: dict[str, Any] = {"key": usage.key, "scope": usage.scope, "tenant": usage.tenant or None}
    for meter in usage.windows:  # one entry per window: requests_per_minute, tokens_per_day, ...
        out[meter.name] = {
            "limit": meter.limit,
            "used": round(meter.used, 1),
            "remaining": meter.remaining,
            "reset_s": round(meter.reset, 3),
        }
    if usage.concurrent is not None:
        out["concurrent"] = {"limit": usage.concurrent[0], "in_use": usage.concurrent[1]}
    return out


def summary(queue: Queue, book: stats.QueueBook, plan: Plan, now: float, perf_now: float) -> dict[str, Any]:
    """`now`: the queue's clock (waits in line); `perf_now`: the stats' clock (finished requests)."""
    spec = queue.spec
    by_class: dict[str, int] = dict.fromkeys(queue.classes, 0)
    by_tenant: dict[str, dict[str, int]] = {}
    for (cls, tenant), count in queue.board.counts().items():
        by_class[queue.classes[cls]] += count
        by_tenant.setdefault(queue.classes[cls], {})[tenant] = count
    oldest = min((t.enqueued for t in queue.board.tickets()), default=None)
    waits = sorted(queue.waits)
    mine = book.get(spec.name)
    _, times = mine.recent(perf_now)
    slots = spec.concurrency
    return {
        "name": spec.name,
        "slots": slots,
        "active": queue.active,
        "utilisation": round(queue.active / slots, 3) if slots else None,
        "paused": queue.paused,
        "waiting": len(queue.board),
        "waiting_by_class": by_class,
        "waiting_by_tenant": by_tenant,
        "oldest_wait_ms": round((now - oldest) * 1000, 1) if oldest is not None else None,
        "wait_ms": _waits(waits),
        "processing_ms": stats.summary(times),
        "estimated_wait_s": {
            name: _rounded(queue.eta_at_back(cls)) for cls, name in enumerate(queue.classes)
        },
        "totals": mine.totals(),
        "rate": rate(mine, plan, spec.name, perf_now),
        "admitted": queue.admitted,
        "rejected": dict(queue.rejected),
        "left_while_waiting": queue.left,
        "max_waiting": spec.max_waiting,
        "max_wait_s": spec.max_wait,
        "ageing_s": spec.ageing,
    }


def _waits(waits: list[float]) -> dict[str, Any]:
    """The last waits that ended (admitted, timed out, shed, cleared or left; 0 for one admitted at once)."""
    if not waits:
        return {"avg": None, "p50": None, "p95": None, "samples": 0}
    n = len(waits)
    return {
        "avg": round(sum(waits) / n * 1000, 1),
        "p50": round(statistics.median(waits) * 1000, 1),
        "p95": round(waits[min(n - 1, int(n * 0.95))] * 1000, 1),
        "samples": n,
    }


def _rounded(seconds: float | None) -> float | None:
    return round(seconds, 1) if seconds is not None and math.isfinite(seconds) else None


def rate(mine: QueueStats, plan: Plan, queue: str, now: float) -> dict[str, Any]:
    """Requests and tokens sent upstream in the last minute, each against the tightest per-minute maximum
    among the limits every request of the queue's routes shares (route-wide and upstream limits; a
    tenant's own limits are per tenant, see `limits`)."""
    requests, tokens = mine.rate(now)
    shared = shared_limits(plan, queue)
    return {
        "window_s": stats.RATE_SPAN,
        "requests": requests,
        "tokens": tokens,
        "requests_limit": _binding(shared, "requests", requests),
        "tokens_limit": _binding(shared, "tokens", tokens),
    }


def shared_limits(plan: Plan, queue: str) -> list[Limit]:
    found: dict[str, Limit] = {}
    for route in plan.routes:
        if route.queue is None or route.queue.name != queue:
            continue
        if route.limit is not None:
            found[route.limit.key] = route.limit
        for deployment in route.deployments:
            if deployment.limit is not None:
                found[deployment.limit.key] = deployment.limit
    return list(found.values())


def _binding(limits: list[Limit], dimension: str, used: int) -> dict[str, Any] | None:
    """The tightest rate of `dimension` among `limits`, as a per-minute maximum, and how much of it `used`
    (the last minute's count) is."""
    best: tuple[float, str] | None = None
    for limit in limits:
        for r in limit.spec.rates():
            if r.dimension != dimension:
                continue
            per_minute = r.limit * 60 / r.seconds
            if best is None or per_minute < best[0]:
                best = (per_minute, f"{limit.key}/{r.name}")
    if best is None:
        return None
    per_minute, name = best
    return {
        "limit": name,
        "max_per_minute": round(per_minute, 3),
        "ratio": round(used / per_minute, 3) if per_minute > 0 else None,
    }
