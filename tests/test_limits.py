"""Pure tests for admission maths (sliding windows, decide, headers), the in-memory limiter store
and token accounting, with a fake clock: nothing here sleeps or opens a socket."""

from __future__ import annotations

import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.admission import tokens as tok
from proxy.admission.limits import (
    Admit,
    KeyState,
    Refusal,
    Reject,
    SlidingWindow,
    WaitUntil,
    decide,
    go_duration,
    ratelimit_headers,
)
from proxy.admission.local import LocalStore
from proxy.admission.store import Reservation
from proxy.call import Attempt, Call
from proxy.errors import UpstreamLimited
from proxy.flow.upstream import UpstreamHold
from proxy.policy.plan import Limit, LimitSpec
from proxy.upstream.outgoing import wants_stream_usage


class Clock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def limit(
    key: str = "tenant:a", *, rpm: int | None = None, tpm: int | None = None, conc: int | None = None
) -> Limit:
    return Limit(key, f"scope {key}", "a", LimitSpec(rpm, tpm, conc))


# --- the sliding window ----------------------------------------------------------------------------


def test_window_admits_up_to_the_limit_then_waits_for_the_next_window() -> None:
    w = SlidingWindow(60)
    for i in range(60):
        assert w.wait(1.0 + i * 0.01, 1) == 0.0
        w.add(1.0 + i * 0.01, 1)
    # The 61st in the same window: wait until 1/60 of the next window has slid past.
    assert w.wait(2.0, 1) == pytest.approx(61.0 - 2.0)
    assert w.wait(61.0, 1) == pytest.approx(0.0, abs=1e-9)


def test_window_edge_previous_window_decays_linearly() -> None:
    w = SlidingWindow(100)
    w.add(10.0, 60)  # window 0
    assert w.used(59.999) == pytest.approx(60)
    assert w.used(60.0) == pytest.approx(60)  # window 1 starts: all of window 0 still overlaps
    assert w.used(90.0) == pytest.approx(30)  # half of it has slid out
    assert w.used(119.9) == pytest.approx(0.1, abs=1e-6)
    assert w.used(120.0) == 0  # two windows later it is forgotten
    w.add(130.0, 10)
    assert w.used(250.0) == 0


def test_window_wait_within_the_same_window_as_previous_slides_out() -> None:
    w = SlidingWindow(100)
    w.add(30.0, 80)  # window 0
    w.add(61.0, 10)  # window 1: used at 61 = 80*(59/60) + 10
    wait = w.wait(61.0, 20)
    assert wait is not None and 0 < wait < 60
    at = 61.0 + wait
    assert w.used(at) + 20 == pytest.approx(100)


def test_cost_larger_than_the_limit_never_fits() -> None:
    w = SlidingWindow(100)
    assert w.wait(0.0, 101) is None
    assert w.wait(0.0, 100) == 0.0


def test_refund_goes_back_to_the_window_that_counted_it() -> None:
    w = SlidingWindow(100)
    index = w.add(10.0, 50)
    w.refund(index, 20)
    assert w.used(10.0) == 30
    index = w.add(50.0, 40)  # window 0 -> 70
    assert w.used(70.0) == pytest.approx(70 * (50 / 60))  # now in window 1, window 0 weighted
    w.refund(index, 30)  # refunds the previous window
    assert w.used(70.0) == pytest.approx(40 * (50 / 60))
    w.refund(index - 5, 1000)  # a forgotten window: nothing happens
    assert w.used(70.0) == pytest.approx(40 * (50 / 60))
    w.refund(w.index, 1000)  # never below zero
    assert w.current == 0


def test_reset_is_the_time_until_the_window_is_empty() -> None:
    w = SlidingWindow(10)
    assert w.reset(5.0) == 0
    w.add(5.0, 1)
    assert w.reset(5.0) == pytest.approx(115.0)
    assert w.reset(70.0) == pytest.approx(50.0)


@settings(max_examples=300, deadline=None)
@given(
    adds=st.lists(st.tuples(st.floats(0, 200), st.integers(1, 50)), max_size=30),
    now=st.floats(0, 300),
    cost=st.integers(1, 100),
)
def test_wait_is_exactly_when_the_cost_fits(adds: list[tuple[float, int]], now: float, cost: int) -> None:
    """Property: after the computed wait the cost fits, and a moment before it does not."""
    w = SlidingWindow(100)
    for at, amount in sorted(adds):
        if at <= now:
            w.add(at, amount)
    wait = w.wait(now, cost)
    assert wait is not None and wait >= 0
    probe = SlidingWindow(100)
    probe.index, probe.current, probe.previous = w.index, w.current, w.previous
    assert probe.used(now + wait) + cost <= 100 + 1e-6
    if wait > 1e-3:
        early = SlidingWindow(100)
        early.index, early.current, early.previous = w.index, w.current, w.previous
        assert early.used(now + wait - 1e-3) + cost > 100 - 1e-6


