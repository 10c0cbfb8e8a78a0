"""The counters one request touches in the in-memory store, gathered once per tuple of limits.

A `LimitSet`'s tuple (tenant, route, route per tenant) and each upstream limit are the same objects for
every request of a plan, so `LocalStore` compiles each into a `Counters` the first time it sees it: the
key states, and their windows flattened by dimension, so admitting a request is one pass over
precomputed objects (no key lookup, no per-key call, no allocation but the `Reservation`). A `Counters` is
valid for one generation of the store: anything that changes which windows or caps a key has (a reload,
a request of an older plan re-configuring a key) starts a new one and it is compiled again.
"""

from __future__ import annotations

from proxy.admission.limits import KeyState
from proxy.admission.window import adjust_all, group, take_all, untake
from proxy.policy.plan import Limit

_EPS = 1e-9


class Counters:
    """The key states of one tuple of limits (all distinct keys), with their windows by dimension."""

    __slots__ = ("source", "limits", "generation", "requests", "tokens", "capped", "pending", "concurrent",
                 "merged")

    def __init__(self, source: object, states: tuple[KeyState, ...], generation: int) -> None:
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

    def take(self, now: float, tokens: int, keep: float) -> bool:
        """`KeyState.admit` for every key at once: count the request in all of them, or in none."""
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
            if tokens:
                adjust_all(self.tokens, now, at, tokens)
        if requests:
            adjust_all(self.requests, now, at, requests)

    def finish(self, now: float, at: float, reserved: int, requests: int, tokens: int) -> None:
        """`adjust(now, at, reserved, requests, tokens)` then `release()`, for counters that are `merged`: the
        pending tokens and the concurrency given back in one pass over the keys."""
        for state in self.capped:
            left = state.pending - reserved
            state.pending = left if left > 0 else 0
            if state.in_use > 0:
                state.in_use -= 1
        if tokens:
            adjust_all(self.tokens, now, at, tokens)
        if requests:
            adjust_all(self.requests, now, at, requests)

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


def distinct(states: list[KeyState]) -> bool:
    """Each key once: a tuple naming a key twice is counted key by key (the general path)."""
    return len({id(state) for state in states}) == len(states)
