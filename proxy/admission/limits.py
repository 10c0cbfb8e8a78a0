"""Admission maths, pure: sliding-window counters (requests and tokens per second, minute, hour or
day), concurrency counts, and `decide()`. Time is always passed in; nothing here sleeps, locks or does
I/O, so a Redis store can run the same arithmetic in a script and the tests step a fake clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

# Re-exported: their home before there were units other than the minute.
from proxy.admission.window import WINDOW as WINDOW
from proxy.admission.window import SlidingWindow as SlidingWindow
from proxy.policy.plan import Limit, LimitSpec
from proxy.policy.rates import Rate

_EPS = 1e-9

Dimension = Literal["requests", "tokens", "concurrent"]


@dataclass(frozen=True, slots=True)
class Meter:
    """One window of a limit as seen at an instant: what the x-ratelimit-* headers report."""

    limit: int
    used: float
    remaining: int
    reset: float
    name: str = "requests_per_minute"
    """The window: `requests_per_second`, `tokens_per_day`, ..."""


@dataclass(frozen=True, slots=True)
class Usage:
    """A snapshot of one limit key (admin API, metrics, 429 headers)."""

    key: str
    scope: str
    tenant: str
    requests: Meter | None
    tokens: Meter | None
    """The tightest window of each dimension (`tightest`): what the x-ratelimit-* headers report."""
    concurrent: tuple[int, int] | None
    """(limit, in use)."""
    windows: tuple[Meter, ...] = ()
    """Every window, requests then tokens, shortest unit first (metrics, admin API)."""


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request may not start now, and when it could."""

    limit: Limit
    dimension: Dimension
    retry_after: float | None
    """Seconds until it would fit; None when it never can (a request bigger than the limit, or than the
    share of it that `headroom` leaves)."""
    exact: bool
    """False when capacity may free earlier than computed (concurrency; tokens while reservations are
    still unsettled and may be refunded): `retry_after` is then an upper bound or a hint."""
    usage: Usage
    unit: str = ""
    """The window that refused (`second`, `minute`, `hour`, `day`); "" for concurrency."""
    headroom: float = 0.0
    """The share of the limit the request had to leave free (its class's reserve)."""


class KeyState:
    """The counters of one limit key; a reload swaps the spec and keeps the counts of the windows it keeps."""

    __slots__ = ("limit", "minute", "requests", "tokens", "in_use", "pending", "concurrent")

    def __init__(self, limit: Limit, minute: float = WINDOW) -> None:
        self.limit = limit
        self.minute = minute
        """The length of a minute (tests shrink it); every unit's window scales with it."""
        self.requests: tuple[SlidingWindow, ...] = ()
        self.tokens: tuple[SlidingWindow, ...] = ()
        """One window per unit the spec sets, shortest first."""
        self.in_use = 0
        self.pending = 0
        """Tokens reserved by requests not settled yet (a settle may refund them)."""
        self.concurrent = limit.spec.concurrent
        self._apply(limit.spec)

    def configure(self, limit: Limit) -> None:
        old, self.limit = self.limit.spec, limit
        self.concurrent = limit.spec.concurrent
        if limit.spec != old:
            self._apply(limit.spec)

    def _apply(self, spec: LimitSpec) -> None:
        old = {w.name: w for w in self.requests + self.tokens}
        rates = spec.rates()
        self.requests = tuple(_window(old, r, self.minute) for r in rates if r.dimension == "requests")
        self.tokens = tuple(_window(old, r, self.minute) for r in rates if r.dimension == "tokens")

    def check(self, now: float, tokens: int, concurrency_hint: float, headroom: float = 0.0) -> Refusal | None:
        """The refusal with the longest wait among this key's windows, or None if all admit with
        `headroom` x each limit still free after counting this request."""
        keep = 1.0 - headroom
        concurrent = self.limit.spec.concurrent
        if concurrent is not None and self.in_use + 1 > concurrent * keep + _EPS:
            return self._refusal(now, tokens, concurrency_hint, headroom)
        for window in self.requests:
            if not window.fits(now, 1, keep):
                return self._refusal(now, tokens, concurrency_hint, headroom)
        if tokens:
            for window in self.tokens:
                if not window.fits(now, tokens, keep):
                    return self._refusal(now, tokens, concurrency_hint, headroom)
        return None  # the hot path: every window admits

    def _refusal(self, now: float, tokens: int, concurrency_hint: float, headroom: float) -> Refusal | None:
        keep = 1.0 - headroom
        found: list[_Found] = []
        concurrent = self.limit.spec.concurrent
        if concurrent is not None and self.in_use + 1 > concurrent * keep + _EPS:
            found.append(("concurrent", None, concurrency_hint, False))
        for window in self.requests:
            found.append(("requests", window, window.wait(now, 1, keep), True))
        for window in self.tokens if tokens else ():
            wait = window.wait(now, tokens, keep)
            found.append(("tokens", window, wait, not self.pending or wait is None))
        worst = _worst(found)
        if worst is None:
            return None
        dimension, refusing, wait, exact = worst
        unit = refusing.name.rpartition("_per_")[2] if refusing is not None else ""
        return Refusal(self.limit, dimension, wait, exact, self.usage(now), unit, headroom)

    def admit(self, now: float, tokens: int, keep: float = 1.0) -> bool:
        """`check` and `take` in one pass, on the hot path: count the request if every window and the
        concurrency admit it with `keep` x each limit, else count nothing and return False (`check` then
        says why). Each window is checked and counted in one call, and a refusing one undoes the others."""
        concurrent = self.concurrent
        if concurrent is not None and self.in_use + 1 > concurrent * keep + _EPS:
            return False
        requests = self.requests
        for window in requests:
            if not window.take(now, 1, keep):
                _untake(requests, window, 1)
                return False
        if tokens and self.tokens:
            windows = self.tokens
            for window in windows:
                if not window.take(now, tokens, keep):
                    _untake(windows, window, tokens)
                    _untake(requests, None, 1)
                    return False
            self.pending += tokens
        if concurrent is not None:
            self.in_use += 1
        return True

    def unadmit(self, tokens: int) -> None:
        """Undo `admit` at the same instant (another key of the same request refused)."""
        _untake(self.requests, None, 1)
        if tokens and self.tokens:
            _untake(self.tokens, None, tokens)
            self.pending -= tokens
        if self.concurrent is not None:
            self.in_use -= 1

    def take(self, now: float, tokens: int) -> None:
        """Count one request and its tokens (in the window that `now` falls in, at every unit)."""
        for window in self.requests:
            window.add(now, 1)
        if tokens and self.tokens:
            for window in self.tokens:
                window.add(now, tokens)
            self.pending += tokens
        if self.limit.spec.concurrent is not None:
            self.in_use += 1

    def adjust(self, now: float, at: float, reserved: int, requests: int, tokens: int) -> None:
        """Settle a reservation of `reserved` tokens counted at time `at`: `requests`/`tokens` are the
        differences (real minus reserved); negative ones are refunds to the windows `at` fell in."""
        if self.tokens:
            pending = self.pending - reserved
            self.pending = pending if pending > 0 else 0
            if tokens:
                _adjust(self.tokens, now, at, tokens)
        if requests:
            _adjust(self.requests, now, at, requests)

    def usage(self, now: float) -> Usage:
        spec = self.limit.spec
        requests = tuple(_meter(w, now) for w in self.requests)
        tokens = tuple(_meter(w, now) for w in self.tokens)
        return Usage(
            key=self.limit.key,
            scope=self.limit.scope,
            tenant=self.limit.tenant,
            requests=tightest(requests),
            tokens=tightest(tokens),
            concurrent=(spec.concurrent, self.in_use) if spec.concurrent is not None else None,
            windows=requests + tokens,
        )


