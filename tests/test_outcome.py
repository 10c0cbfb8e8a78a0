"""The outcome judgement and the per-queue books, as pure code: every branch of `judge`, and the windows of
`QueueStats` (the last minute's rate, the last five minutes' times) over an injected clock."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from proxy.call import Attempt, Call
from proxy.errors import (
    CircuitOpen,
    NoRoute,
    ProxyError,
    QueueTimeout,
    RateLimited,
    SlowClient,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from proxy.policy.compile import compile_plan
from proxy.policy.load import load_policy
from proxy.telemetry import queues
from proxy.telemetry.outcome import judge
from proxy.telemetry.queues import QueueStats


@pytest.fixture
def call(tmp_path: Path) -> Call:
    (tmp_path / "p.yaml").write_text(
        "upstreams:\n  up: {provider: openai, base_url: 'http://127.0.0.1:9/v1'}\n"
        "routes:\n  - {name: chat, upstream: up}\n"
    )
    plan = compile_plan(load_policy(tmp_path))
    return Call(request_id="r", plan=plan, method="POST", path="/v1/chat/completions", protocol="openai",
                started=time.perf_counter())


def judged(call: Call, *, status: int = 200, error: str | None = None, failure: ProxyError | None = None,
           gone: bool = False) -> tuple[int, str, str | None]:
    call.status, call.error, call.failure, call.client_gone = status, error, failure, gone
    judge(call)
    return call.status, call.outcome, call.reason


def limited() -> RateLimited:
    error = RateLimited("over the limit")
    error.cause = "token_limit"
    return error


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, (200, "ok", None)),
        ({"status": 503}, (503, "upstream_error", "upstream_503")),
        ({"status": 429}, (429, "upstream_error", "upstream_429")),  # the upstream's own 429, relayed
        ({"error": "upstream_cut"}, (200, "upstream_error", "upstream_cut")),
        ({"failure": UpstreamUnreachable("cut")}, (200, "upstream_error", "upstream_unreachable")),  # mid-stream
        ({"status": 503, "failure": CircuitOpen("open")}, (503, "upstream_error", "circuit_open")),
        ({"status": 504, "failure": UpstreamTimeout("slow")}, (504, "timeout", "upstream_timeout")),
        ({"status": 429, "failure": limited()}, (429, "rejected", "token_limit")),
        ({"failure": QueueTimeout("waited")}, (200, "rejected", "queue_timeout")),  # a queued stream's 200
        ({"status": 404, "failure": NoRoute("no")}, (404, "rejected", "model_not_found")),
        ({"status": 500, "failure": ProxyError("bug")}, (500, "proxy_error", "internal_error")),
        ({"gone": True}, (499, "cancelled", "client_gone")),  # a stream that had answered 200
        ({"status": 0, "gone": True}, (499, "cancelled", "client_gone")),
        ({"failure": UpstreamUnreachable("cut"), "gone": True}, (499, "cancelled", "client_gone")),
        ({"error": "slow_client", "failure": SlowClient("slow"), "gone": True}, (200, "cancelled", "slow_client")),
        ({"status": 0}, (0, "proxy_error", "no_answer")),
    ],
)
def test_judge(call: Call, kwargs: dict[str, object], expected: tuple[int, str, str | None]) -> None:
    assert judged(call, **kwargs) == expected  # type: ignore[arg-type]


def finish(stats: QueueStats, call: Call, now: float, outcome: str, processing: float | None, *, sent: bool = True,
           usage: dict[str, int] | None = None, wait: float = 0.0) -> None:
    call.outcome, call.reason = outcome, "queue_full" if outcome == "rejected" else None
    call.attempts = [Attempt("up", 200, 0.01)] if sent else []
    call.usage, call.queue_wait = usage, wait
    stats.finished(now, call, processing)


def test_queue_stats_rate_covers_the_last_minute(call: Call) -> None:
    stats = QueueStats()
    finish(stats, call, 1000.2, "ok", 0.1, usage={"total_tokens": 30})
    finish(stats, call, 1030.5, "ok", 0.1, usage={"prompt_tokens": 5, "completion_tokens": 7})
    finish(stats, call, 1031.0, "rejected", None, sent=False)  # never sent: not in the rate
    assert stats.rate(1031.0) == (2, 42)
    assert stats.rate(1059.9) == (2, 42)
    assert stats.rate(1060.5) == (1, 12)  # the second at 1000 has left the window
    assert stats.rate(1200.0) == (0, 0)
    assert stats.totals()["rejected_by_reason"] == {"queue_full": 1}


def test_queue_stats_times_cover_the_last_five_minutes_and_the_last_window(call: Call) -> None:
    stats = QueueStats()
    finish(stats, call, 10.0, "ok", 9.0, wait=1.0)  # old by the time it is read
    for i in range(queues.WINDOW + 5):
        finish(stats, call, 400.0 + i / 1000, "ok", 0.5 if i % 2 else 1.5, wait=0.25)
    finish(stats, call, 402.0, "cancelled", None, wait=3.0)  # left while queued: a wait, no processing
    waits, times = stats.recent(402.0)
    assert len(waits) == queues.WINDOW and len(times) == queues.WINDOW - 1
    assert 9.0 not in times and max(waits) == 3.0
    summary = queues.summary(times)
    assert summary["p50"] <= summary["p95"] == 1500.0 and summary["samples"] == queues.WINDOW - 1
    assert queues.summary([]) == {"avg": None, "p50": None, "p95": None, "samples": 0}
    totals = stats.totals()
    assert totals["finished"] == queues.WINDOW + 7 and totals["processed"] == queues.WINDOW + 6
    assert totals["succeeded"] == queues.WINDOW + 6 and totals["cancelled"] == 1
