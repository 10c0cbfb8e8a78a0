"""A deployment's circuit breaker: a small state machine over an injected clock (pure).

    closed --(N failures in a row, or failure ratio over min volume in the window)--> open
    open --(cooldown elapsed, one request let through as the probe)--> half_open
    half_open --(probe succeeded)--> closed        half_open --(probe failed)--> open (longer cooldown)

The cooldown doubles with each opening (Envoy grows its ejection time with each ejection) up to
`max_cooldown`; a breaker that stayed closed for longer than `max_cooldown` starts again from `cooldown`.
The ratio window is a ring of ten buckets, so memory is fixed and recording is O(1).
"""

from __future__ import annotations

import math
from typing import Literal

from proxy.policy.plan import BreakerSpec

State = Literal["closed", "open", "half_open"]
_BUCKETS = 10


class Breaker:
    __slots__ = (
        "spec", "state", "consecutive", "openings", "opened_at", "reopen_at", "closed_at", "probing",
        "_total", "_failed", "_total_at", "_failed_at", "_bucket", "_width",
    )

    def __init__(self, spec: BreakerSpec) -> None:
        self.spec = spec
        self._width: float | None = None
        self.configure(spec)
        self.state: State = "closed"
        self.consecutive = 0
        self.openings = 0
        self.opened_at = 0.0
        self.reopen_at = 0.0
        self.closed_at: float | None = None
        self.probing = False
        self._total = self._failed = 0
        """Outcomes (and failures) counted for the ratio since the breaker was made: running totals."""
        self._total_at = [0] * _BUCKETS
        """Per slot (bucket % _BUCKETS): `_total` when that bucket began. What the window holds is the
        running total less the total at the start of its oldest bucket: counting an outcome is one addition."""
        self._failed_at = [0] * _BUCKETS
        self._bucket = 0
        """The newest bucket seen (the clock is monotonic)."""

    def configure(self, spec: BreakerSpec) -> None:
        """Take `spec` (new, or a reload's). What every outcome needs of it is worked out here: the width of
        a ratio bucket (infinite for a window of 0: one bucket), or None when no ratio is kept."""
        self.spec = spec
        if spec.failure_ratio <= 0:
            self._width = None
        else:
            self._width = spec.window / _BUCKETS if spec.window > 0 else math.inf

    # --- admission of requests ---------------------------------------------------------------------

    def available(self, now: float) -> bool:
        """Could a request go to this deployment now (closed, or a probe is due)?"""
        if self.state == "closed":
            return True
        if self.probing:
            return False
        return self.state == "half_open" or now >= self.reopen_at

    def probe_due(self, now: float) -> bool:
        if self.state == "closed" or self.probing:
            return False
        return self.state == "half_open" or now >= self.reopen_at

    def acquire(self, now: float) -> State | None:
        """A request is being sent; returns the new state if this made a transition (open -> half_open)."""
        if self.state == "closed":
            return None
        self.probing = True
        if self.state == "open":
            self.state = "half_open"
            return "half_open"
        return None

    def abandon(self) -> None:
        """The probe was cancelled before it had an outcome: let another request probe."""
        self.probing = False

    # --- outcomes -------------------------------------------------------------------------------------

    def record(self, now: float, failed: bool, probe: bool) -> State | None:
        """Feed one outcome; returns the new state on a transition. `probe`: this was the half-open probe."""
        if self.state != "closed":
            if not probe:
                return None  # a straggler sent before the circuit opened: the probe decides
            self.probing = False
            if failed:
                self._open(now)
                return "open"
            self._close(now)
            return "closed"
        if failed:
            self.consecutive += 1
        else:
            self.consecutive = 0
        width = self._width
        if width is not None:
            bucket = int(now / width)
            if bucket > self._bucket:  # the window moved on
                self._rotate(bucket)
            self._total += 1
            if failed:
                self._failed += 1
        if not failed:
            return None
        spec = self.spec
        if spec.consecutive_failures and self.consecutive >= spec.consecutive_failures:
            self._open(now)
            return "open"
        if spec.failure_ratio > 0:
            oldest = (self._bucket + 1) % _BUCKETS  # the slot of the window's oldest bucket
            total = self._total - self._total_at[oldest]
            if total >= spec.min_requests and self._failed - self._failed_at[oldest] >= spec.failure_ratio * total:
                self._open(now)
                return "open"
        return None

    def cooldown(self) -> float:
        """The open period of the current (or next) opening."""
        spec = self.spec
        return min(spec.max_cooldown, spec.cooldown * 2.0 ** min(max(self.openings - 1, 0), 30))

    def _open(self, now: float) -> None:
        if self.closed_at is not None and now - self.closed_at > self.spec.max_cooldown:
            self.openings = 0  # healthy for a long while: forget earlier openings
        self.openings += 1
        self.state = "open"
        self.opened_at = now
        self.reopen_at = now + self.cooldown()
        self.probing = False

    def _close(self, now: float) -> None:
        self.state = "closed"
        self.closed_at = now
        self.consecutive = 0
        self._total_at = [self._total] * _BUCKETS  # the window starts empty
        self._failed_at = [self._failed] * _BUCKETS

    def _rotate(self, bucket: int) -> None:
        """Buckets began since the newest one seen: nothing was counted in them yet, so each starts at the
        running totals (at most _BUCKETS of them matter)."""
        for past in range(max(self._bucket + 1, bucket - _BUCKETS + 1), bucket + 1):
            index = past % _BUCKETS
            self._total_at[index] = self._total
            self._failed_at[index] = self._failed
        self._bucket = bucket