# --- key state and store -----------------------------------------------------------------------------


def test_key_state_reports_the_longest_wait_and_keeps_counts_on_reconfigure() -> None:
    state = KeyState(limit(rpm=2, tpm=1000))
    state.take(1.0, 900)
    refusal = state.check(1.0, 200, 1.0)
    assert refusal is not None and refusal.dimension == "tokens"
    assert not refusal.exact  # 900 tokens are reserved but unsettled: a refund may come first
    state.adjust(1.0, 0, 900, 0, 0)  # settled at the estimate
    refusal = state.check(1.0, 200, 1.0)
    assert refusal is not None and refusal.exact and state.pending == 0
    state.take(1.0, 0)
    refusal = state.check(1.0, 50, 1.0)
    assert refusal is not None and refusal.dimension == "requests"
    state.configure(limit(rpm=10, tpm=5000))  # a reload: bigger numbers, same counts
    assert state.check(1.0, 200, 1.0) is None
    assert state.requests[0].current == 2


async def test_store_is_all_or_nothing_across_limits() -> None:
    clock = Clock(5.0)
    store = LocalStore(clock)
    tenant, route = limit("tenant:a", rpm=10), limit("route:chat", rpm=1)
    first = await store.try_acquire([tenant, route], 0)
    assert isinstance(first, Reservation) and [x.key for x in first.limits] == ["tenant:a", "route:chat"]
    second = await store.try_acquire([tenant, route], 0)
    assert isinstance(second, Refusal) and second.limit.key == "route:chat"
    (usage,) = await store.remaining(["tenant:a"])
    assert usage.requests is not None and usage.requests.used == 1  # the refused one was not counted


async def test_store_settle_refunds_or_charges_the_difference_once() -> None:
    clock = Clock(1.0)
    store = LocalStore(clock)
    lim = limit(tpm=1000)
    res = await store.try_acquire([lim], 600)
    assert isinstance(res, Reservation)
    await store.settle(res, requests=1, tokens=100)  # refund 500
    await store.settle(res, requests=1, tokens=0)  # a second settle is ignored
    (usage,) = await store.remaining()
    assert usage.tokens is not None and usage.tokens.used == pytest.approx(100)
    res2 = await store.try_acquire([lim], 100)
    assert isinstance(res2, Reservation)
    await store.settle(res2, requests=1, tokens=400)  # charge 300 more
    (usage,) = await store.remaining()
    assert usage.tokens is not None and usage.tokens.used == pytest.approx(500)
    assert usage.tokens.remaining == 500


async def test_store_settle_after_the_window_rolled_refunds_the_old_window() -> None:
    clock = Clock(50.0)
    store = LocalStore(clock)
    lim = limit(tpm=1000)
    res = await store.try_acquire([lim], 900)
    assert isinstance(res, Reservation)
    clock.now = 70.0  # next window: 900 * 50/60 = 750 still counts
    assert isinstance(await store.try_acquire([lim], 300), Refusal)
    await store.settle(res, requests=1, tokens=0)
    assert isinstance(await store.try_acquire([lim], 300), Reservation)


async def test_store_concurrency_release_is_idempotent() -> None:
    store = LocalStore(Clock())
    lim = limit(conc=1)
    held = await store.try_acquire([lim], 0)
    assert isinstance(held, Reservation) and held.concurrent
    refused = await store.try_acquire([lim], 0)
    assert isinstance(refused, Refusal) and refused.dimension == "concurrent" and not refused.exact
    await store.release(held)
    await store.release(held)
    (usage,) = await store.remaining()
    assert usage.concurrent == (1, 0)
    assert isinstance(await store.try_acquire([lim], 0), Reservation)


async def test_store_reload_reconfigures_instead_of_resetting() -> None:
    clock = Clock(1.0)
    store = LocalStore(clock)
    for _ in range(3):
        assert isinstance(await store.try_acquire([limit(rpm=3)], 0), Reservation)
    assert isinstance(await store.try_acquire([limit(rpm=3)], 0), Refusal)
    # A new plan: a new Limit object with the same key and a higher number keeps the 3 counted.
    assert isinstance(await store.try_acquire([limit(rpm=4)], 0), Reservation)
    assert isinstance(await store.try_acquire([limit(rpm=4)], 0), Refusal)


async def test_store_refuses_with_the_longest_wait_and_never_first() -> None:
    clock = Clock(1.0)
    store = LocalStore(clock)
    short, big = limit("route:r", rpm=100), limit("tenant:a", tpm=50)
    refused = await store.try_acquire([short, big], 80)
    assert isinstance(refused, Refusal) and refused.retry_after is None and refused.limit.key == "tenant:a"


