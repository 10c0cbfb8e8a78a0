"""Per-queue totals by outcome, recent wait and processing times, and the recent request and token rate, for
`GET /admin/queues` (seed 004). Fed once per finished request whose route has a queue.

Per request this is one tuple appended to a pending list (`finished`); the pending requests are counted in
when read (`totals`, `recent`, `rate`) or every `FOLD_EVERY` requests (telemetry/rows.py), mostly in C.
Nothing is sorted per request. Averages and percentiles are computed when the admin API asks, over the last
`WINDOW` requests that finished within the last `RECENT` seconds. The rate is two rings of `RATE_SPAN`
one-second buckets (requests sent upstream, tokens their `usage` reported).
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Mapping
from itertools import compress, groupby, repeat
from operator import is_, itemgetter, methodcaller, not_
from typing import Any

from proxy.call import Attempt, Call
from proxy.telemetry.outcome import OUTCOMES

WINDOW = 1024
"""Recent requests kept per queue for the averages and p95s."""
RECENT = 300.0
"""...of which only those that finished in the last 5 minutes count."""
RATE_SPAN = 60
"""Seconds of the rate window (one bucket per second)."""


Finished = tuple[float, float, "float | None", str, "str | None", list[Attempt], "dict[str, Any] | None"]
"""A finished request as the books keep it until folded in: when it finished, its wait, its processing
seconds (None: never dispatched), outcome, reason, attempts (any: it was sent upstream) and usage."""
_TIMES = itemgetter(0, 1, 2)
_PROCESSING = itemgetter(2)
_OUTCOME = itemgetter(3)
_REASON = itemgetter(4)
_SENT = itemgetter(5)
_USAGE = itemgetter(6)
_TOTAL = methodcaller("get", "total_tokens")
_FIRST = itemgetter(0)
_SECOND = itemgetter(1)
_REJECTED = "rejected".__eq__


class QueueStats:
    """One queue's counters. `now` is the caller's perf_counter (injected in tests).

    `finished` only appends the request to `pending`; every reader (`totals`, `recent`, `rate`) folds the
    pending requests in first, in the order they came, so it sees what counting each as it came would give.
    The recorder (telemetry/rows.py) folds every queue's pending requests every `FOLD_EVERY` requests."""

    __slots__ = ("outcomes", "reasons", "processed", "ring", "second", "until", "slot", "requests", "tokens",
                 "pending")

    def __init__(self) -> None:
        self.outcomes: dict[str, int] = dict.fromkeys(OUTCOMES, 0)
        self.reasons: dict[str, int] = {}
        """Rejections by reason (rate_limit, queue_full, queue_timeout, ...)."""
        self.processed = 0
        """Requests that left the queue for an upstream (dispatched), whatever their outcome."""
        self.ring: deque[Finished] = deque(maxlen=WINDOW)
        """The last WINDOW requests as `finished` kept them (read: when each finished, its wait, its processing
        seconds)."""
        self.second = 0
        """The second (of the clock) the rate ring's current bucket counts..."""
        self.until = 1.0
        """...until when it counts it..."""
        self.slot = 0
        """...and that bucket's index."""
        self.requests = [0] * RATE_SPAN
        self.tokens = [0] * RATE_SPAN
        self.pending: list[Finished] = []
        """Requests finished since the last fold, in order."""

    def finished(self, now: float, call: Call, processing: float | None) -> None:
        self.pending.append((now, call.queue_wait, processing, call.outcome, call.reason, call.attempts, call.usage))

    def fold(self) -> None:
        """Count the pending requests in: per request only C (maps over the tuples); Python per outcome, per
        refusal and per second of the rate ring."""
        pending = self.pending
        if not pending:
            return
        self.ring.extend(pending)
        outcomes = self.outcomes
        batch = Counter(map(_OUTCOME, pending))
        for outcome, n in batch.items():
            outcomes[outcome] = outcomes.get(outcome, 0) + n
        if "rejected" in batch:
            reasons = self.reasons
            for reason in compress(map(_REASON, pending), map(_REJECTED, map(_OUTCOME, pending))):
                reason = reason or "unknown"
                reasons[reason] = reasons.get(reason, 0) + 1
        self.processed += len(pending) - list(map(_PROCESSING, pending)).count(None)
        self._rate(list(compress(pending, map(_SENT, pending))))
        pending.clear()

    def _rate(self, sent: list[Finished]) -> None:
        """Count requests sent upstream (what the queue's rate limits count) into the rate ring, a second at a
        time: the clock is monotonic, so the requests of one second come together."""
        seconds = map(int, map(_FIRST, sent))
        for second, group in groupby(zip(seconds, map(_USAGE, sent), strict=True), key=_FIRST):
            if second > self.second:  # a new second has begun (`until` is `second + 1`)
                self._tick(second)
            usages = list(map(_SECOND, group))
            slot = self.slot
            self.requests[slot] += len(usages)
            self.tokens[slot] += _sum_tokens(list(filter(None, usages)))

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
        self.fold()
        if now >= self.until:
            self._tick(int(now))
        return sum(self.requests), sum(self.tokens)

    def recent(self, now: float) -> tuple[list[float], list[float]]:
        """Waits and processing times of the recent window, sorted (processing: dispatched requests only)."""
        self.fold()
        since = now - RECENT
        waits: list[float] = []
        times: list[float] = []
        for end, wait, took in map(_TIMES, self.ring):
            if end >= since:
                waits.append(wait)
                if took is not None:
                    times.append(took)
        waits.sort()
        times.sort()
        return waits, times

    def totals(self) -> dict[str, Any]:
        self.fold()
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


def _sum_tokens(usages: list[Mapping[str, Any]]) -> int:
    """`_tokens` of each usage, summed: in C for those whose `total_tokens` is an int (OpenAI's; `type` is int,
    so a bool goes to `_tokens`), by `_tokens` for the others."""
    totals: list[Any] = list(map(_TOTAL, usages))
    types = list(map(type, totals))
    if types.count(int) == len(types):  # all OpenAI's
        every: int = sum(totals)
        return every
    plain = list(map(is_, types, repeat(int)))
    given: int = sum(compress(totals, plain))
    return given + sum(map(_tokens, compress(usages, map(not_, plain))))


def _tokens(usage: Mapping[str, Any]) -> int:
    """Total tokens of an OpenAI or Anthropic `usage` (admission/tokens.py's rule; telemetry may not import a
    stage)."""
    total = usage.get("total_tokens")
    if isinstance(total, int):
        return total
    keys = ("prompt_tokens", "completion_tokens", "input_tokens", "output_tokens", "cache_creation_input_tokens",
            "cache_read_input_tokens")
    return sum(v for k in keys if isinstance(v := usage.get(k), int))
