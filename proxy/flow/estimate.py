"""Estimated wait, pure: a waiter's place in line over the rate at which the line moves.

The rate is the queue's recent departure rate (tickets granted per second over the last `SAMPLES`
grants, or since the oldest of them), or, when nothing left recently, the refill rate of the rate
window that binds the waiter (its limit per second). With neither, there is no estimate (None): a
queue blocked only by concurrency that has not moved yet cannot say.
"""

from __future__ import annotations

from collections.abc import Sequence

from proxy.admission.limits import Refusal

SAMPLES = 64
STALE = 60.0
"""Departures older than this say nothing about the current rate."""


def departure_rate(departures: Sequence[float], now: float) -> float | None:
    """Departures per second over the recent ones (None: fewer than two, or all stale)."""
    recent = [t for t in departures if now - t <= STALE]
    if len(recent) < 2:
        return None
    span = now - recent[0]
    if span <= 0:
        return None
    return len(recent) / span


def refill_rate(refusal: Refusal) -> float | None:
    """Requests per second the refusing window lets through (None: not a rate, e.g. concurrency)."""
    if refusal.dimension != "requests":
        return None
    rates = [r.limit / r.seconds for r in refusal.limit.spec.rates() if r.dimension == "requests"
             and r.unit == refusal.unit]
    return rates[0] if rates else None


def eta(position: int, departures_per_s: float | None, refill_per_s: float | None) -> float | None:
    """Seconds until the waiter at 1-based `position` leaves: the slower of the two rates known."""
    rates = [r for r in (departures_per_s, refill_per_s) if r]
    if position <= 0 or not rates:
        return None
    return position / min(rates)
