"""In-process limiter store: one `KeyState` per limit key, in a registry that outlives policy reloads.

A reload that keeps a key (`tenant:a`, `route:chat`, ...) keeps its counters and only takes the new
numbers: the spec travels with each acquire and the state re-configures itself when it changed.
Every method completes without suspending, so a check-and-count is atomic on the event loop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence

from proxy.admission.limits import WINDOW, KeyState, Refusal, Usage
from proxy.admission.store import Reservation
from proxy.policy.plan import Limit

CONCURRENCY_HINT = 1.0
"""Retry-After for a concurrency refusal: nobody knows when a request in flight will finish."""


class LocalStore:
    __slots__ = ("_clock", "_length", "_states")

    def __init__(self, clock: Callable[[], float] = time.monotonic, window: float = WINDOW) -> None:
        self._clock = clock
        self._length = window
        self._states: dict[str, KeyState] = {}

    def _state(self, limit: Limit) -> KeyState:
        state = self._states.get(limit.key)
        if state is None:
            state = self._states[limit.key] = KeyState(limit, self._length)
        elif state.limit is not limit:
            state.configure(limit)
        return state

    async def try_acquire(self, limits: Sequence[Limit], tokens: int) -> Reservation | Refusal:
        now = self._clock()
        states = self._states
        worst: Refusal | None = None
        concurrent = False
        for limit in limits:
            state = states.get(limit.key)
            if state is None or state.limit is not limit:
                state = self._state(limit)
            refusal = state.check(now, tokens, CONCURRENCY_HINT)
            if refusal is not None and _longer(refusal, worst):
                worst = refusal
            concurrent = concurrent or limit.spec.concurrent is not None
        if worst is not None:
            return worst
        for limit in limits:
            states[limit.key].take(now, tokens)
        return Reservation(tuple(limits), math.floor(now / self._length), 1, tokens, concurrent)

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
                state.adjust(now, reservation.window, reservation.tokens, d_requests, d_tokens)

    async def remaining(self, keys: Iterable[str] | None = None) -> list[Usage]:
        now = self._clock()
        wanted = self._states.keys() if keys is None else keys
        return [self._states[key].usage(now) for key in wanted if key in self._states]


def _longer(refusal: Refusal, than: Refusal | None) -> bool:
    """The refusal a client should hear about: "never" first, then the longest exact wait."""
    if than is None or refusal.retry_after is None:
        return True
    if than.retry_after is None:
        return False
    if refusal.exact != than.exact:
        return refusal.exact
    return refusal.retry_after > than.retry_after
