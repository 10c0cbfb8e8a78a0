"""The wall screen's snapshot builder (proxy/ops/live.py) over plain data, and the ring of recent refusals the
request metrics feed (proxy/telemetry/outcome.py): no servers."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from proxy.call import Call
from proxy.errors import InvalidRequest, QueueFull
from proxy.ops import live
from proxy.policy.plan import Plan
from proxy.telemetry.metrics import Metrics
from proxy.telemetry.outcome import RECENT_REFUSALS, judge

BOUNDS = (0.1, 0.2, 0.4)


def counters(at: float, outcomes: dict[tuple[str, str], float], ttft: dict[str, Any] | None = None) -> live.Counters:
    return live.Counters(at, outcomes, ttft or {})


# --- TTFT percentiles from the histogram's buckets -----------------------------------------------------------


@pytest.mark.parametrize(
    ("q", "counts", "expected"),
    [
        (0.5, (0, 2, 2, 0), 0.2),  # rank 2 of 4: the top of the (0.1, 0.2] bucket
        (0.95, (0, 2, 2, 0), 0.38),  # rank 3.8: 1.8 of the 2 in (0.2, 0.4]
        (0.5, (4, 0, 0, 0), 0.05),  # within the first bucket, from 0
        (0.95, (0, 0, 1, 3), 0.4),  # in +Inf: the highest finite bound, as histogram_quantile
    ],
)
def test_quantile_interpolates_within_the_bucket(q: float, counts: tuple[int, ...], expected: float) -> None:
    assert live.quantile(q, counts, BOUNDS) == pytest.approx(expected)


def test_ttft_summary_in_milliseconds() -> None:
    assert live.ttft_summary((0, 2, 2, 0), 1.2, BOUNDS) == {"avg": 300.0, "p50": 200.0, "p95": 380.0, "samples": 4}
    assert live.ttft_summary((0, 0, 0, 0), 0.0, BOUNDS)["samples"] == 0


# --- traffic between two readings -----------------------------------------------------------------------------


def test_traffic_is_the_difference_between_two_readings() -> None:
    base = counters(100.0, {("chat", "ok"): 4, ("chat", "rejected"): 1}, {"chat": ((1, 0, 0, 0), 0.05)})
    now = counters(
        160.0,
        {("chat", "ok"): 12, ("chat", "upstream_error"): 1, ("chat", "timeout"): 1, ("chat", "rejected"): 3,
         ("chat", "cancelled"): 1, ("", "rejected"): 2},
        {"chat": ((1, 2, 2, 0), 1.25)},
    )
    out = live.traffic(now, base, started=0.0, bounds=BOUNDS)
    assert out["window_s"] == 60 and out["since_start"] is False
    nothing, chat = out["routes"]
    assert nothing["route"] is None and nothing["requests"] == 2 and nothing["rejection_rate"] == 1.0
    assert chat["route"] == "chat" and chat["requests"] == 13
    assert chat["outcomes"] == {"cancelled": 1, "ok": 8, "rejected": 2, "timeout": 1, "upstream_error": 1}
    assert chat["error_rate"] == round(2 / 13, 3)  # upstream_error and timeout; not refusals, not cancellations
    assert chat["rejection_rate"] == round(2 / 13, 3)
    assert chat["per_s"] == round(13 / 60, 2)
    assert chat["ttft_ms"] == {"avg": 300.0, "p50": 200.0, "p95": 380.0, "samples": 4}  # the 4 new ones only


def test_the_first_reading_counts_since_start() -> None:
    now = counters(130.0, {("chat", "ok"): 3}, {"chat": ((3, 0, 0, 0), 0.15)})
    out = live.traffic(now, None, started=100.0, bounds=BOUNDS)
    assert out["since_start"] is True and out["window_s"] == 30
    assert out["routes"][0]["requests"] == 3 and out["routes"][0]["ttft_ms"]["samples"] == 3


def test_the_window_keeps_the_last_minute_of_readings() -> None:
    window = live.Window(span=60.0)
    bases = [window.base(counters(t, {})) for t in (0.0, 30.0, 61.0, 91.0, 200.0)]
    assert [b.at if b is not None else None for b in bases] == [None, None, 0.0, 30.0, 91.0]
    assert len(window.readings) == 2  # bounded: older readings are dropped


# --- queues, limits, the whole snapshot -----------------------------------------------------------------------


def queue_summary(**over: Any) -> dict[str, Any]:
    """A queue as GET /admin/queues reports it (the fields the dashboard reads)."""
    base: dict[str, Any] = {
        "name": "chat", "slots": 2, "active": 2, "utilisation": 1.0, "paused": False, "waiting": 5,
        "waiting_by_class": {"interactive": 2, "batch": 3},
        "waiting_by_tenant": {"interactive": {"alpha": 2}, "batch": {"zeta": 1, "beta": 2}},
        "oldest_wait_ms": 1500.0,
        "wait_ms": {"avg": 50.0, "p50": 40.0, "p95": 200.0, "samples": 9},
        "processing_ms": {"avg": 80.0, "p50": 70.0, "p95": 150.0, "samples": 9},
        "estimated_wait_s": {"interactive": 1.5, "batch": None},
        "totals": {"finished": 9, "rejected": 1},
        "rate": {"window_s": 60, "requests": 8, "tokens": 100, "requests_limit": None, "tokens_limit": None},
        "max_waiting": 50,
    }
    return base | over


def test_queue_row_lists_classes_in_order_with_their_tenants() -> None:
    row = live.queue_row(queue_summary())
    assert (row["name"], row["active"], row["slots"], row["waiting"], row["paused"]) == ("chat", 2, 2, 5, False)
    assert (row["wait_p50_ms"], row["wait_p95_ms"], row["finished"], row["rejected"]) == (40.0, 200.0, 9, 1)
    assert row["classes"] == [
        {"class": "interactive", "waiting": 2, "eta_s": 1.5, "tenants": [{"tenant": "alpha", "waiting": 2}]},
        {"class": "batch", "waiting": 3, "eta_s": None,
         "tenants": [{"tenant": "beta", "waiting": 2}, {"tenant": "zeta", "waiting": 1}]},
    ]


LIMITS = [
    {"key": "upstream:mock", "scope": "upstream 'mock'", "tenant": None,
     "requests_per_minute": {"limit": 100, "used": 25.0, "remaining": 75, "reset_s": 3.0}},
    {"key": "route:chat/tenant:alpha", "scope": "route", "tenant": "alpha",
     "concurrent": {"limit": 4, "in_use": 4}},
    {"key": "tenant:alpha", "scope": "tenant 'alpha'", "tenant": "alpha",
     "requests_per_minute": {"limit": 60, "used": 6.0, "remaining": 54, "reset_s": 1.0},
     "tokens_per_day": {"limit": 1000, "used": 900.0, "remaining": 100, "reset_s": 60.0}},
    {"key": "route:chat", "scope": "route 'chat'", "tenant": None,
     "requests_per_second": {"limit": 0, "used": 0.0, "remaining": 0, "reset_s": 0.0}},
]


def test_limit_rows_are_used_against_their_maximum_tenants_first() -> None:
    rows = live.limit_rows(LIMITS)
    assert [(r["key"], r["kind"]) for r in rows] == [
        ("tenant:alpha", "tenant"), ("route:chat", "route"), ("route:chat/tenant:alpha", "route_tenant"),
        ("upstream:mock", "upstream"),
    ]
    alpha, chat, alpha_on_chat, mock = rows
    assert [(m["name"], m["used"], m["limit"], m["ratio"]) for m in alpha["meters"]] == [
        ("requests_per_minute", 6.0, 60, 0.1), ("tokens_per_day", 900.0, 1000, 0.9),
    ]
    assert alpha["peak"] == 0.9 and alpha["tenant"] == "alpha"
    assert chat["meters"][0]["ratio"] is None and chat["peak"] is None  # a zero limit has no ratio
    assert alpha_on_chat["meters"] == [{"name": "concurrent", "used": 4, "limit": 4, "ratio": 1.0}]
    assert mock["peak"] == 0.25


def test_snapshot_puts_the_admin_answers_together() -> None:
    inputs = live.Inputs(
        listing={"queues": [queue_summary(paused=True)], "limits": LIMITS},
        upstreams={"deployments": [{"deployment": "mock/gpt", "circuit": "open", "pacing_hold_s": 2.0}],
                   "retry_budgets": {"chat": {"requests": 3, "retries": 1}}},
        health={"status": "degraded", "checks": [
            {"name": "policy", "state": "healthy", "digest": "abc"},
            {"name": "circuit:mock/gpt", "state": "degraded", "circuit": "open"},
        ]},
        counters=counters(50.0, {("chat", "ok"): 5}),
        refusals=[{"reason": "queue_full"}],
        refused_total=7,
        in_flight=3,
        started=0.0,
    )
    snap = live.snapshot(inputs, None, BOUNDS)
    assert snap["status"] == "degraded" and snap["in_flight"] == 3
    assert [c["name"] for c in snap["checks"]] == ["circuit:mock/gpt"]  # only what is not healthy
    assert snap["policy"] == {"name": "policy", "state": "healthy", "digest": "abc"}
    assert snap["queues"][0]["paused"] is True and len(snap["limits"]) == 4
    assert snap["upstreams"][0]["circuit"] == "open" and snap["retry_budgets"]["chat"]["retries"] == 1
    assert snap["traffic"]["routes"][0]["requests"] == 5
    assert snap["refusals"] == {"total": 7, "recent": [{"reason": "queue_full"}]}


# --- the ring of recent refusals -------------------------------------------------------------------------------


@pytest.fixture
def plan(make_plan: Callable[[str], Plan]) -> Plan:
    return make_plan("""
        identify: {mode: api_key}
        upstreams:
          up: {provider: openai, base_url: "http://127.0.0.1:9/v1", api_key: sk-up}
        tenants:
          alpha: {keys: [sk-alpha]}
        routes:
          - {name: chat, upstream: up}
    """)


def finished(plan: Plan, rid: str, error: Exception | None, status: int = 200) -> Call:
    call = Call(request_id=rid, plan=plan, method="POST", path="/v1/chat/completions", protocol="openai",
                started=time.perf_counter())
    call.tenant, call.route, call.model, call.status = plan.tenants["alpha"], plan.routes[0], "gpt-4o", status
    if error is not None:
        assert isinstance(error, QueueFull | InvalidRequest)
        call.status, call.error, call.failure = error.status, error.reason, error
    judge(call)
    return call


def test_metrics_keep_the_latest_refusals_newest_first(plan: Plan) -> None:
    metrics = Metrics()
    metrics.record(finished(plan, "ok-1", None))
    metrics.record(finished(plan, "full-1", QueueFull("the queue is full", retry_after=2.0)))
    metrics.record(finished(plan, "bad-1", InvalidRequest("no model", param="model")))
    metrics.record(finished(plan, "ok-2", None))
    recent = metrics.refusals.recent()
    assert [(r["request_id"], r["reason"], r["status"]) for r in recent] == [
        ("bad-1", "invalid_request_error", 400), ("full-1", "queue_full", 429),
    ]
    assert recent[1]["tenant"] == "alpha" and recent[1]["route"] == "chat" and recent[1]["model"] == "gpt-4o"
    for i in range(RECENT_REFUSALS + 5):
        metrics.record(finished(plan, f"full-{i + 2}", QueueFull("the queue is full", retry_after=2.0)))
    recent = metrics.refusals.recent()
    assert len(recent) == RECENT_REFUSALS and metrics.refusals.total == RECENT_REFUSALS + 7
    assert recent[0]["request_id"] == f"full-{RECENT_REFUSALS + 6}"