# --- decide and headers ------------------------------------------------------------------------------


def _refusal(wait: float | None, exact: bool = True) -> Refusal:
    state = KeyState(limit(rpm=1))
    return Refusal(state.limit, "requests", wait, exact, state.usage(0.0))


def test_decide() -> None:
    assert decide(None, 0.0, None, 0.5) == Admit()
    assert decide(_refusal(3.0), 10.0, None, 0.5) == Reject(3.0)  # on_limit: reject
    assert decide(_refusal(3.0), 10.0, 20.0, 0.5) == WaitUntil(10.5)  # capped by the recheck
    assert decide(_refusal(0.2), 10.0, 20.0, 0.5) == WaitUntil(10.2)
    assert decide(_refusal(15.0), 10.0, 20.0, 0.5) == Reject(15.0)  # would end after the deadline
    assert decide(_refusal(None), 10.0, 20.0, 0.5) == Reject(None)  # never fits
    assert decide(_refusal(1.0, exact=False), 10.0, 10.2, 0.5) == WaitUntil(10.2)  # concurrency: poll
    assert decide(_refusal(1.0, exact=False), 10.3, 10.2, 0.5) == Reject(1.0)


def test_ratelimit_headers_use_openai_names_and_go_durations() -> None:
    state = KeyState(limit(rpm=60, tpm=1000))
    state.take(0.5, 250)
    headers = ratelimit_headers(state.usage(0.5))
    assert headers == {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "2m0s",
        "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "750",
        "x-ratelimit-reset-tokens": "2m0s",
    }
    assert go_duration(0.0123) == "13ms"
    assert go_duration(1.5) == "1.5s"
    assert go_duration(360) == "6m0s"
    assert go_duration(119.5) == "2m0s"


# --- tokens ---------------------------------------------------------------------------------------


def _call(body: dict[str, Any] | None, raw: bytes = b"", path: str = "/v1/chat/completions") -> Call:
    import orjson

    from proxy.policy.plan import IdentifySpec, Plan

    plan = Plan("d", (), IdentifySpec("api_key", "x", None), {}, {}, (), {}, 1024)
    call = Call("rid", plan, "POST", path, "openai", time.perf_counter())
    call.body = body
    call.raw_body = raw or (orjson.dumps(body) if body is not None else b"")
    call.stream = bool(body and body.get("stream"))
    return call


