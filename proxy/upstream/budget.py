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
    """First attempts and retries of one route over the last WINDOW_S seconds.

    Counted as running totals since the budget was made, with a ring of 1 s slots that keeps the totals at
    the start of each second of the window: what the window holds is the running total less the total at
    its start. So counting a request is one addition; the ring is written only when a second begins."""

    __slots__ = ("_made", "_retried", "_made_at", "_retried_at", "_second")

    def __init__(self) -> None:
        self._made = 0
        """First attempts since the budget was made."""
        self._retried = 0
        self._made_at = [0] * WINDOW_S
        """Per slot (second % WINDOW_S): `_made` when that second began."""
        self._retried_at = [0] * WINDOW_S
        self._second = 0
        """The newest second seen; the ring holds it and the WINDOW_S - 1 before it."""

    def allows(self, now: float, percent: float, floor_per_s: int) -> bool:
        """May one more retry be sent now?"""
        requests, retries = self.counts(now)
        return retries < allowance(requests, percent, floor_per_s)

    def counts(self, now: float) -> tuple[int, int]:
        """(first attempts, retries) in the window ending now."""
        if int(now) > self._second:
            self._roll(now)
        first = (self._second + 1) % WINDOW_S  # the slot of the window's oldest second
        return self._made - self._made_at[first], self._retried - self._retried_at[first]

    def request(self, now: float) -> None:
        """A first attempt was committed to."""
        if int(now) > self._second:
            self._roll(now)
        self._made += 1

    def retry(self, now: float) -> None:
        """A retry was committed to (before its backoff: waiting costs nothing more)."""
        if int(now) > self._second:
            self._roll(now)
        self._retried += 1

    def _roll(self, now: float) -> None:
        """Seconds began since the newest one seen: nothing was counted in them yet, so each starts at the
        running totals (at most WINDOW_S of them matter)."""
        second = int(now)
        for past in range(max(self._second + 1, second - WINDOW_S + 1), second + 1):
            slot = past % WINDOW_S
            self._made_at[slot] = self._made
            self._retried_at[slot] = self._retried
        self._second = second
