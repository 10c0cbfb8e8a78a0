"""Pure glue between limits and the Redis scripts: the key layout, script arguments and replies.

A refusal is rebuilt from the state the script returns with the very `KeyState` maths the in-memory
store uses, so Retry-After and the `x-ratelimit-*` headers mean the same with either store.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from proxy.admission.limits import KeyState, Refusal, Usage
from proxy.policy.plan import Limit

CONCURRENCY_HINT = 1.0
"""Retry-After for a concurrency refusal (as the in-memory store): nobody knows when a lease frees."""
ROW = 7
"""Integers per limit in a refusal or snapshot reply: i, rc, rp, tc, tp, pending, leases."""
_EPS = 1e-9


def hash_tag(prefix: str, key: str) -> str:
    """`{prefix:key}`: every key of one limit carries it, so a Cluster keeps them in one slot."""
    return f"{{{prefix}:{key}}}"


def limit_keys(prefix: str, key: str) -> tuple[str, str]:
    """(window hash, lease set) of one limit."""
    tag = hash_tag(prefix, key)
    return f"{tag}:window", f"{tag}:leases"


@dataclass(frozen=True, slots=True)
class Prepared:
    """One limit ready for the scripts (built once per limit object, not per request)."""

    limit: Limit
    window: str
    leases: str
    rpm: int
    tpm: int
    concurrent: int


def prepare(prefix: str, limit: Limit) -> Prepared:
    spec = limit.spec
    window, leases = limit_keys(prefix, limit.key)
    numbers = (spec.requests_per_minute or 0, spec.tokens_per_minute or 0, spec.concurrent or 0)
    return Prepared(limit, window, leases, *numbers)


def acquire_call(
    prepared: Sequence[Prepared], tokens: int, lease: str, ttl_ms: int, length: float
) -> tuple[list[str], list[Any]]:
    keys: list[str] = []
    args: list[Any] = [length, tokens, lease, ttl_ms]
    for p in prepared:
        keys += (p.window, p.leases)
        args += (p.rpm, p.tpm, p.concurrent)
    return keys, args


def adjust_call(
    prepared: Sequence[Prepared],
    windows: Sequence[int],
    *,
    length: float,
    reserved: int,
    requests: int,
    tokens: int,
    lease: str,
) -> tuple[list[str], list[Any]]:
    """Settle (deltas, reserved), release (lease only) or roll back (-1 request, -reserved tokens, lease)."""
    keys: list[str] = []
    args: list[Any] = [length, reserved, requests, tokens, lease]
    for p, window in zip(prepared, windows, strict=True):
        keys += (p.window, p.leases)
        args += (window, 1 if p.rpm else 0, 1 if p.tpm else 0, 1 if p.concurrent and lease else 0)
    return keys, args


def leases_call(mode: str, ttl_ms: int, held: dict[str, list[str]]) -> tuple[list[str], list[Any]]:
    keys: list[str] = []
    args: list[Any] = [mode, ttl_ms]
    for key, ids in held.items():
        keys.append(key)
        args.append(len(ids))
        args += ids
    return keys, args


def snapshot_call(prepared: Sequence[Prepared], length: float) -> tuple[list[str], list[Any]]:
    keys: list[str] = []
    for p in prepared:
        keys += (p.window, p.leases)
    return keys, [length]


def redis_now(sec: int, usec: int) -> float:
    """Redis `TIME` as the scripts compute it (the same float operations)."""
    return int(sec) + int(usec) / 1000000


def key_state(limit: Limit, row: Sequence[int], length: float) -> KeyState:
    """A throw-away `KeyState` holding the shared counters of one limit."""
    index, rc, rp, tc, tp, pending, held = (int(x) for x in row)
    state = KeyState(limit, length)
    for window, current, previous in ((state.requests, rc, rp), (state.tokens, tc, tp)):
        if window is not None:
            window.index, window.current, window.previous = index, float(current), float(previous)
    state.in_use = held
    state.pending = pending
    return state


def refusal(prepared: Sequence[Prepared], reply: Sequence[Any], tokens: int, length: float) -> Refusal:
    """The refusal a client hears about, from an acquire reply {0, sec, usec, rows...}."""
    now = redis_now(reply[1], reply[2])
    worst: Refusal | None = None
    states = []
    for j, p in enumerate(prepared):
        state = key_state(p.limit, reply[3 + j * ROW : 3 + (j + 1) * ROW], length)
        states.append(state)
        found = state.check(now, tokens, CONCURRENCY_HINT)
        if found is not None and longer(found, worst):
            worst = found
    if worst is None:
        # Float edge: the script refused a hair's breadth from the limit; say "retry at once".
        state = states[0]
        worst = Refusal(state.limit, "requests", _EPS, False, state.usage(now))
    return worst


def snapshot(prepared: Sequence[Prepared], reply: Sequence[Any], length: float) -> list[Usage]:
    now = redis_now(reply[0], reply[1])
    return [
        key_state(p.limit, reply[2 + j * ROW : 2 + (j + 1) * ROW], length).usage(now)
        for j, p in enumerate(prepared)
    ]


def longer(refusal: Refusal, than: Refusal | None) -> bool:
    """The refusal a client should hear about: "never" first, then the longest exact wait (the order
    the in-memory store uses)."""
    if than is None or refusal.retry_after is None:
        return True
    if than.retry_after is None:
        return False
    if refusal.exact != than.exact:
        return refusal.exact
    return refusal.retry_after > than.retry_after
