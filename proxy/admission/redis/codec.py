"""Pure glue between limits and the Redis scripts: the key layout, script arguments and replies.

A refusal is rebuilt from the state the script returns with the very `KeyState` maths the in-memory
store uses, so Retry-After and the `x-ratelimit-*` headers mean the same with either store.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from proxy.admission.limits import WINDOW, KeyState, Refusal, Usage, longer
from proxy.policy.plan import Limit
from proxy.policy.rates import RATE_UNITS

CONCURRENCY_HINT = 1.0
"""Retry-After for a concurrency refusal (as the in-memory store): nobody knows when a lease frees."""
UNIT_ROW = 6
"""Integers per unit in a refusal or snapshot reply: i, rc, rp, tc, tp, pending (after one: leases held)."""
SUFFIX = {"second": "_s", "minute": "", "hour": "_h", "day": "_d"}
"""Hash field suffix per unit: none for the minute, the one unit there was before, so minute-only limits
keep the key layout of earlier versions (a rolling upgrade shares their counts)."""
_EPS = 1e-9


def hash_tag(prefix: str, key: str) -> str:
    """`{prefix:key}`: every key of one limit carries it, so a Cluster keeps them in one slot."""
    return f"{{{prefix}:{key}}}"


def limit_keys(prefix: str, key: str) -> tuple[str, str]:
    """(window hash, lease set) of one limit."""
    tag = hash_tag(prefix, key)
    return f"{tag}:window", f"{tag}:leases"


@dataclass(frozen=True, slots=True)
class Unit:
    """The windows of one limit at one unit: requests and/or tokens per that unit (0: not limited)."""

    unit: str
    suffix: str
    seconds: float
    requests: int
    tokens: int


@dataclass(frozen=True, slots=True)
class Prepared:
    """One limit ready for the scripts (built once per limit object, not per request)."""

    limit: Limit
    window: str
    leases: str
    concurrent: int
    units: tuple[Unit, ...]
    """Shortest first; only the units the limit sets."""


def prepare(prefix: str, limit: Limit) -> Prepared:
    window, leases = limit_keys(prefix, limit.key)
    rates = limit.spec.rates()
    units = []
    for unit, seconds in RATE_UNITS:
        found = {r.dimension: r.limit for r in rates if r.unit == unit}
        if found:
            units.append(Unit(unit, SUFFIX[unit], seconds, found.get("requests", 0), found.get("tokens", 0)))
    return Prepared(limit, window, leases, limit.spec.concurrent or 0, tuple(units))


def length(u: Unit, minute: float) -> float:
    """The unit's window in seconds, computed exactly as `KeyState` does (the script and the rebuilt
    state must put an instant in the same window)."""
    return u.seconds * minute / WINDOW


def _expiry_ms(p: Prepared, minute: float) -> int:
    """A window hash outlives two of its longest windows (the previous one still counts)."""
    longest = max((length(u, minute) for u in p.units), default=minute)
    return math.floor(longest * 2000) + 1000


def acquire_call(
    prepared: Sequence[Prepared], tokens: int, lease: str, ttl_ms: int, minute: float, headroom: float = 0.0
) -> tuple[list[str], list[Any]]:
    keys: list[str] = []
    args: list[Any] = [tokens, lease, ttl_ms, headroom]
    for p in prepared:
        keys += (p.window, p.leases)
        args += (p.concurrent, _expiry_ms(p, minute), len(p.units))
        for u in p.units:
            args += (u.suffix, length(u, minute), u.requests, u.tokens)
    return keys, args


def adjust_call(
    prepared: Sequence[Prepared],
    stamps: Sequence[tuple[int, int]],
    *,
    minute: float,
    reserved: int,
    requests: int,
    tokens: int,
    lease: str,
) -> tuple[list[str], list[Any]]:
    """Settle (deltas, reserved), release (lease only) or roll back (-1 request, -reserved tokens, lease);
    `stamps` are the Redis (sec, usec) each limit counted the request at."""
    keys: list[str] = []
    args: list[Any] = [reserved, requests, tokens, lease]
    for p, (sec, usec) in zip(prepared, stamps, strict=True):
        keys += (p.window, p.leases)
        args += (sec, usec, 1 if p.concurrent and lease else 0, _expiry_ms(p, minute), len(p.units))
        for u in p.units:
            args += (u.suffix, length(u, minute), 1 if u.requests else 0, 1 if u.tokens else 0)
    return keys, args


def leases_call(mode: str, ttl_ms: int, held: dict[str, list[str]]) -> tuple[list[str], list[Any]]:
    keys: list[str] = []
    args: list[Any] = [mode, ttl_ms]
    for key, ids in held.items():
        keys.append(key)
        args.append(len(ids))
        args += ids
    return keys, args


def snapshot_call(prepared: Sequence[Prepared], minute: float) -> tuple[list[str], list[Any]]:
    keys: list[str] = []
    args: list[Any] = []
    for p in prepared:
        keys += (p.window, p.leases)
        args.append(len(p.units))
        for u in p.units:
            args += (u.suffix, length(u, minute))
    return keys, args


def redis_now(sec: int, usec: int) -> float:
    """Redis `TIME` as the scripts compute it (the same float operations)."""
    return int(sec) + int(usec) / 1000000


def key_state(p: Prepared, reply: Sequence[Any], at: int, minute: float) -> tuple[KeyState, int]:
    """A throw-away `KeyState` holding the shared counters of one limit, read from `reply` at `at`; and
    where the next limit's part of the reply starts."""
    state = KeyState(p.limit, minute)
    state.in_use = int(reply[at])
    at += 1
    windows = {w.name: w for w in state.requests + state.tokens}
    for u in p.units:
        index, rc, rp, tc, tp, pending = (int(x) for x in reply[at : at + UNIT_ROW])
        at += UNIT_ROW
        for dimension, current, previous in (("requests", rc, rp), ("tokens", tc, tp)):
            window = windows.get(f"{dimension}_per_{u.unit}")
            if window is not None:
                window.index, window.current, window.previous = index, float(current), float(previous)
        if u.tokens:  # every token window counts the same reservations; the longest remembers most
            state.pending = max(state.pending, pending)
    return state, at


def refusal(
    prepared: Sequence[Prepared], reply: Sequence[Any], tokens: int, minute: float, headroom: float = 0.0
) -> Refusal:
    """The refusal a client hears about, from an acquire reply {0, sec, usec, rows...}."""
    now = redis_now(reply[1], reply[2])
    worst: Refusal | None = None
    states = []
    at = 3
    for p in prepared:
        state, at = key_state(p, reply, at, minute)
        states.append(state)
        found = state.check(now, tokens, CONCURRENCY_HINT, headroom)
        if found is not None and longer(found, worst):
            worst = found
    if worst is None:
        # Float edge: the script refused a hair's breadth from the limit; say "retry at once".
        state = states[0]
        worst = Refusal(state.limit, "requests", _EPS, False, state.usage(now), headroom=headroom)
    return worst


def snapshot(prepared: Sequence[Prepared], reply: Sequence[Any], minute: float) -> list[Usage]:
    now = redis_now(reply[0], reply[1])
    usage = []
    at = 2
    for p in prepared:
        state, at = key_state(p, reply, at, minute)
        usage.append(state.usage(now))
    return usage
