"""`QueueStats` keeps finished requests pending and folds them in when read (proxy/telemetry/queues.py). Over
generated sequences of finished requests and reads, every reader must see what counting each request as it
finished gives: `Sequential` below is that per-request counting (the books as they were before the fold)."""

from __future__ import annotations

import time
from collections import deque
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.call import Attempt, Call
from proxy.policy.compile import compile_plan
from proxy.policy.load import load_policy
from proxy.telemetry import queues
from proxy.telemetry.outcome import OUTCOMES
from proxy.telemetry.queues import RATE_SPAN, RECENT, WINDOW, QueueStats


class Sequential:
    """The reference: every request counted as it finishes (one addition per counter, the rate ring ticked
    per request)."""

    def __init__(self) -> None:
        self.outcomes: dict[str, int] = dict.fromkeys(OUTCOMES, 0)
        self.reasons: dict[str, int] = {}
        self.processed = 0
        self.ring: deque[tuple[float, float, float | None]] = deque(maxlen=WINDOW)
        self.second, self.until, self.slot = 0, 1.0, 0
        self.requests, self.tokens = [0] * RATE_SPAN, [0] * RATE_SPAN

    def finished(self, now: float, call: Call, processing: float | None) -> None:
        self.outcomes[call.outcome] = self.outcomes.get(call.outcome, 0) + 1
        if call.outcome == "rejected":
            reason = call.reason or "unknown"
            self.reasons[reason] = self.reasons.get(reason, 0) + 1
        self.ring.append((now, call.queue_wait, processing))
        if processing is not None:
            self.processed += 1
        if call.attempts:
            if now >= self.until:
                self.tick(int(now))
            self.requests[self.slot] += 1
            if call.usage:
                self.tokens[self.slot] += queues._tokens(call.usage)

    def tick(self, second: int) -> None:
        for s in range(max(self.second + 1, second - RATE_SPAN + 1), second + 1):
            self.requests[s % RATE_SPAN] = 0
            self.tokens[s % RATE_SPAN] = 0
        self.second, self.until, self.slot = second, second + 1.0, second % RATE_SPAN

    def read(self, now: float) -> tuple[Any, ...]:
        if now >= self.until:
            self.tick(int(now))
        since = now - RECENT
        waits = sorted(wait for end, wait, _ in self.ring if end >= since)
        times = sorted(took for end, _, took in self.ring if end >= since and took is not None)
        o = self.outcomes
        totals = {
            "finished": sum(o.values()), "processed": self.processed, "succeeded": o["ok"],
            "failed": o["upstream_error"] + o["proxy_error"], "failed_upstream": o["upstream_error"],
            "failed_proxy": o["proxy_error"], "timed_out": o["timeout"], "cancelled": o["cancelled"],
            "rejected": o["rejected"], "rejected_by_reason": dict(sorted(self.reasons.items())),
        }
        return (sum(self.requests), sum(self.tokens)), (waits, times), totals


def read(stats: QueueStats, now: float) -> tuple[Any, ...]:
    return stats.rate(now), stats.recent(now), stats.totals()


@pytest.fixture
def call(tmp_path: Path) -> Call:
    (tmp_path / "p.yaml").write_text(
        "upstreams:\n  up: {provider: openai, base_url: 'http://127.0.0.1:9/v1'}\n"
        "routes:\n  - {name: chat, upstream: up}\n"
    )
    plan = compile_plan(load_policy(tmp_path))
    return Call(request_id="r", plan=plan, method="POST", path="/v1/chat/completions", protocol="openai",
                started=time.perf_counter())


usages = st.sampled_from([None, {}, {"total_tokens": 30}, {"prompt_tokens": 5, "completion_tokens": 7},
                          {"input_tokens": 3, "output_tokens": 4, "cache_read_input_tokens": 2},
                          {"total_tokens": None, "prompt_tokens": 3}, {"total_tokens": True},
                          {"total_tokens": 2.5, "input_tokens": 4, "output_tokens": "9"}])
steps = st.fixed_dictionaries({
    "after": st.sampled_from([0.0, 0.001, 0.3, 0.5, 0.999, 1.0, 1.0, 2.5, 59.0, 60.0, 61.0, 301.0]),
    "read": st.booleans(),
    "outcome": st.sampled_from(OUTCOMES),
    "reason": st.sampled_from([None, "queue_full", "rate_limit", "queue_timeout"]),
    "sent": st.booleans(), "usage": usages,
    "processing": st.none() | st.floats(0, 30, allow_nan=False), "wait": st.floats(0, 30, allow_nan=False),
})


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(steps, max_size=60), st.sampled_from([0.0, 0.5, 999.75, 1000.0]) | st.floats(0, 2000))
def test_folded_books_read_what_counting_each_request_gives(call: Call, generated: list[dict[str, Any]],
                                                             start: float) -> None:
    stats, reference = QueueStats(), Sequential()
    now = start
    for step in generated:
        now += step["after"]
        if step["read"]:  # a reader between two requests: folds what is pending, then ticks to its own now
            assert read(stats, now) == reference.read(now)
            continue
        call.outcome, call.reason = step["outcome"], step["reason"]
        call.attempts = [Attempt("up", 200, 0.01)] if step["sent"] else []
        call.usage, call.queue_wait = step["usage"], step["wait"]
        stats.finished(now, call, step["processing"])
        reference.finished(now, call, step["processing"])
    assert read(stats, now) == reference.read(now)
    assert read(stats, now + 30.5) == reference.read(now + 30.5)


def test_a_full_window_folded_at_once_keeps_the_newest(call: Call) -> None:
    """More requests pending than the recent window holds: the window keeps the newest, as one by one."""
    stats, reference = QueueStats(), Sequential()
    for i in range(WINDOW * 2 + 3):
        call.outcome, call.reason, call.attempts, call.usage = "ok", None, [Attempt("up", 200, 0.01)], None
        call.queue_wait = i / 1000
        stats.finished(1000.0 + i / 100, call, i / 10)
        reference.finished(1000.0 + i / 100, call, i / 10)
    assert len(stats.pending) == WINDOW * 2 + 3
    assert read(stats, 1100.0) == reference.read(1100.0)
    assert not stats.pending


def test_requests_in_consecutive_seconds_leave_the_rate_window_one_second_apart(call: Call) -> None:
    """A fold holding requests of several seconds moves the rate ring to each second in turn."""
    stats, reference = QueueStats(), Sequential()
    call.outcome, call.reason, call.attempts, call.queue_wait = "ok", None, [Attempt("up", 200, 0.01)], 0.0
    for now, tokens in ((1000.0, 30), (1001.0, 7), (1001.5, 5), (1003.25, 2)):
        call.usage = {"total_tokens": tokens}
        stats.finished(now, call, 0.1)
        reference.finished(now, call, 0.1)
    for now, rate in ((1059.0, (4, 44)), (1060.0, (3, 14)), (1061.0, (1, 2)), (1062.0, (1, 2)), (1063.5, (0, 0))):
        assert read(stats, now) == reference.read(now)
        assert stats.rate(now) == rate
