"""The flow layer's precomputed shortcuts agree with the general path they skip (issue 13, item 7).

Each shortcut is only sound under a condition; these tests generate inputs on both sides of it and
compare the shortcut with the general definition it stands in for.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.admission import tokens as tok
from proxy.admission.local import LocalStore
from proxy.admission.store import Reservation
from proxy.flow.take import OPEN, Grant, Need, acquire_now
from proxy.policy.plan import Limit
from proxy.policy.rates import LimitSpec

_MEDIA = sorted(tok._MEDIA_PARTS)
_KEYS = st.sampled_from(["type", "text", "content", "role", "image_url", "data", "x"])
_LEAVES = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.text(max_size=6),
                    st.sampled_from(_MEDIA + ["text", "data:image/png;base64,AAAA"]))


def _part() -> st.SearchStrategy[Any]:
    media = st.builds(lambda kind, data: {"type": kind, "data": data, "source": {"data": data}},
                      st.sampled_from(_MEDIA), st.text(max_size=20))
    plain = st.dictionaries(_KEYS, _LEAVES, max_size=3)
    return st.one_of(media, plain, _LEAVES)


_TURN = st.one_of(
    st.fixed_dictionaries({"role": st.just("user"),
                           "content": st.one_of(st.text(max_size=10), st.lists(_part(), max_size=3))}),
    _LEAVES,
)
_BODY = st.fixed_dictionaries(
    {"model": st.just("m")},
    optional={"messages": st.one_of(st.lists(_TURN, max_size=3), _LEAVES),
              "input": st.one_of(st.lists(_TURN, max_size=3), st.text(max_size=8))},
)


@settings(max_examples=400, deadline=None)
@given(_BODY, st.booleans())
def test_the_prompt_estimate_skips_the_walk_only_when_it_would_find_no_media(body: dict[str, Any],
                                                                              escaped: bool) -> None:
    """`prompt_estimate` answers from the size alone when no `type` key can be in the body; the walk is
    the definition. With `escaped`, every character is written as a \\u escape (valid JSON a client may
    send): a `type` key is then invisible as plain bytes."""
    raw = json.dumps(body, ensure_ascii=True).encode() if not escaped else _escaped(body)
    assert orjson.loads(raw) == body
    assert tok.prompt_estimate(raw, body) == tok.walked_estimate(raw, body)


def _escaped(value: Any) -> bytes:
    """JSON with every string (keys included) written entirely in \\uXXXX escapes."""
    if isinstance(value, str):
        units = value.encode("utf-16-be")  # characters past U+FFFF as surrogate pairs, as JSON writes them
        return b'"' + "".join(f"\\u{units[i]:02x}{units[i + 1]:02x}" for i in range(0, len(units), 2)).encode() + b'"'
    if isinstance(value, dict):
        return b"{" + b",".join(_escaped(k) + b":" + _escaped(v) for k, v in value.items()) + b"}"
    if isinstance(value, list):
        return b"[" + b",".join(_escaped(v) for v in value) + b"]"
    return orjson.dumps(value)


def test_the_estimate_still_charges_media_written_with_escapes() -> None:
    """A media part whose `type` key arrives as \\u escapes is still charged flat, not by its size."""
    body = {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url",
                                                                     "image_url": {"url": "A" * 4000}}]}]}
    raw = _escaped(body)
    assert b'"type"' not in raw
    assert tok.prompt_estimate(raw, body) == tok.walked_estimate(raw, body)
    assert tok.prompt_estimate(raw, body) < tok.MEDIA_TOKENS + len(raw) // 4 - 500


# --- the compiled counters (grouped windows, pairs, the fresh finish) against the key-by-key path -------

_SPECS = [
    LimitSpec(requests_per_minute=6, tokens_per_minute=400, concurrent=3, requests_per_second=2),
    LimitSpec(requests_per_minute=4, tokens_per_second=90, tokens_per_hour=2000),
    LimitSpec(concurrent=2, requests_per_hour=9, tokens_per_minute=300),
]
_CAPPED = [  # every key reserves tokens and has a cap: `Counters.merged`, one pass for both at take and finish
    LimitSpec(requests_per_minute=6, tokens_per_minute=400, concurrent=3, requests_per_second=2),
    LimitSpec(concurrent=2, requests_per_hour=9, tokens_per_minute=300, tokens_per_second=90),
]
_UPSTREAM = LimitSpec(requests_per_minute=5, tokens_per_minute=350, concurrent=2)
_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("acquire"), st.integers(0, 120), st.sampled_from([0.0, 0.25]), st.sampled_from([0, 1, 7])),
        st.tuples(st.just("finish"), st.integers(0, 7), st.integers(-1, 150), st.integers(-1, 150)),
        st.tuples(st.just("wait"), st.floats(0.0, 40.0), st.just(0), st.just(0)),
    ),
    max_size=40,
)


class _Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


def _snapshot(store: LocalStore, now: float) -> list[tuple[Any, ...]]:
    """Every key's counters, each window rolled to `now` (a window rolled earlier counts the same)."""
    for state in store._states.values():
        for window in state.requests + state.tokens:
            window.roll(now)
    return [(key, state.in_use, state.pending, [(w.name, w.index, w.current, w.previous)
                                                 for w in state.requests + state.tokens])
            for key, state in sorted(store._states.items())]


