"""Retry budget (pure arithmetic on counts, time injected): a *rate* of retries per route.

Semantics, after Finagle's and tower's `RetryBudget` and the SRE book's per-client retry ratio
(PROTOCOLS.md §6): over the last `WINDOW_S` seconds, the retries a route's calls send (fallback attempts
included) may be at most `percent` % of the requests it sent upstream for the first time, or
`min_retries` per second of the window, whichever is larger. So upstream calls stay within
(1 + percent/100) x client requests, plus a floor that lets light traffic retry.

Why not Envoy's concurrency budget (retries in flight <= percent of requests in flight): a retry is "in
flight" while it sleeps in backoff or waits out a `retry-after`, and those waits are long next to a
failed call, so waiting retries fill the budget and the calls that could be retried at once are refused
(1.04 upstream calls per request instead of 1.2 under 27 % faults). A rate charges a retry once, when it
is committed to, whatever its wait. Hand-written: no kept library offers a time-injected rolling count.
"""

from __future__ import annotations

WINDOW_S = 10
"""Seconds a request (or a retry) counts for; one slot per second (Finagle's default ttl)."""


def allowance(requests: int, percent: float, floor_per_s: int) -> int:
    """Retries the window may hold: `percent` % of its first attempts, or the floor, whichever is larger."""
    return max(floor_per_s * WINDOW_S, int(requests * percent / 100.0))


class RetryBudget:
    """First attempts and retries of one route over the last WINDOW_S seconds (a ring of 1 s slots)."""

    __slots__ = ("_requests", "_retries", "_second", "_slot", "requests", "retries")

    def __init__(self) -> None:
        self._requests = [0] * WINDOW_S
        self._retries = [0] * WINDOW_S
        self._second = 0
        """The newest slot's second; older slots are cleared as time moves on."""
        self._slot = 0
        """The newest slot's index (`_second % WINDOW_S`)."""
        self.requests = 0
        self.retries = 0

    def allows(self, now: float, percent: float, floor_per_s: int) -> bool:
        """May one more retry be sent now?"""
        self._roll(now)
        return self.retries < allowance(self.requests, percent, floor_per_s)

    def counts(self, now: float) -> tuple[int, int]:
        """(first attempts, retries) in the window ending now."""
        self._roll(now)
        return self.requests, self.retries

    def request(self, now: float) -> None:
        """A first attempt was committed to. (Every request comes here: the slot is only recomputed when
        the second has moved on.)"""
        if int(now) > self._second:
            self._roll(now)
        self._requests[self._slot] += 1
        self.requests += 1

    def retry(self, now: float) -> None:
        """A retry was committed to (before its backoff: waiting costs nothing more)."""
        self._roll(now)
        self._retries[self._slot] += 1
        self.retries += 1

    def _roll(self, now: float) -> None:
        second = int(now)
        gap = second - self._second
        if gap > 0:
            for past in range(self._second + 1, self._second + 1 + min(gap, WINDOW_S)):
                slot = past % WINDOW_S
                self.requests -= self._requests[slot]
                self.retries -= self._retries[slot]
                self._requests[slot] = self._retries[slot] = 0
            self._second = second
            self._slot = second % WINDOW_S
