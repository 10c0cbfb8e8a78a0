"""The counters one request touches in the in-memory store, gathered once per tuple of limits.

A `LimitSet`'s tuple (tenant, route, route per tenant) and each upstream limit are the same objects for
every request of a plan, so `LocalStore` compiles each into a `Counters` the first time it sees it: the
key states, and their windows flattened by dimension, so admitting a request is one pass over
precomputed objects (no key lookup, no per-key call, no allocation but the `Reservation`). A `Counters` is
valid for one generation of the store: anything that changes which windows or caps a key has (a reload,
a request of an older plan re-configuring a key) starts a new one and it is compiled again.

Room: after an exact take (`take_all` and the caps, all of them compared) a `Counters` notes how much its
tightest window and cap can still take (`room_all`, whole units, one kept spare) and until when none of its
windows rolls (`steady_until`). Counts only grow when something is taken or charged, and every such
request and token in the store is added to its `Spent`; rolls, refunds and releases only free room. So
while the store has spent less since then than that room, every window and cap would pass `take_all`'s
first (unweighted) test, and a request is counted without comparing each one (`take`'s first branch).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from proxy.admission.limits import KeyState
from proxy.admission.window import (
    adjust_all,
    group,
    refund_current,
    roll_all,
    room_all,
    steady_until,
    take_all,
    untake,
)
from proxy.policy.plan import Limit

if TYPE_CHECKING:
    from proxy.admission.store import Reservation

_EPS = 1e-9


class Spent:
    """What a store has counted so far, in all its keys: requests (each also a concurrency count where there
    is a cap) and tokens, taken or charged. Only grows: a `Counters` measures its room against it."""

    __slots__ = ("requests", "tokens")

    def __init__(self) -> None:
        self.requests = 0
        self.tokens = 0

    def add(self, requests: int, tokens: int) -> None:
        """Count what a path other than `Counters.take` took or charged."""
        if requests > 0:
            self.requests += requests
        if tokens > 0:
            self.tokens += tokens


class Counters:
    """The key states of one tuple of limits (all distinct keys), with their windows by dimension."""

    __slots__ = ("source", "limits", "generation", "requests", "tokens", "capped", "pending", "concurrent",
                 "merged", "spent", "flat", "since", "until", "upto_requests", "upto_tokens", "parts")

    def __init__(self, source: object, states: tuple[KeyState, ...], generation: int, spent: Spent) -> None:
        self.source = source
        """The tuple (or single limit) it was compiled for: held, so its id is not reused meanwhile."""
        self.limits: tuple[Limit, ...] = tuple(state.limit for state in states)
        """The limits as counted (after a reload, maybe newer than the ones the call carries)."""
        self.generation = generation
        self.requests = group(tuple(window for state in states for window in state.requests))
        self.tokens = group(tuple(window for state in states for window in state.tokens))
        """The windows of every key by length: windows of one unit share one index computation."""
        self.capped = tuple(state for state in states if state.concurrent is not None)
        """The keys with a concurrency cap: counted on admission, given back on release."""
        self.pending = tuple(state for state in states if state.tokens)
        """The keys that reserve tokens (their `pending` follows the reservation)."""
        self.concurrent = bool(self.capped)
        self.merged = self.concurrent and self.capped == self.pending
        """Every key both reserves tokens and has a cap (a full policy's usual shape): `finish` gives back
        the pending tokens and the concurrency in one pass over the keys."""
        self.spent = spent
        self.flat = (tuple(window for _, windows in self.requests for window in windows),
                     tuple(window for _, windows in self.tokens for window in windows))
        """The request windows and the token windows, for counting without comparing."""
        self.since = math.inf
        self.until = -math.inf
        self.upto_requests: float = -math.inf
        self.upto_tokens: float = -math.inf
        """While the clock reads from `since` to `until` and the store's `Spent` is below these, there is room
        (none before the first exact take). From `since` to `until` no window rolls: a reservation counted
        in between and settled in between gives back to the current windows (`finish`)."""
        self.parts: tuple[Counters, ...] = ()
        """Counters whose windows are among these (a `Pair`'s own and upstream ones): they share `since` and
        `until` when these are measured."""

    def take(self, now: float, tokens: int, keep: float) -> bool:
        """`KeyState.admit` for every key at once: count the request in all of them, or in none."""
        spent = self.spent
        if spent.requests < self.upto_requests and spent.tokens + tokens < self.upto_tokens \
                and self.since <= now <= self.until and keep == 1.0:
            spent.requests += 1  # room in every window and cap: count it, nothing to compare
            spent.tokens += tokens
            requests, token_windows = self.flat
            for window in requests:
                window.current += 1
            if tokens:
                for window in token_windows:
                    window.current += tokens
                if self.merged:  # every key reserves tokens and has a cap: one pass
                    for state in self.capped:
                        state.in_use += 1
                        state.pending += tokens
                    return True
                for state in self.pending:
                    state.pending += tokens
            for state in self.capped:
                state.in_use += 1
            return True
        if not self.take_exactly(now, tokens, keep):
            return False
        spent.requests += 1
        spent.tokens += tokens
        if keep == 1.0:
            self.measure(now)
        return True

    def measure(self, now: float) -> None:
        """Note the room left after an exact take at `now` (see the module's docstring)."""
        if self.tokens:
            roll_all(self.tokens, now)  # a take of no tokens left them where they were
        spent, rooms = self.spent, [room_all(self.requests)]
        rooms.extend(state.concurrent + _EPS - state.in_use for state in self.capped)  # type: ignore[operator]
        self.upto_requests = _upto(spent.requests, min(rooms))
        self.upto_tokens = _upto(spent.tokens, room_all(self.tokens))
        self.since = now
        self.until = until = min(steady_until(self.requests, now), steady_until(self.tokens, now))
        for part in self.parts:  # their windows too were rolled to `now` (room: still their own)
            part.since, part.until = now, until

    def take_exactly(self, now: float, tokens: int, keep: float) -> bool:
        """`take`, comparing every window and cap (`take_all`)."""
        for state in self.capped:  # checked and counted in one pass: given back below if a window refuses
            in_use = state.in_use + 1
            if in_use > state.concurrent * keep + _EPS:  # type: ignore[operator]
                self.uncount(state)
                return False
            state.in_use = in_use
        if not take_all(self.requests, now, 1, keep):
            self.uncount(None)
            return False
        if tokens and self.tokens:
            if not take_all(self.tokens, now, tokens, keep):
                untake(self.requests, None, 1)
                self.uncount(None)
                return False
            for state in self.pending:
                state.pending += tokens
        return True

    def uncount(self, stop: KeyState | None) -> None:
        """Undo the concurrency `take` just counted, in the keys before `stop` (None: in all of them)."""
        for state in self.capped:
            if state is stop:
                return
            state.in_use -= 1

    def adjust(self, now: float, at: float, reserved: int, requests: int, tokens: int) -> None:
        """`KeyState.adjust` for every key: the reservation's `reserved` tokens are no longer pending, and
        the differences (real minus reserved) are charged now or refunded to the windows `at` fell in."""
        if self.tokens:
            for state in self.pending:
                left = state.pending - reserved
                state.pending = left if left > 0 else 0
        self._windows(now, at, requests, tokens)

    def _windows(self, now: float, at: float, requests: int, tokens: int) -> None:
        """`adjust`'s differences in the windows (what is charged counts in the store's `Spent`)."""
        if tokens:
            adjust_all(self.tokens, now, at, tokens)
        if requests:
            adjust_all(self.requests, now, at, requests)
        self.spent.add(requests, tokens)

    def finish(self, reservation: Reservation, requests: int, tokens: int, clock: Callable[[], float]) -> None:
        """`LocalStore.finish_now` of a reservation counted in these counters (still current) and neither
        settled nor released: `adjust` with the differences (real minus reserved), then `release`. For
        `merged` counters the pending tokens and the concurrency are given back in one pass over the keys;
        the clock is read only when something changes in the windows."""
        reservation.settled = True
        reservation.released = concurrent = reservation.concurrent
        reserved = reservation.tokens
        requests -= reservation.requests
        tokens -= reserved
        if not (concurrent and self.merged):
            if requests or tokens or reserved:
                self.adjust(clock(), reservation.at, reserved, requests, tokens)
            if concurrent:
                self.release()
            return
        for state in self.capped:
            left = state.pending - reserved
            state.pending = left if left > 0 else 0
            if state.in_use > 0:
                state.in_use -= 1
        if not tokens and not requests:
            return
        now, at = clock(), reservation.at  # one instant for both
        if self.since <= at and now <= self.until and tokens <= 0 and requests <= 0:
            requests_windows, token_windows = self.flat  # no window rolled since `at`: refunds to the current
            if tokens:
                refund_current(token_windows, tokens)
            if requests:
                refund_current(requests_windows, requests)
            return
        self._windows(now, at, requests, tokens)

    def release(self) -> None:
        """Give back the concurrency `take` counted."""
        for state in self.capped:
            if state.in_use > 0:
                state.in_use -= 1


class Pair:
    """A tuple of own limits and one upstream limit, taken in one pass (`LocalStore.acquire_pair_now`):
    `both` counts them together; each reservation settles in its own part's counters."""

    __slots__ = ("own", "upstream", "both")

    def __init__(self, own: Counters, upstream: Counters, both: Counters) -> None:
        self.own = own
        self.upstream = upstream
        self.both = both
        both.parts = (own, upstream)


def _upto(mark: int, room: float) -> float:
    """What the store's `Spent` may reach, from `mark`, while `room` whole units are left (one kept spare:
    the margin makes any rounding of a fractional cap or count err towards the exact path)."""
    return mark + math.floor(room) - 1 if room < math.inf else math.inf


def distinct(states: list[KeyState]) -> bool:
    """Each key once: a tuple naming a key twice is counted key by key (the general path)."""
    return len({id(state) for state in states}) == len(states)