def _by_keys(store: LocalStore, own: list[Limit], up: Limit, cost: int, up_cost: int, headroom: float
             ) -> tuple[Reservation, Reservation] | None:
    """The reference: own limits, then the upstream's, each key by key (a list is never compiled)."""
    first = store.acquire_now(own, cost, headroom)
    if not isinstance(first, Reservation):
        return None
    second = store.acquire_now([up], up_cost, headroom)
    if not isinstance(second, Reservation):
        store.settle_now(first, 0, 0)
        store.release_now(first)
        return None
    return first, second


@settings(max_examples=300, deadline=None)
@given(_OPS, st.booleans())
def test_the_compiled_counters_count_as_the_keys_one_by_one(ops: list[tuple[str, Any, Any, Any]], capped: bool
                                                            ) -> None:
    """A request's own limits and its upstream's are counted through compiled `Counters` (windows grouped
    by length, own and upstream in one pass when they reserve the same tokens, a fresh reservation
    finished in one pass); the reference takes them key by key (`KeyState.admit`, `settle_now` then
    `release_now`): every counter must end the same after any sequence of requests and settlements."""
    own = tuple(Limit(f"k{i}", f"scope {i}", "a", spec) for i, spec in enumerate(_CAPPED if capped else _SPECS))
    up = Limit("upstream:u", "upstream 'u'", "", _UPSTREAM)
    clock = _Clock()
    compiled, by_keys = LocalStore(clock, window=60.0), LocalStore(clock, window=60.0)
    held: list[tuple[Grant, tuple[Reservation, Reservation]]] = []
    for op, a, b, c in ops:
        if op == "wait":
            clock.now += a
        elif op == "acquire":
            up_cost = a + c if c != 1 else a  # 1: the same tokens (one pass), else other tokens (two)
            grant = acquire_now(compiled, Need(False, own, a, (up,), up_cost, b), OPEN)
            reference = _by_keys(by_keys, list(own), up, a, up_cost, b)
            assert isinstance(grant, Grant) == (reference is not None)
            if isinstance(grant, Grant) and reference is not None:
                assert grant.reservation is not None and grant.upstream is not None
                assert (grant.reservation.tokens, grant.upstream.tokens) == (reference[0].tokens, reference[1].tokens)
                held.append((grant, reference))
        elif held:
            grant, reference = held.pop(a % len(held))
            for taken, ref, spent in ((grant.reservation, reference[0], b), (grant.upstream, reference[1], c)):
                assert taken is not None
                tokens = taken.tokens if spent < 0 else spent  # -1: the estimate was right
                compiled.finish_now(taken, 1, tokens)
                by_keys.settle_now(ref, 1, tokens)
                by_keys.release_now(ref)
                compiled.finish_now(taken, 1, tokens)  # a second finish changes nothing
        assert _snapshot(compiled, clock.now) == _snapshot(by_keys, clock.now)


@pytest.mark.parametrize("headroom", [0.0, 0.25])
def test_a_reload_moves_the_compiled_windows_caps_at_once(headroom: float) -> None:
    """A window's cap is precomputed (no headroom: `take_all` compares with it): a reload that lowers or
    raises a limit must move it at once, on the compiled path as on the general one."""
    clock = _Clock()
    store = LocalStore(clock, window=60.0)
    before = Limit("tenant:a", "tenant 'a'", "a", LimitSpec(requests_per_minute=8))
    for _ in range(4):
        assert isinstance(store.acquire_now((before,), 0, headroom), Reservation)
    lower = Limit("tenant:a", "tenant 'a'", "a", LimitSpec(requests_per_minute=4))
    asyncio.run(store.reconfigure({"tenant:a": lower}))
    assert not isinstance(store.acquire_now((lower,), 0, headroom), Reservation)
    higher = Limit("tenant:a", "tenant 'a'", "a", LimitSpec(requests_per_minute=40))
    asyncio.run(store.reconfigure({"tenant:a": higher}))
    assert isinstance(store.acquire_now((higher,), 0, headroom), Reservation)
