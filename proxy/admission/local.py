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

from proxy.admission.counters import Counters, Pair, Spent, distinct
from proxy.admission.limits import WINDOW, KeyState, Refusal, Usage, longer
from proxy.admission.store import Reservation
from proxy.policy.plan import Limit

CONCURRENCY_HINT = 1.0
"""Retry-After for a concurrency refusal: nobody knows when a request in flight will finish."""
_COMPILED = 4096
"""At most this many compiled tuples (one per limit set and upstream limit of the plans in use)."""


class LocalStore:
    __slots__ = ("_clock", "_length", "_states", "_current", "_compiled", "_pairs", "_generation", "_spent")

    def __init__(self, clock: Callable[[], float] = time.monotonic, window: float = WINDOW) -> None:
        """`window`: the length of a minute (tests shrink it; every unit scales with it)."""
        self._clock = clock
        self._length = window
        self._states: dict[str, KeyState] = {}
        self._current: Mapping[str, Limit] | None = None
        """The active plan's limits by key, once `reconfigure` was called: from then on a request
        still holding an older plan is counted under the current numbers, never flips them back."""
        self._compiled: dict[int, Counters] = {}
        """`Counters` by the id of the tuple (or single limit) they were compiled for (a tuple that names
        a key twice has none: it is counted key by key)."""
        self._pairs: dict[tuple[int, int], Pair] = {}
        """`Pair`s by the ids of their own limits' tuple and their upstream limit."""
        self._generation = 0
        """Bumped whenever a key's windows, caps or numbers change: older `Counters` are compiled again."""
        self._spent = Spent()
        """Every request and token counted in any key, by any path: what compiled counters measure room by."""

    def _state(self, limit: Limit) -> KeyState:
        if self._current is not None:
            limit = self._current.get(limit.key, limit)
        state = self._states.get(limit.key)
        if state is None:
            state = self._states[limit.key] = KeyState(limit, self._length)
        elif state.limit is not limit:
            state.configure(limit)
            self._generation += 1
        return state

    def _counters(self, source: Sequence[Limit] | Limit) -> Counters | None:
        """The compiled counters of `source` (a stable tuple of a plan, or one limit), compiled now if
        they are missing or out of date."""
        counters = self._compiled.get(id(source))
        if counters is not None and counters.generation == self._generation:
            return counters  # (it holds `source`: no other object has that id meanwhile)
        limits = (source,) if isinstance(source, Limit) else source
        states = [self._state(limit) for limit in limits]
        if not distinct(states):
            return None
        if len(self._compiled) >= _COMPILED:
            self._compiled.clear()
        counters = self._compiled[id(source)] = Counters(source, tuple(states), self._generation, self._spent)
        return counters

    def _pair(self, limits: tuple[Limit, ...], upstream: Limit) -> Pair | None:
        """The `Pair` of `limits` and `upstream` compiled now (`acquire_pair_now` found none current); None when
        a key is named twice."""
        if upstream.key not in self._states:
            return None  # its counters appear once a request of its own is counted in them, not before
        own, alone = self._counters(limits), self._counters(upstream)
        states = [self._state(limit) for limit in (*limits, upstream)]
        if own is None or alone is None or own.generation != self._generation or not distinct(states):
            return None  # (a key re-configured meanwhile: compiled again next time)
        if len(self._pairs) >= _COMPILED:
            self._pairs.clear()
        both = Counters((limits, upstream), tuple(states), self._generation,
                        self._spent)
        pair = self._pairs[id(limits), id(upstream)] = Pair(own, alone, both)
        return pair

    async def reconfigure(self, limits: Mapping[str, Limit]) -> None:
        """After a reload: counters whose key survives take the new numbers now (counts kept, so a
        lower limit bites at once and a higher one frees capacity at once); the others are dropped
        (a request still holding one releases into nothing). Never suspends."""
        self._current = dict(limits)
        self._generation += 1
        self._compiled.clear()  # the previous plan's tuples: compiled again for the ones still in use
        self._pairs.clear()
        for key in [k for k in self._states if k not in limits]:
            del self._states[key]
        for key, state in self._states.items():
            if state.limit is not limits[key]:
                state.configure(limits[key])

    async def try_acquire(
        self, limits: Sequence[Limit], tokens: int, *, headroom: float = 0.0
    ) -> Reservation | Refusal:
        return self.acquire_now(limits, tokens, headroom)

    async def release(self, reservation: Reservation) -> None:
        self.release_now(reservation)

    async def settle(self, reservation: Reservation, *, requests: int, tokens: int) -> None:
        self.settle_now(reservation, requests, tokens)

    async def finish(self, reservation: Reservation, *, requests: int, tokens: int) -> None:
        self.finish_now(reservation, requests, tokens)

    # The same, synchronous: the flow layer calls these directly when the store is this one, so an
    # admitted request creates no coroutine for its limits (the in-memory store never suspends anyway).

    def acquire_now(self, limits: Sequence[Limit], tokens: int, headroom: float = 0.0) -> Reservation | Refusal:
        """`try_acquire`, without the coroutine. `limits` should be a tuple that lives as long as its plan
        (a `LimitSet`'s): its counters are compiled once (`acquire_limit_now` for a single limit)."""
        counters = self._counters(limits) if type(limits) is tuple else None
        if counters is None:
            return self._acquire_keys(limits, tokens, headroom)
        now = self._clock()
        if not counters.take(now, tokens, 1.0 - headroom):
            return self._refusal(limits, now, tokens, headroom)
        return Reservation(counters.limits, math.floor(now / self._length), 1, tokens, counters.concurrent,
                           False, False, now, counters)

    def acquire_limit_now(self, limit: Limit, tokens: int, headroom: float = 0.0) -> Reservation | Refusal:
        """`acquire_now((limit,), ...)` for one limit of a plan (an upstream's), compiled once."""
        counters = self._counters(limit)
        if counters is None:
            return self._acquire_keys((limit,), tokens, headroom)
        now = self._clock()
        if not counters.take(now, tokens, 1.0 - headroom):
            return self._refusal(counters.limits, now, tokens, headroom)
        return Reservation(counters.limits, math.floor(now / self._length), 1, tokens, counters.concurrent,
                           False, False, now, counters)

    def acquire_pair_now(self, limits: tuple[Limit, ...], upstream: Limit, tokens: int, headroom: float = 0.0
                         ) -> tuple[Reservation, Reservation] | None:
        """`acquire_now(limits, tokens, headroom)` and `acquire_limit_now(upstream, tokens, headroom)` in one
        pass, both or neither: the own and the upstream reservation (each settles on its own). None, with
        nothing counted, when one would refuse: taken one by one, they say which and why. `upstream` counts
        `tokens` too, or has no token windows (what it would count is 0 then)."""
        pair = self._pairs.get((id(limits), id(upstream)))  # (it holds both: their ids are not reused meanwhile)
        if pair is None or pair.both.generation != self._generation:
            pair = self._pair(limits, upstream)
            if pair is None:
                return None
        now = self._clock()
        if not pair.both.take(now, tokens, 1.0 - headroom):
            return None
        own, alone = pair.own, pair.upstream
        window = math.floor(now / self._length)
        return (Reservation(own.limits, window, 1, tokens, own.concurrent, False, False, now, own),
                Reservation(alone.limits, window, 1, tokens if alone.tokens else 0, alone.concurrent, False, False,
                            now, alone))

    def _acquire_keys(self, limits: Sequence[Limit], tokens: int, headroom: float) -> Reservation | Refusal:
        """The general path, key by key (a tuple that names a key twice)."""
        now = self._clock()
        keep = 1.0 - headroom
        states = self._states
        held: list[KeyState] = []
        concurrent = newer = False
        for limit in limits:
            state = states.get(limit.key)
            if state is None or state.limit is not limit:
                state = self._state(limit)
                newer = newer or state.limit is not limit
            if not state.admit(now, tokens, keep):  # counted where it fits; undone once one refuses
                for taken in held:
                    taken.unadmit(tokens)
                return self._refusal(limits, now, tokens, headroom)
            held.append(state)
            concurrent = concurrent or state.concurrent is not None
        self._spent.add(1, tokens)
        # The limits as counted (after a reload they may be newer than the ones the call carries):
        # release() must give concurrency back exactly where take() counted it.
        counted = tuple(state.limit for state in held) if newer or not isinstance(limits, tuple) else limits
        return Reservation(counted, math.floor(now / self._length), 1, tokens, concurrent, False, False, now)

    def _refusal(self, limits: Sequence[Limit], now: float, tokens: int, headroom: float) -> Refusal:
        """The refusal with the longest wait among `limits` (one of them refused)."""
        worst: Refusal | None = None
        for limit in limits:
            refusal = self._state(limit).check(now, tokens, CONCURRENCY_HINT, headroom)
            if refusal is not None and longer(refusal, worst):
                worst = refusal
        assert worst is not None
        return worst

    def finish_now(self, reservation: Reservation, requests: int, tokens: int) -> None:
        """`finish`, without the coroutine: settle and release in one pass over the keys."""
        counters = reservation.counters
        if counters is not None and counters.generation == self._generation and not reservation.settled \
                and not reservation.released:
            # The usual case, neither settled nor released yet, into counters still current: what the
            # general path below decides for it, without its bookkeeping.
            counters.finish(reservation, requests, tokens, self._clock)
            return
        self._finish_general(reservation, requests, tokens)

    def _finish_general(self, reservation: Reservation, requests: int, tokens: int) -> None:
        """`finish_now` for any reservation: settled or released before, or counted before a reload."""
        settle = not reservation.settled
        reservation.settled = True
        d_requests, d_tokens = requests - reservation.requests, tokens - reservation.tokens
        settle = settle and bool(d_requests or d_tokens or reservation.tokens)
        release = reservation.concurrent and not reservation.released
        reservation.released = reservation.released or reservation.concurrent
        if not settle and not release:
            return
        now = self._clock() if settle else 0.0
        counters = reservation.counters
        if counters is not None and counters.generation == self._generation:
            if settle:
                counters.adjust(now, reservation.at, reservation.tokens, d_requests, d_tokens)
            if release:
                counters.release()
            return
        self._finish_keys(reservation, now, settle, release, d_requests, d_tokens)

    def _finish_keys(self, reservation: Reservation, now: float, settle: bool, release: bool, d_requests: int,
                     d_tokens: int) -> None:
        """`finish_now` key by key, by name: a reservation counted before a reload (or key by key)."""
        states = self._states
        if settle:
            self._spent.add(d_requests, d_tokens)
        for limit in reservation.limits:
            state = states.get(limit.key)
            if state is None:
                continue
            if settle:
                state.adjust(now, reservation.at, reservation.tokens, d_requests, d_tokens)
            if release and limit.spec.concurrent is not None and state.in_use > 0:
                state.in_use -= 1

    def release_now(self, reservation: Reservation) -> None:
        """`release`, without the coroutine."""
        if reservation.released or not reservation.concurrent:
            return
        reservation.released = True
        counters = reservation.counters
        if counters is not None and counters.generation == self._generation:
            counters.release()
            return
        states = self._states
        for limit in reservation.limits:
            state = states.get(limit.key)
            if state is not None and limit.spec.concurrent is not None and state.in_use > 0:
                state.in_use -= 1

    def settle_now(self, reservation: Reservation, requests: int, tokens: int) -> None:
        """`settle`, without the coroutine."""
        if reservation.settled:
            return
        reservation.settled = True
        d_requests, d_tokens = requests - reservation.requests, tokens - reservation.tokens
        if not d_requests and not d_tokens and not reservation.tokens:
            return
        now = self._clock()
        counters = reservation.counters
        if counters is not None and counters.generation == self._generation:
            counters.adjust(now, reservation.at, reservation.tokens, d_requests, d_tokens)
            return
        states = self._states
        self._spent.add(d_requests, d_tokens)
        for limit in reservation.limits:
            state = states.get(limit.key)
            if state is not None:
                state.adjust(now, reservation.at, reservation.tokens, d_requests, d_tokens)

    async def remaining(self, keys: Iterable[str] | None = None) -> list[Usage]:
        now = self._clock()
        wanted = self._states.keys() if keys is None else keys
        return [self._states[key].usage(now) for key in wanted if key in self._states]
