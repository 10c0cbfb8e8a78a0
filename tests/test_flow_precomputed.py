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
from proxy.admission.window import SlidingWindow
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
    """Every key's counters, each window as rolled to `now` (a window rolled earlier counts the same). The
    windows themselves are left as they are: a path that forgets to roll one must not be covered up here."""
    return [(key, state.in_use, state.pending, [_rolled(w, now) for w in state.requests + state.tokens])
            for key, state in sorted(store._states.items())]


def _rolled(window: SlidingWindow, now: float) -> tuple[str, int, float, float]:
    copy = SlidingWindow(window.limit, window.length, window.name)
    copy.index, copy.current, copy.previous = window.index, window.current, window.previous
    copy.roll(now)
    return copy.name, copy.index, copy.current, copy.previous


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


# --- counting without comparing while there is room (`Counters.take`'s first branch) ------------------

_ROOMY = [  # limits a few requests in a row do not reach: the room path counts them, the caps still bind
    LimitSpec(requests_per_minute=12, tokens_per_minute=900, concurrent=6),
    LimitSpec(requests_per_minute=10, tokens_per_minute=700, concurrent=5, requests_per_second=4),
    LimitSpec(requests_per_minute=14, tokens_per_hour=3000, concurrent=7),
]
_ACQUIRE = st.tuples(st.just("acquire"), st.integers(0, 3), st.one_of(st.just(0), st.integers(0, 160)),
                    st.sampled_from([0.0, 0.0, 0.25]))
_FINISH = st.tuples(st.just("finish"), st.integers(0, 9), st.one_of(st.integers(-1, 200), st.integers(300, 600)),
                    st.integers(0, 1))
_LANE_OPS = st.lists(
    st.one_of(  # mostly acquires and finishes: the caps and windows are reached with room measured before
        _ACQUIRE, _ACQUIRE, _ACQUIRE, _FINISH, _FINISH,
        st.tuples(st.just("wait"), st.sampled_from([0.0, 0.5, 1.0, 7.0, 20.0, 29.9, 30.0, 59.5, 60.0, 61.0]),
                  st.just(0), st.just(0.0)),
        st.tuples(st.just("reload"), st.integers(1, 3), st.just(0), st.just(0.0)),
    ),
    max_size=80,
)


@settings(max_examples=500, deadline=None)
@given(_LANE_OPS)
def test_counting_with_room_counts_as_the_keys_one_by_one(ops: list[tuple[str, Any, Any, Any]]) -> None:
    """Three lanes (own limits with an upstream, and own limits alone) share keys, and a list of limits is
    counted key by key beside them: a request counted in one lane uses room another lane measured, so each
    lane's room must follow what the whole store counted.
    Across window rolls (waits up to and past a minute), settlements that refund and charge, and reloads
    that lower and raise the limits, every admission and every counter must match the key-by-key path."""
    keys = [Limit(f"k{i}", f"scope {i}", "a", spec) for i, spec in enumerate(_ROOMY)]
    up = Limit("upstream:u", "upstream 'u'", "", _UPSTREAM_ROOMY)
    lanes: list[Any] = [(keys[0], keys[1]), (keys[0], keys[2]), (keys[1], keys[2], keys[0]), [keys[2], keys[0]]]
    clock = _Clock()
    compiled, by_keys = LocalStore(clock, window=60.0), LocalStore(clock, window=60.0)
    held: list[tuple[list[Reservation], list[Reservation]]] = []
    for op, a, b, c in ops:
        if op == "wait":
            clock.now += a
        elif op == "reload":  # every key scaled: counts kept, the caps move at once
            scaled = {limit.key: Limit(limit.key, limit.scope, limit.tenant, _scaled(limit.spec, a))
                      for limit in (*keys, up)}
            asyncio.run(compiled.reconfigure(scaled))
            asyncio.run(by_keys.reconfigure(scaled))
        elif op == "acquire":
            ups = (up,) if a < 2 else ()
            grant = acquire_now(compiled, Need(False, lanes[a], b, ups, b, c), OPEN)
            reference = _by_keys(by_keys, list(lanes[a]), up, b, b, c) if ups else by_keys.acquire_now(
                list(lanes[a]), b, c)
            if isinstance(reference, Reservation):
                reference = (reference,)
            assert isinstance(grant, Grant) == isinstance(reference, tuple)
            if isinstance(grant, Grant) and isinstance(reference, tuple):
                taken = [r for r in (grant.reservation, grant.upstream) if r is not None]
                held.append((taken, list(reference)))
        elif held:
            taken, reference = held.pop(a % len(held))
            for mine, ref in zip(taken, reference, strict=True):
                tokens = mine.tokens if b < 0 else b
                compiled.finish_now(mine, c, tokens)
                by_keys.settle_now(ref, c, tokens)
                by_keys.release_now(ref)
        assert _snapshot(compiled, clock.now) == _snapshot(by_keys, clock.now)


_UPSTREAM_ROOMY = LimitSpec(requests_per_minute=11, tokens_per_minute=800, concurrent=6)


