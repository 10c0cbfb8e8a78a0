"""The sliding window over one unit (a second, a minute, an hour, a day), pure: time is passed in, so a
Redis script can run the same arithmetic and tests step a fake clock.
"""

from __future__ import annotations

import math

WINDOW = 60.0
"""The length of a minute; tests shrink it (every unit scales with it) to stay short."""
_EPS = 1e-9


class SlidingWindow:
    """Approximate sliding window over `length` seconds, in O(1) memory.

    Two fixed windows are kept: the current one and the one before it. The count "in the last
    `length` seconds" is the previous window's count weighted by the share of it that still overlaps
    them, plus the current window's count (the `limits` library's and Cloudflare's scheme).

    `keep` (1 - headroom) is the share of the limit a caller may fill: a request that would leave less
    than `headroom` x limit free does not fit (capacity reserved for higher priority classes).
    """

    __slots__ = ("limit", "cap", "length", "name", "index", "current", "previous")

    def __init__(self, limit: float, length: float = WINDOW, name: str = "requests_per_minute") -> None:
        self.limit = self.cap = 0.0
        self.set_limit(limit)
        self.length = length
        self.name = name
        """`requests_per_minute`, `tokens_per_day`, ...: what metrics and the admin API call it."""
        self.index = 0
        self.current = 0.0
        self.previous = 0.0

    def set_limit(self, limit: float) -> None:
        self.limit = limit
        self.cap = limit * 1.0 + _EPS
        """`limit * keep + _EPS` for keep 1 (no headroom), the same number: what `take_all` compares with."""

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

    def fits(self, now: float, cost: float, keep: float = 1.0) -> bool:
        """`wait(now, cost, keep) == 0`, on the hot path: no allocation, one call."""
        length = self.length
        index = math.floor(now / length)
        if index != self.index:
            self.roll(now)
        cap = self.limit * keep + _EPS
        if self.previous + self.current + cost <= cap:
            return True  # fits even if none of the previous window had slid out: skip the weighting
        elapsed = (now - index * length) / length
        return self.previous * (1.0 - elapsed) + self.current + cost <= cap

    def take(self, now: float, cost: float, keep: float = 1.0) -> bool:
        """`add(now, cost)` if `fits(now, cost, keep)`, in one call; False (nothing counted) otherwise."""
        length = self.length
        index = math.floor(now / length)
        if index != self.index:
            self.roll(now)
        total = self.current + cost
        cap = self.limit * keep + _EPS
        if self.previous + total > cap:  # else it fits even if none of the previous window had slid out
            elapsed = (now - index * length) / length
            if self.previous * (1.0 - elapsed) + total > cap:
                return False
        self.current = total
        return True

    def remaining(self, now: float) -> float:
        return max(0.0, self.limit - self.used(now))

    def wait(self, now: float, cost: float, keep: float = 1.0) -> float | None:
        """Seconds until `cost` more fits under `keep` x limit (0: now), or None when it never can
        (cost > keep x limit)."""
        cap = self.limit * keep
        if cost > cap + _EPS:
            return None
        if self.used(now) + cost <= cap + _EPS:
            return 0.0
        start = self.index * self.length
        if self.current + cost <= cap + _EPS:
            # Fits once enough of the previous window has slid out, still inside this window.
            share = 1.0 - (cap - self.current - cost) / self.previous
            return max(0.0, start + share * self.length - now)
        # Only after this window closes, once enough of it has slid out of the next one.
        share = max(0.0, 1.0 - (cap - cost) / self.current)
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
        self.roll(now)
        self.current += amount
        return self.index

    def refund(self, index: int, amount: float) -> None:
        """Take back `amount` counted in window `index`, if that window is still remembered."""
        if index == self.index:
            left = self.current - amount
            self.current = left if left > 0.0 else 0.0
        elif index == self.index - 1:
            left = self.previous - amount
            self.previous = left if left > 0.0 else 0.0


# --- many windows in one call (the local store's hot path: one call per dimension, not per window) ---

Groups = tuple[tuple[float, tuple[SlidingWindow, ...]], ...]
"""Windows grouped by length, `(length, windows)`: one window index per group (`group`)."""


def group(windows: tuple[SlidingWindow, ...]) -> Groups:
    """`windows` by length, in the order each length first appears (the groups of `take_all`)."""
    lengths: dict[float, list[SlidingWindow]] = {}
    for window in windows:
        lengths.setdefault(window.length, []).append(window)
    return tuple((length, tuple(members)) for length, members in lengths.items())


def take_all(groups: Groups, now: float, cost: float, keep: float) -> bool:
    """`SlidingWindow.take` in every window of `groups`, all or nothing: False (nothing counted) when one
    refuses. The same arithmetic as `take`, inlined, with one window index per length."""
    whole = keep == 1.0  # no headroom to leave (most classes): each window's cap is precomputed
    for length, windows in groups:
        index = math.floor(now / length)
        for window in windows:
            if index != window.index:
                window.roll(now)
            total = window.current + cost
            cap = window.cap if whole else window.limit * keep + _EPS
            if window.previous + total > cap:  # else it fits even if none of the previous window had slid out
                elapsed = (now - index * length) / length
                if window.previous * (1.0 - elapsed) + total > cap:
                    untake(groups, window, cost)
                    return False
            window.current = total
    return True


def untake(groups: Groups, stop: SlidingWindow | None, amount: float) -> None:
    """Undo what `take_all` just counted in `groups` before `stop` (None: in all of them)."""
    for _, windows in groups:
        for window in windows:
            if window is stop:
                return
            window.current -= amount  # in the same window instant: exact (whole numbers)


def adjust_all(groups: Groups, now: float, at: float, delta: float) -> None:
    """Charge `delta` now in every window of `groups`, or refund it (negative) to the windows `at` fell in
    (`add` and `refund`, with one window index per length)."""
    if delta < 0:
        for length, windows in groups:
            index = math.floor(at / length)
            for window in windows:  # `refund(index, -delta)`, inlined
                if index == window.index:
                    left = window.current + delta
                    window.current = left if left > 0.0 else 0.0
                elif index == window.index - 1:
                    left = window.previous + delta
                    window.previous = left if left > 0.0 else 0.0
        return
    for _, windows in groups:
        for window in windows:
            window.add(now, delta)


def refund_current(windows: tuple[SlidingWindow, ...], delta: float) -> None:
    """`adjust_all`'s refund (`delta` < 0) where the caller knows that every window is still the one the
    reservation's instant fell in (none rolled since): each current window gives it back, as `refund`."""
    for window in windows:
        left = window.current + delta
        window.current = left if left > 0.0 else 0.0


def room_all(groups: Groups) -> float:
    """The fewest units any window of `groups` can still count with no headroom (its cap minus the previous
    and the current window's counts: `take_all`'s first, unweighted test); inf without windows."""
    return min((window.cap - window.previous - window.current for _, windows in groups for window in windows),
               default=math.inf)


def steady_until(groups: Groups, now: float) -> float:
    """The last instant at which every group's window index is still the one `now` falls in (no window of
    `groups`, once rolled to `now`, rolls before or at it); inf without windows."""
    until = math.inf
    for length, _ in groups:
        index = math.floor(now / length)
        last = (index + 1) * length
        while math.floor(last / length) > index:  # the float boundary may round into the next window
            last = math.nextafter(last, -math.inf)
        until = min(until, last)
    return until


def roll_all(groups: Groups, now: float) -> None:
    """Roll every window of `groups` to `now` (what a `take_all` at `now` would do first)."""
    for length, windows in groups:
        index = math.floor(now / length)
        for window in windows:
            if index != window.index:
                window.roll(now)