def test_estimate_is_body_size_plus_output() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "x" * 400}], "max_tokens": 50}
    call = _call(body)
    assert tok.estimate(call, 1024) == -(-len(call.raw_body) // 4) + 50
    body2 = {"model": "m", "messages": [], "max_completion_tokens": 7, "max_tokens": 99, "n": 3}
    assert tok.estimate(_call(body2), 1024) == -(-len(_call(body2).raw_body) // 4) + 21
    bare = b'{"model":"m","messages":[]}'
    assert tok.estimate(_call({"model": "m", "messages": []}), 300) == -(-len(bare) // 4) + 300
    embed = _call({"model": "e", "input": "hello"}, path="/v1/embeddings")
    assert tok.estimate(embed, 300) == -(-len(embed.raw_body) // 4)


BASE64 = "A" * 400_000
DATA_URL = "data:image/png;base64," + BASE64
MEDIA = [
    ("/v1/chat/completions", "messages", {"type": "image_url", "image_url": {"url": DATA_URL}}),
    ("/v1/chat/completions", "messages", {"type": "input_audio", "input_audio": {"data": BASE64, "format": "wav"}}),
    ("/v1/chat/completions", "messages", {"type": "file", "file": {"file_data": BASE64, "filename": "a.pdf"}}),
    ("/v1/responses", "input", {"type": "input_image", "image_url": DATA_URL}),
    ("/v1/responses", "input", {"type": "input_file", "file_data": BASE64, "filename": "a.pdf"}),
    ("/v1/messages", "messages", {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                            "data": BASE64}}),
    ("/v1/messages", "messages", {"type": "document", "source": {"type": "base64",
                                                               "media_type": "application/pdf", "data": BASE64}}),
]


@pytest.mark.parametrize(("path", "field", "part"), MEDIA, ids=[f"{m[0]}:{m[2]['type']}" for m in MEDIA])
def test_estimate_charges_inline_media_flat_not_by_base64_size(path: str, field: str, part: dict[str, Any]) -> None:
    """400 KB of base64 would be 100,000 tokens at 4 bytes a token: enough to refuse the request under a
    modest token limit although it costs a few hundred."""
    body = {"model": "m", field: [{"role": "user", "content": [{"type": "text", "text": "hi"}, part]}]}
    estimate = tok.estimate(_call(body, path=path), 0)
    assert tok.MEDIA_TOKENS < estimate < tok.MEDIA_TOKENS + 100


def test_used_reads_openai_and_anthropic_usage() -> None:
    assert tok.used({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}) == 7
    assert tok.used({"prompt_tokens": 3, "completion_tokens": 4}) == 7
    assert tok.used({"input_tokens": 10, "output_tokens": 5, "cache_read_input_tokens": 2}) == 17
    assert tok.used({}) is None
    assert tok.used(None) is None


def test_settle_amount() -> None:
    call = _call({"model": "m"})
    assert tok.settle_amount(call, 500) == 0  # never reached the upstream
    call.attempts.append(Attempt("u", 200, 0.1))
    call.status = 200
    assert tok.settle_amount(call, 500) == 500  # no usage (an interrupted stream): the estimate
    call.usage = {"total_tokens": 42}
    assert tok.settle_amount(call, 500) == 42
    call.usage, call.status = None, 429
    assert tok.settle_amount(call, 500) == 0  # the upstream refused it


def test_attempt_amount_settles_one_upstream_attempt_like_a_request() -> None:
    assert tok.attempt_amount(500, 200, {"total_tokens": 42}) == 42  # the real usage
    assert tok.attempt_amount(500, 200, None) == 500  # answered, no usage (a cut stream): the estimate
    assert tok.attempt_amount(500, 0, None) == 0  # no answer came (connect error, timeout)
    assert tok.attempt_amount(500, 503, None) == 0  # refused by the upstream


# --- upstream limits, per attempt ---------------------------------------------------------------------


async def test_an_upstream_hold_settles_and_releases_once() -> None:
    clock = Clock(10.0)
    store = LocalStore(clock)
    upstream = limit("upstream:u", rpm=10, tpm=1000, conc=1)
    taken = await store.try_acquire((upstream,), 300)
    assert isinstance(taken, Reservation)
    hold = UpstreamHold(store, taken)
    assert isinstance(await store.try_acquire((upstream,), 1), Refusal)  # its one slot is held
    await hold.finish(0, None)  # no answer came: the request stays counted, the tokens go back
    await hold.finish(200, {"total_tokens": 5})  # once only
    (usage,) = await store.remaining(["upstream:u"])
    assert usage.concurrent == (1, 0)
    assert usage.requests is not None and usage.requests.used == pytest.approx(1)
    assert usage.tokens is not None and usage.tokens.used == pytest.approx(0)
    unsent = await store.try_acquire((upstream,), 300)
    assert isinstance(unsent, Reservation)
    await UpstreamHold(store, unsent).finish(0, None, sent=False)  # never left the proxy: nothing counts
    (usage,) = await store.remaining(["upstream:u"])
    assert usage.requests is not None and usage.requests.used == pytest.approx(1)
    relayed = await store.try_acquire((upstream,), 300)
    assert isinstance(relayed, Reservation)
    await UpstreamHold(store, relayed).finish(200, {"total_tokens": 42})
    (usage,) = await store.remaining(["upstream:u"])
    assert usage.tokens is not None and usage.tokens.used == pytest.approx(42)


def test_the_soonest_upstream_refusal_is_the_one_waited_for() -> None:
    def refusal(wait: float | None) -> UpstreamLimited:
        return UpstreamLimited("full", retry_after=wait, exact=True, dimension="requests")

    soon, late, never = refusal(1.0), refusal(5.0), refusal(None)
    assert soon.sooner(None) and never.sooner(None)
    assert soon.sooner(late) and not late.sooner(soon)
    assert late.sooner(never) and not never.sooner(late)  # "never fits" loses to any wait
    assert never.should_retry is False and late.should_retry is None
    assert never.reason == "upstream_rate_limit"
    assert UpstreamLimited("x", retry_after=1.0, exact=False, dimension="tokens").type == "tokens"


def test_stream_usage_is_asked_only_when_the_client_did_not() -> None:
    call = _call({"model": "m", "stream": True})
    assert wants_stream_usage(call, "openai")
    assert not wants_stream_usage(call, "anthropic")  # translated streams carry their own usage
    asked = _call({"model": "m", "stream": True, "stream_options": {"include_usage": True}})
    assert not wants_stream_usage(asked, "openai")
    other = _call({"model": "m", "stream": True, "stream_options": {"include_obfuscation": False}})
    assert wants_stream_usage(other, "mock")
    assert not wants_stream_usage(_call({"model": "m"}), "openai")  # not a stream
    embed = _call({"model": "m", "stream": True}, path="/v1/embeddings")
    assert not wants_stream_usage(embed, "openai")
