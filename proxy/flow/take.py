"""Taking capacity from the limiter store for one request, all or nothing: its own limits (tenant, route,
route per tenant) and one of its upstream limits, as `Need` says; what was taken is a `Grant`, a refusal a
`Blocked`. The gate calls this for the ticket it serves and for an arrival that finds nobody waiting.

With the in-memory store (which never suspends) everything here runs synchronously (`acquire_now`,
`give_back_now`): an admitted request creates no coroutine per limit. Other stores are awaited.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from proxy.admission.limits import Refusal
from proxy.admission.local import LocalStore
from proxy.admission.store import LimiterStore, Reservation
from proxy.policy.plan import Limit

OPEN: dict[str, Refusal] = {}
"""No limit closed: what an arrival passes to `acquire` (read only, never written)."""


@dataclass(slots=True)
class Need:
    """What one request must find free to leave the queue."""

    slot: bool
    limits: tuple[Limit, ...] = ()
    """Its own limits (tenant, route, per tenant), counted with `cost` tokens."""
    cost: int = 0
    upstreams: tuple[Limit, ...] = ()
    """One of these upstream limits must admit (the route's deployments); empty: none to check."""
    upstream_cost: int = 0
    headroom: float = 0.0
    """Share of each shared budget this class must leave for the classes above it (queue `reserve`)."""


@dataclass(slots=True)
class Grant:
    """What a ticket was given: hand it back once (`Gate.release`, the admission settle)."""

    slot: bool = False
    reservation: Reservation | None = None
    upstream: Reservation | None = None
    upstream_limit: Limit | None = None
    waited: float = 0.0


@dataclass(slots=True)
class Blocked:
    """A ticket could not be served: the refusal, and every key it closes for this pass."""

    refusal: Refusal
    keys: list[str] = field(default_factory=list)


async def acquire(store: LimiterStore | None, need: Need, closed: dict[str, Refusal]) -> Grant | Blocked:
    """Take everything `need` asks of the limiter store at once, or nothing (what was taken is given back)."""
    if store is None or isinstance(store, LocalStore):
        return acquire_now(store, need, closed)
    grant = Grant()
    if need.limits:
        taken = await store.try_acquire(need.limits, need.cost, headroom=need.headroom)
        if not isinstance(taken, Reservation):
            return Blocked(taken, [taken.limit.key])
        grant.reservation = taken
    if not need.upstreams:
        return grant
    first: Refusal | None = None
    keys: list[str] = []
    for limit in need.upstreams:
        if limit.key in closed:
            first = first or closed[limit.key]
            continue
        held = await store.try_acquire((limit,), _upstream_cost(need, limit), headroom=need.headroom)
        if isinstance(held, Reservation):
            grant.upstream, grant.upstream_limit = held, limit
            return grant
        keys.append(limit.key)
        first = _sooner(held, first)
    await give_back(store, grant)
    assert first is not None
    return Blocked(first, keys)


def acquire_now(store: LocalStore | None, need: Need, closed: dict[str, Refusal]) -> Grant | Blocked:
    """`acquire` from the in-memory store, which never suspends: no coroutine per limit."""
    taken: Reservation | None = None
    upstreams = need.upstreams
    if need.limits:
        assert store is not None
        # A route with one deployment: its own limits and that upstream's in one pass, when both count the
        # same tokens (or the upstream none) and nothing closed the upstream's key; None: one by one.
        one = upstreams[0] if len(upstreams) == 1 else None
        if one is not None and (need.upstream_cost == need.cost or not one.spec.counts_tokens) \
                and one.key not in closed:
            both = store.acquire_pair_now(need.limits, one, need.cost, need.headroom)
            if both is not None:
                return Grant(False, both[0], both[1], one)
        own = store.acquire_now(need.limits, need.cost, need.headroom)
        if not isinstance(own, Reservation):
            return Blocked(own, [own.limit.key])
        taken = own
    if not upstreams:
        return Grant(False, taken)
    assert store is not None
    first: Refusal | None = None
    keys: list[str] = []
    for limit in upstreams:
        if limit.key in closed:
            first = first or closed[limit.key]
            continue
        held = store.acquire_limit_now(limit, _upstream_cost(need, limit), need.headroom)
        if isinstance(held, Reservation):
            return Grant(False, taken, held, limit)
        keys.append(limit.key)
        first = _sooner(held, first)
    give_back_now(store, Grant(False, taken))
    assert first is not None
    return Blocked(first, keys)




def _upstream_cost(need: Need, limit: Limit) -> int:
    return need.upstream_cost if limit.spec.counts_tokens else 0


def _sooner(refusal: Refusal, than: Refusal | None) -> Refusal:
    """Of two upstream refusals, the one that frees first (the call may go to whichever does)."""
    if than is None or (refusal.retry_after or 0.0) < (than.retry_after or math.inf):
        return refusal
    return than


async def give_back(store: LimiterStore | None, grant: Grant) -> None:
    """Undo a grant nobody used: nothing was sent, so nothing counts."""
    if store is None or isinstance(store, LocalStore):
        give_back_now(store, grant)
        return
    for reservation in (grant.reservation, grant.upstream):
        if reservation is not None:
            await store.finish(reservation, requests=0, tokens=0)
    grant.reservation = grant.upstream = None


def give_back_now(store: LocalStore | None, grant: Grant) -> None:
    """`give_back` to the in-memory store."""
    for reservation in (grant.reservation, grant.upstream):
        if reservation is not None and store is not None:
            store.finish_now(reservation, 0, 0)
    grant.reservation = grant.upstream = None


__all__ = ["OPEN", "Blocked", "Grant", "Need", "acquire", "acquire_now", "give_back", "give_back_now"]