def _untake(windows: tuple[SlidingWindow, ...], stop: SlidingWindow | None, amount: int) -> None:
    """Undo what `take` just counted in `windows` before `stop` (None: in all of them)."""
    for window in windows:
        if window is stop:
            return
        window.current -= amount  # in the same window instant: exact (whole numbers)


def _adjust(windows: tuple[SlidingWindow, ...], now: float, at: float, delta: int) -> None:
    """Charge `delta` now, or refund it (negative) to the windows `at` fell in."""
    for window in windows:
        if delta < 0:
            window.refund(math.floor(at / window.length), -delta)
        else:
            window.add(now, delta)


_Found = tuple[Dimension, SlidingWindow | None, float | None, bool]
"""(dimension, the window or None for concurrency, its wait, exact) of one check that refused."""


def _worst(found: list[_Found]) -> _Found | None:
    """The one to report: "never" first, then an exact wait over a hint, then the longest wait."""
    worst: _Found | None = None
    for entry in found:
        _, window, wait, _ = entry
        if wait == 0.0 and window is not None:
            continue  # this window admits
        if worst is None or wait is None or not worst[3] or wait > (worst[2] or 0.0):
            worst = entry
        if wait is None:
            break  # never fits: nothing says more
    return worst


def _window(old: dict[str, SlidingWindow], rate: Rate, minute: float) -> SlidingWindow:
    window = old.get(rate.name)
    if window is None:
        return SlidingWindow(rate.limit, rate.seconds * minute / WINDOW, rate.name)
    window.set_limit(rate.limit)
    return window


def _meter(window: SlidingWindow, now: float) -> Meter:
    used = window.used(now)
    remaining = max(0, math.floor(window.limit - used + _EPS))
    return Meter(int(window.limit), used, remaining, window.reset(now), window.name)


def tightest(meters: tuple[Meter, ...]) -> Meter | None:
    """The meter a client should hear about when one header names requests (or tokens) whatever the
    unit: the one with the fewest left, and of those the one that takes longest to reset."""
    if not meters:
        return None
    return min(meters, key=lambda m: (m.remaining, -m.reset))


def describe(spec: LimitSpec, dimension: Dimension, unit: str = "", headroom: float = 0.0) -> str:
    """How a message states a limit: `allows 5 requests per second` (`unit` names the window that refused;
    empty: every unit of `dimension`, `allows 5 requests per second and 1000 requests per day`)."""
    if dimension == "concurrent":
        text = f"allows {spec.concurrent} requests at once"
    else:
        rates = [r for r in spec.rates() if r.dimension == dimension and (not unit or r.unit == unit)]
        text = "allows " + " and ".join(f"{r.limit} {dimension} per {r.unit}" for r in rates)
    if headroom > 0:
        text += f" ({headroom * 100:g}% of it kept free for higher priority classes)"
    return text


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
    """OpenAI's x-ratelimit-* headers for the proxy's own limit (PROTOCOLS.md §1.4). They name requests
    and tokens without a unit, so each reports its dimension's tightest window (`tightest`)."""
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


def longer(refusal: Refusal, than: Refusal | None) -> bool:
    """The refusal a client should hear about: "never" first, then the longest exact wait."""
    if than is None or refusal.retry_after is None:
        return True
    if than.retry_after is None:
        return False
    if refusal.exact != than.exact:
        return refusal.exact
    return refusal.retry_after > than.retry_after
