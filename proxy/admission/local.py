"""In-process limiter store: one `KeyState` per limit key, in a registry that outlives policy reloads.

A reload that keeps a key (`tenant:a`, `route:chat`, ...) keeps its counters and only takes the new
numbers: `reconfigure()` hands them over when the plan is swapped (before that, the spec travelling
with each acquire re-configures the state lazily).
Every method completes without suspending, so a check-and-count is atomic on the event loop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

from proxy.admission.limits import WINDOW, KeyState, Refusal, Usage, longer
from proxy.admission.store import Reservation
from proxy.policy.plan import Limit

CONCURRENCY_HINT = 1.0
"""Retry-After for a concurrency refusal: nobody knows when a request in flight will finish."""


class LocalStore:
    __slots__ = ("_clock", "_length", "_states", "_current")

    def __init__(self, clock: Callable[[], float] = time.monotonic, window: float = WINDOW) -> None:
        """`window`: the length of a minute (tests shrink it; every unit scales with it)."""
        self._clock = clock
        self._length = window
        self._states: dict[str, KeyState] = {}
        self._current: Mapping[str, Limit] | None = None
        """The active plan's limits by key, once `reconfigure` was called: from then on a request
        still holding an older plan is counted under the current numbers, never flips them back."""

    def _state(self, limit: Limit) -> KeyState:
        if self._current is not None:
            limit = self._current.get(limit.key, limit)
        state = self._states.get(limit.key)
        if state is None:
            state = self._states[limit.key] = KeyState(limit, self._length)
        elif state.limit is not limit:
            state.configure(limit)
        return state

    async def reconfigure(self, limits: Mapping[str, Limit]) -> None:
        """After a reload: counters whose key survives take the new numbers now (counts kept, so a
        lower limit bites at once and a higher one frees capacity at once); the others are dropped
        (a request still holding one releases into nothing). Never suspends."""
        self._current = dict(limits)
        for key in [k for k in self._states if k not in limits]:
            del self._states[key]
        for key, state in self._states.items():
            if state.limit is not limits[key]:
                state.configure(limits[key])

    async def try_acquire(
        self, limits: Sequence[Limit], tokens: int, *, headroom: float = 0.0
    ) -> Reservation | Refusal:
        now = self._clock()
        states = self._states
        worst: Refusal | None = None
        concurrent = False
        held: list[KeyState] = []
        for limit in limits:
            state = states.get(limit.key)
            if state is None or state.limit is not limit:
                state = self._state(limit)
            held.append(state)
            refusal = state.check(now, tokens, CONCURRENCY_HINT, headroom)
            if refusal is not None and longer(refusal, worst):
                worst = refusal
            concurrent = concurrent or state.limit.spec.concurrent is not None
        if worst is not None:
            return worst
        for state in held:
            state.take(now, tokens)
        # The limits as counted (after a reload they may be newer than the ones the call carries):
        # release() must give concurrency back exactly where take() counted it.
        counted = tuple(state.limit for state in held)
        return Reservation(counted, math.floor(now / self._length), 1, tokens, concurrent, at=now)

    async def release(self, reservation: Reservation) -> None:
        if reservation.released or not reservation.concurrent:
            return
        reservation.released = True
        for limit in reservation.limits:
            state = self._states.get(limit.key)
            if state is not None and limit.spec.concurrent is not None and state.in_use > 0:
                state.in_use -= 1

    async def settle(self, reservation: Reservation, *, requests: int, tokens: int) -> None:
        if reservation.settled:
            return
        reservation.settled = True
        d_requests, d_tokens = requests - reservation.requests, tokens - reservation.tokens
        if not d_requests and not d_tokens and not reservation.tokens:
            return
        now = self._clock()
        for limit in reservation.limits:
            state = self._states.get(limit.key)
            if state is not None:
                state.adjust(now, reservation.at, reservation.tokens, d_requests, d_tokens)

    async def remaining(self, keys: Iterable[str] | None = None) -> list[Usage]:
        now = self._clock()
        wanted = self._states.keys() if keys is None else keys
        return [self._states[key].usage(now) for key in wanted if key in self._states]
