"""Per-queue totals by outcome, recent wait and processing times, and the recent request and token rate, for
`GET /admin/queues` (seed 004). Fed once per finished request whose route has a queue.

Per request this is a few integer additions and one tuple appended to a bounded deque: nothing is sorted.
Averages and percentiles are computed when the admin API asks, over the last `WINDOW` requests that
finished within the last `RECENT` seconds. The rate is two rings of `RATE_SPAN` one-second buckets
(requests sent upstream, tokens their `usage` reported).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from typing import Any

from proxy.call import Call
from proxy.telemetry.outcome import OUTCOMES

WINDOW = 1024
"""Recent requests kept per queue for the averages and p95s."""
RECENT = 300.0
"""...of which only those that finished in the last 5 minutes count."""
RATE_SPAN = 60
"""Seconds of the rate window (one bucket per second)."""


class QueueStats:
    """One queue's counters. `now` is the caller's perf_counter (injected in tests)."""

    __slots__ = ("outcomes", "reasons", "processed", "ring", "second", "until", "slot", "requests", "tokens")

    def __init__(self) -> None:
        self.outcomes: dict[str, int] = dict.fromkeys(OUTCOMES, 0)
        self.reasons: dict[str, int] = {}
        """Rejections by reason (rate_limit, queue_full, queue_timeout, ...)."""
        self.processed = 0
        """Requests that left the queue for an upstream (dispatched), whatever their outcome."""
        self.ring: deque[tuple[float, float, float | None]] = deque(maxlen=WINDOW)
        """The last WINDOW requests: when each finished, its wait, its processing seconds (None: never
        dispatched)."""
        self.second = 0
        """The second (of the clock) the rate ring's current bucket counts..."""
        self.until = 1.0
        """...until when it counts it..."""
        self.slot = 0
        """...and that bucket's index."""
        self.requests = [0] * RATE_SPAN
        self.tokens = [0] * RATE_SPAN

    def finished(self, now: float, call: Call, processing: float | None) -> None:
        outcome = call.outcome
        outcomes = self.outcomes
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        if outcome == "rejected":
            reason = call.reason or "unknown"
            self.reasons[reason] = self.reasons.get(reason, 0) + 1
        self.ring.append((now, call.queue_wait, processing))
        if processing is not None:
            self.processed += 1
        if call.attempts:  # sent upstream: what the queue's rate limits count
            if now >= self.until:  # the clock is monotonic: a new second has begun
                self._tick(int(now))
            slot = self.slot
            self.requests[slot] += 1
            if call.usage:
                self.tokens[slot] += _tokens(call.usage)

    def _tick(self, second: int) -> None:
        """Move the rate ring to `second` (clearing the seconds skipped)."""
        for s in range(max(self.second + 1, second - RATE_SPAN + 1), second + 1):
            self.requests[s % RATE_SPAN] = 0
            self.tokens[s % RATE_SPAN] = 0
        self.second = second
        self.until = second + 1.0
        self.slot = second % RATE_SPAN

    def rate(self, now: float) -> tuple[int, int]:
        """Requests and tokens of the last RATE_SPAN seconds."""
        if now >= self.until:
            self._tick(int(now))
        return sum(self.requests), sum(self.tokens)

    def recent(self, now: float) -> tuple[list[float], list[float]]:
        """Waits and processing times of the recent window, sorted (processing: dispatched requests only)."""
        since = now - RECENT
        waits: list[float] = []
        times: list[float] = []
        for end, wait, took in self.ring:
            if end >= since:
                waits.append(wait)
                if took is not None:
                    times.append(took)
        waits.sort()
        times.sort()
        return waits, times

    def totals(self) -> dict[str, Any]:
        o = self.outcomes
        return {
            "finished": sum(o.values()),
            "processed": self.processed,
            "succeeded": o["ok"],
            "failed": o["upstream_error"] + o["proxy_error"],
            "failed_upstream": o["upstream_error"],
            "failed_proxy": o["proxy_error"],
            "timed_out": o["timeout"],
            "cancelled": o["cancelled"],
            "rejected": o["rejected"],
            "rejected_by_reason": dict(sorted(self.reasons.items())),
        }


class QueueBook:
    """Every queue's stats by name (kept across reloads, like the queues themselves)."""

    __slots__ = ("queues",)

    def __init__(self) -> None:
        self.queues: dict[str, QueueStats] = {}

    def stats(self, queue: str) -> QueueStats:
        """The queue's stats, created the first time a request of it finishes."""
        stats = self.queues.get(queue)
        if stats is None:
            stats = self.queues[queue] = QueueStats()
        return stats

    def get(self, queue: str) -> QueueStats:
        return self.queues.get(queue) or QueueStats()


def summary(samples: list[float]) -> dict[str, Any]:
    """Average, p50 and p95 in milliseconds of sorted `samples` (None when there are none)."""
    if not samples:
        return {"avg": None, "p50": None, "p95": None, "samples": 0}
    n = len(samples)
    return {
        "avg": round(sum(samples) / n * 1000, 1),
        "p50": round(samples[(n - 1) // 2] * 1000, 1),
        "p95": round(samples[min(n - 1, math.ceil(n * 0.95) - 1)] * 1000, 1),
        "samples": n,
    }


def _tokens(usage: Mapping[str, Any]) -> int:
    """Total tokens of an OpenAI or Anthropic `usage` (admission/tokens.py's rule; telemetry may not import a
    stage)."""
    total = usage.get("total_tokens")
    if isinstance(total, int):
        return total
    keys = ("prompt_tokens", "completion_tokens", "input_tokens", "output_tokens", "cache_creation_input_tokens",
            "cache_read_input_tokens")
    return sum(v for k in keys if isinstance(v := usage.get(k), int))
