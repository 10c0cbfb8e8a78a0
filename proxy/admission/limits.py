"""Admission maths, pure: sliding-window counters (requests/min, tokens/min), concurrency counts,
and `decide()`. Time is always passed in; nothing here sleeps, locks or does I/O, so a Redis store
can run the same arithmetic in a script and the tests step a fake clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from proxy.policy.plan import Limit, LimitSpec

WINDOW = 60.0
"""Every limit is per minute."""
_EPS = 1e-9

Dimension = Literal["requests", "tokens", "concurrent"]


class SlidingWindow:
    """Approximate sliding window over `length` seconds, in O(1) memory.

    Two fixed windows are kept: the current one and the one before it. The count "in the last
    minute" is the previous window's count weighted by the share of it that still overlaps the
    last minute, plus the current window's count (the `limits` library's and Cloudflare's scheme).
    """

    __slots__ = ("limit", "length", "index", "current", "previous")

    def __init__(self, limit: float, length: float = WINDOW) -> None:
        self.limit = limit
        self.length = length
        self.index = 0
        self.current = 0.0
        self.previous = 0.0

    def roll(self, now: float) -> None:
        index = math.floor(now / self.length)
        if index == self.index:
            return
        self.previous = self.current if index == self.index + 1 else 0.0
        self.current = 0.0
        self.index = index

    def used(self, now: float) -> float:
        self.roll(now)
        elapsed = (now - self.index * self.length) / self.length
        return self.previous * (1.0 - elapsed) + self.current

    def fits(self, now: float, cost: float) -> bool:
        """`wait(now, cost) == 0`, on the hot path: no allocation, one call."""
        length = self.length
        index = math.floor(now / length)
        if index != self.index:
            self.roll(now)
        elapsed = (now - index * length) / length
        return self.previous * (1.0 - elapsed) + self.current + cost <= self.limit + _EPS

    def remaining(self, now: float) -> float:
        return max(0.0, self.limit - self.used(now))

    def wait(self, now: float, cost: float) -> float | None:
        """Seconds until `cost` more fits (0: now), or None when it never can (cost > limit)."""
        if cost > self.limit + _EPS:
            return None
        if self.used(now) + cost <= self.limit + _EPS:
            return 0.0
        start = self.index * self.length
        if self.current + cost <= self.limit + _EPS:
            # Fits once enough of the previous window has slid out, still inside this window.
            share = 1.0 - (self.limit - self.current - cost) / self.previous
            return max(0.0, start + share * self.length - now)
        # Only after this window closes, once enough of it has slid out of the next one.
        share = max(0.0, 1.0 - (self.limit - cost) / self.current)
        return max(0.0, start + self.length + share * self.length - now)

    def reset(self, now: float) -> float:
        """Seconds until the window is empty again (OpenAI's `x-ratelimit-reset-*`)."""
        self.roll(now)
        start = self.index * self.length
        if self.current > 0:
            return start + 2 * self.length - now
        if self.previous > 0:
            return start + self.length - now
        return 0.0

    def add(self, now: float, amount: float) -> int:
        """Count `amount` now; returns the window index it landed in (for a later refund)."""
        if math.floor(now / self.length) != self.index:  # admission just rolled it: usually no call
            self.roll(now)
        self.current += amount
        return self.index

    def refund(self, index: int, amount: float) -> None:
        """Take back `amount` counted in window `index`, if that window is still remembered."""
        if index == self.index:
            self.current = max(0.0, self.current - amount)
        elif index == self.index - 1:
            self.previous = max(0.0, self.previous - amount)


@dataclass(frozen=True, slots=True)
class Meter:
    """One dimension of a limit as seen at an instant: what the x-ratelimit-* headers report."""

    limit: int
    used: float
    remaining: int
    reset: float


@dataclass(frozen=True, slots=True)
class Usage:
    """A snapshot of one limit key (admin API, metrics, 429 headers)."""

    key: str
    scope: str
    tenant: str
    requests: Meter | None
    tokens: Meter | None
    concurrent: tuple[int, int] | None
    """(limit, in use)."""


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request may not start now, and when it could."""

    limit: Limit
    dimension: Dimension
    retry_after: float | None
    """Seconds until it would fit; None when it never can (a request bigger than the limit)."""
    exact: bool
    """False when capacity may free earlier than computed (concurrency; tokens while reservations are
    still unsettled and may be refunded): `retry_after` is then an upper bound or a hint."""
    usage: Usage


class KeyState:
    """The counters of one limit key; a reload swaps the spec and keeps the counts."""

    __slots__ = ("limit", "length", "requests", "tokens", "in_use", "pending")

    def __init__(self, limit: Limit, length: float = WINDOW) -> None:
        self.limit = limit
        self.length = length
        self.requests: SlidingWindow | None = None
        self.tokens: SlidingWindow | None = None
        self.in_use = 0
        self.pending = 0
        """Tokens reserved by requests not settled yet (a settle may refund them)."""
        self._apply(limit.spec)

    def configure(self, limit: Limit) -> None:
        old, self.limit = self.limit.spec, limit
        if limit.spec != old:
            self._apply(limit.spec)

    def _apply(self, spec: LimitSpec) -> None:
        self.requests = _resize(self.requests, spec.requests_per_minute, self.length)
        self.tokens = _resize(self.tokens, spec.tokens_per_minute, self.length)

    def check(self, now: float, tokens: int, concurrency_hint: float) -> Refusal | None:
        """The refusal with the longest wait among this key's dimensions, or None if all admit."""
        spec = self.limit.spec
        requests, window = self.requests, self.tokens
        if (
            (spec.concurrent is None or self.in_use < spec.concurrent)
            and (requests is None or requests.fits(now, 1))
            and (window is None or not tokens or window.fits(now, tokens))
        ):
            return None  # the hot path: every dimension admits
        return self._refusal(now, tokens, concurrency_hint)

    def _refusal(self, now: float, tokens: int, concurrency_hint: float) -> Refusal | None:
        worst: Refusal | None = None
        spec = self.limit.spec
        if spec.concurrent is not None and self.in_use >= spec.concurrent:
            worst = Refusal(self.limit, "concurrent", concurrency_hint, False, self.usage(now))
        dimensions: tuple[tuple[Dimension, SlidingWindow | None, int], ...] = (
            ("requests", self.requests, 1),
            ("tokens", self.tokens, tokens),
        )
        for dimension, window, cost in dimensions:
            if window is None or not cost:
                continue
            wait = window.wait(now, cost)
            if wait == 0.0:
                continue
            exact = dimension == "requests" or not self.pending or wait is None
            if worst is None or not worst.exact or wait is None or wait > (worst.retry_after or 0.0):
                worst = Refusal(self.limit, dimension, wait, exact, self.usage(now))
            if wait is None:
                break
        return worst

    def take(self, now: float, tokens: int) -> None:
        """Count one request and its tokens (in the window that `now` falls in)."""
        requests, window = self.requests, self.tokens
        if requests is not None:
            requests.add(now, 1)
        if window is not None and tokens:
            window.add(now, tokens)
            self.pending += tokens
        if self.limit.spec.concurrent is not None:
            self.in_use += 1

    def adjust(self, now: float, index: int, reserved: int, requests: int, tokens: int) -> None:
        """Settle a reservation of `reserved` tokens: `requests`/`tokens` are the differences (real
        minus reserved); negative ones are refunds."""
        window = self.tokens
        if window is not None:
            self.pending = max(0, self.pending - reserved)
            if tokens:
                _apply(window, now, index, tokens)
        if requests and self.requests is not None:
            _apply(self.requests, now, index, requests)

    def usage(self, now: float) -> Usage:
        spec = self.limit.spec
        return Usage(
            key=self.limit.key,
            scope=self.limit.scope,
            tenant=self.limit.tenant,
            requests=_meter(self.requests, now),
            tokens=_meter(self.tokens, now),
            concurrent=(spec.concurrent, self.in_use) if spec.concurrent is not None else None,
        )


def _apply(window: SlidingWindow, now: float, index: int, delta: int) -> None:
    """A settlement's difference: a refund goes back to the window it was counted in, a charge to now."""
    if delta < 0:
        window.refund(index, -delta)
    else:
        window.add(now, delta)


def _resize(window: SlidingWindow | None, limit: int | None, length: float) -> SlidingWindow | None:
    if limit is None:
        return None
    if window is None:
        return SlidingWindow(limit, length)
    window.limit = limit
    return window


def _meter(window: SlidingWindow | None, now: float) -> Meter | None:
    if window is None:
        return None
    used = window.used(now)
    return Meter(int(window.limit), used, max(0, math.floor(window.limit - used + _EPS)), window.reset(now))


# --- the decision -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Admit:
    pass


@dataclass(frozen=True, slots=True)
class WaitUntil:
    at: float


@dataclass(frozen=True, slots=True)
class Reject:
    retry_after: float | None
    """None: retrying cannot help (the request is bigger than the limit)."""


Decision = Admit | WaitUntil | Reject
ADMIT = Admit()


def decide(refusal: Refusal | None, now: float, deadline: float | None, recheck: float) -> Decision:
    """Admit, wait (bounded by `deadline`; None means the route rejects at once) or reject.

    A computed wait that ends after the deadline is rejected at once instead of held pointlessly.
    Waits are cut to `recheck` seconds, because refunds and releases free capacity early.
    """
    if refusal is None:
        return ADMIT
    return decide_wait(refusal.retry_after, refusal.exact, now, deadline, recheck)


def decide_wait(wait: float | None, exact: bool, now: float, deadline: float | None, recheck: float) -> Decision:
    """`decide` for a refusal given by its numbers: `wait` until it would fit (None: never), `exact`
    when capacity cannot free earlier (see `Refusal.exact`)."""
    if wait is None or deadline is None or now >= deadline:
        return Reject(wait)
    if exact:
        if now + wait > deadline + _EPS:
            return Reject(wait)
        return WaitUntil(now + min(wait, recheck))
    return WaitUntil(min(now + recheck, deadline))


# --- 429 headers ---------------------------------------------------------------------------------


def ratelimit_headers(usage: Usage) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers for the proxy's own limit (PROTOCOLS.md §1.4)."""
    headers: dict[str, str] = {}
    for name, meter in (("requests", usage.requests), ("tokens", usage.tokens)):
        if meter is not None:
            headers[f"x-ratelimit-limit-{name}"] = str(meter.limit)
            headers[f"x-ratelimit-remaining-{name}"] = str(meter.remaining)
            headers[f"x-ratelimit-reset-{name}"] = go_duration(meter.reset)
    return headers


def go_duration(seconds: float) -> str:
    """`12ms`, `1.5s`, `6m0s`: the duration format of OpenAI's reset headers."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    if seconds < 60:
        return f"{round(seconds, 3):g}s"
    minutes, rest = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{rest}s"