def _scaled(spec: LimitSpec, factor: int) -> LimitSpec:
    """`spec` with every number of the generated specs times `factor` (1: the same numbers)."""
    numbers = {name: getattr(spec, name) for name in ("requests_per_minute", "tokens_per_minute", "concurrent",
                                                      "requests_per_second", "tokens_per_hour")}
    return LimitSpec(**{name: (value * factor if factor != 3 else max(1, value // 2))
                        for name, value in numbers.items() if value is not None})


def test_a_lane_with_room_counts_without_comparing() -> None:
    """The room path is taken (else the property test above would only exercise the exact one): after one
    exact take, a lane far from its limits has room measured, and the next request is counted by it."""
    clock = _Clock()
    store = LocalStore(clock, window=60.0)
    limits = (Limit("tenant:a", "tenant 'a'", "a", LimitSpec(requests_per_minute=100, concurrent=50)),)
    assert isinstance(store.acquire_now(limits, 0), Reservation)
    counters = store._compiled[id(limits)]
    assert counters.since == clock.now and counters.upto_requests == 1 + 49 - 1  # room 49 (the cap), one spare
    assert isinstance(store.acquire_now(limits, 0), Reservation)
    assert store._states["tenant:a"].requests[0].current == 2 and store._states["tenant:a"].in_use == 2


@pytest.mark.parametrize("concurrent", [None, 50])
def test_a_charge_at_settlement_uses_up_the_room_a_lane_measured(concurrent: int | None) -> None:
    """A settlement that charges more tokens than were reserved counts them in the windows: a lane that
    measured its room before must see it shrink (the store's `Spent`), or it admits past the limit. With a
    cap the settlement and the release are one pass (`Counters.finish`), without one `Counters.adjust`."""
    clock = _Clock()
    store = LocalStore(clock, window=60.0)
    spec = LimitSpec(requests_per_minute=100, tokens_per_minute=1000, concurrent=concurrent)
    limits = (Limit("tenant:a", "tenant 'a'", "a", spec),)
    first = store.acquire_now(limits, 100)  # exact: measures room for ~900 more tokens
    assert isinstance(first, Reservation)
    store.finish_now(first, 1, 850)  # 750 charged: 850 of 1,000 counted
    assert isinstance(store.acquire_now(limits, 100), Reservation)  # 950
    refused = store.acquire_now(limits, 100)
    assert not isinstance(refused, Reservation) and refused.dimension == "tokens"
    assert store._states["tenant:a"].tokens[0].current == 950


def test_requests_counted_key_by_key_use_up_the_room_a_lane_measured() -> None:
    """A list of limits (or a tuple naming a key twice) is counted key by key, beside the compiled lanes
    of the same keys: what it counts must shrink their room too."""
    clock = _Clock()
    store = LocalStore(clock, window=60.0)
    limit = Limit("tenant:a", "tenant 'a'", "a", LimitSpec(requests_per_minute=10))
    lane = (limit,)  # one tuple, as a plan's: compiled once
    assert isinstance(store.acquire_now(lane, 0), Reservation)  # exact: room for 9 more measured
    for _ in range(8):
        assert isinstance(store.acquire_now([limit], 0), Reservation)
    assert isinstance(store.acquire_now(lane, 0), Reservation)  # the tenth
    assert not isinstance(store.acquire_now(lane, 0), Reservation)
    assert store._states["tenant:a"].requests[0].current == 10


@pytest.mark.parametrize("settle", [True, False])
def test_a_charge_settled_key_by_key_uses_up_the_room_a_lane_measured(settle: bool) -> None:
    """The same for a charge settled key by key (`settle_now`, or `finish_now` of a reservation the
    compiled counters did not count)."""
    clock = _Clock()
    store = LocalStore(clock, window=60.0)
    limit = Limit("tenant:a", "tenant 'a'", "a", LimitSpec(requests_per_minute=100, tokens_per_minute=1000))
    lane = (limit,)
    assert isinstance(store.acquire_now(lane, 100), Reservation)  # exact: room for ~900 more tokens measured
    other = store.acquire_now([limit], 100)
    assert isinstance(other, Reservation)
    if settle:
        store.settle_now(other, 1, 800)  # 700 charged: 900 of 1,000 counted
    else:
        store.finish_now(other, 1, 800)
    assert isinstance(store.acquire_now(lane, 100), Reservation)
    assert not isinstance(store.acquire_now(lane, 100), Reservation)
    assert store._states["tenant:a"].tokens[0].current == 1000


def test_a_refund_after_another_lane_rolled_the_windows_goes_to_the_window_it_was_counted_in() -> None:
    """A pair's own and upstream counters share the interval the pair measured (no window of theirs rolls in
    it): a refund settled after that interval, once another lane has rolled the shared windows into the
    next minute, goes to the previous window, as key by key."""
    clock = _Clock()
    clock.now = 1000.0  # the minute [960, 1020)
    compiled, by_keys = LocalStore(clock, window=60.0), LocalStore(clock, window=60.0)
    key = Limit("k0", "scope 0", "a", LimitSpec(requests_per_minute=100, tokens_per_minute=10_000, concurrent=10))
    up = Limit("upstream:u", "upstream 'u'", "", LimitSpec(requests_per_minute=100, tokens_per_minute=10_000))
    lane, other = (key,), (key,)  # two tuples of a plan naming the same key
    held = []
    for _ in range(3):  # the first counts the upstream's key, the second compiles the pair, the third has room
        grant = acquire_now(compiled, Need(False, lane, 100, (up,), 100), OPEN)
        reference = _by_keys(by_keys, [key], up, 100, 100, 0.0)
        assert isinstance(grant, Grant) and reference is not None
        held.append((grant, reference))
    clock.now = 1030.0  # the next minute, inside the interval a mistaken `until` would stretch to
    assert isinstance(compiled.acquire_now(other, 0), Reservation)  # rolls the key's windows
    assert isinstance(by_keys.acquire_now([key], 0), Reservation)
    for grant, reference in held:
        for mine, ref in ((grant.reservation, reference[0]), (grant.upstream, reference[1])):
            assert mine is not None
            compiled.finish_now(mine, 1, 10)
            by_keys.settle_now(ref, 1, 10)
            by_keys.release_now(ref)
    assert _snapshot(compiled, clock.now) == _snapshot(by_keys, clock.now)
