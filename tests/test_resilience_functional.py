"""Retries, pools, circuit breakers, pacing, fallbacks, deadlines and cancellation end to end: the proxy on
loopback, fault-injecting OpenAI-compatible upstreams (resilience_helpers.Faulty), the openai SDK as the
client (its own retries off, so every retry seen here is the proxy's)."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import openai
import pytest
from conftest import Proxy, closed_port
from kit import Loopback, scrape, until
from resilience_helpers import Faulty, Servers, Step, servers_fixture

from proxy.admin import build_admin_app

pytestmark = pytest.mark.timeout(30)

StartProxy = Callable[..., Awaitable[Proxy]]
MakeOpenAI = Callable[..., openai.AsyncOpenAI]
MESSAGES: Any = [{"role": "user", "content": "which signal is at danger?"}]

servers = pytest.fixture(servers_fixture)


def upstreams(*faulty: Faulty, extra: str = "") -> str:
    lines = [f"  {f.name}: {{provider: openai, base_url: \"{f.url}/v1\"{extra}}}" for f in faulty]
    return "\n".join(lines)


def policy(upstream_lines: str, routes: str, top: str = "") -> str:
    return (
        "identify: {mode: api_key}\ntenants:\n  alpha: {keys: [sk-alpha]}\n"
        f"upstreams:\n{upstream_lines}\n{top}routes:\n{routes}"
    )


async def create(client: openai.AsyncOpenAI, **kw: Any) -> Any:
    """A chat completion with its raw response (for the headers)."""
    return await client.chat.completions.with_raw_response.create(model="m", messages=MESSAGES, **kw)


@pytest.fixture
def admin(loopback: Loopback) -> Callable[[Proxy], Awaitable[dict[str, Any]]]:
    """admin(proxy) -> GET /admin/upstreams on an admin server sharing the first proxy's runtime."""
    urls: list[str] = []

    async def get(proxy: Proxy) -> dict[str, Any]:
        if not urls:
            urls.append(await loopback.serve(build_admin_app(proxy.app, environ={"SIGNALBOX_ADMIN_TOKEN": "t"})))
        async with aiohttp.ClientSession(headers={"Authorization": "Bearer t"}) as http:
            async with http.get(urls[0] + "/admin/upstreams") as resp:
                assert resp.status == 200
                body: dict[str, Any] = await resp.json()
                return body

    return get


def by_deployment(snapshot: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {d["deployment"]: d for d in snapshot["deployments"]}


async def settle(proxy: Proxy, limit_s: float = 2.0) -> None:
    """Every handler ended and every upstream counter went back to zero."""
    deadline = time.monotonic() + limit_s
    registry = proxy.state.upstreams
    while time.monotonic() < deadline:
        busy = [d.outstanding for d in registry.deployments.values()]
        if proxy.state.in_flight == 0 and not any(busy):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"still busy: in_flight={proxy.state.in_flight} {registry.snapshot()}")


# --- retries and hints ------------------------------------------------------------------------------------


async def test_429_with_retry_after_twice_then_success_takes_three_upstream_calls(
    start_proxy: StartProxy, async_openai: MakeOpenAI, servers: Servers
) -> None:
    up = await servers.faulty("up")
    proxy = await start_proxy(policy(upstreams(up), "  - {name: chat, upstream: up, retry: {attempts: 3}}"))
    limited = Step(429, {"retry-after": "0.2"})
    for stream in (False, True):
        up.script(limited, limited)
        before = up.calls
        raw = await create(async_openai(proxy), stream=stream)
        assert raw.headers["x-signalbox-attempts"] == "3" and raw.headers["x-signalbox-deployment"] == "up"
        if stream:
            text = "".join([c.choices[0].delta.content or "" async for c in raw.parse() if c.choices])
        else:
            text = raw.parse().choices[0].message.content
        assert "up" in text
        arrivals = up.arrivals[before:]
        assert len(arrivals) == 3
        assert all(b - a >= 0.19 for a, b in zip(arrivals, arrivals[1:], strict=False))  # the hint was honoured
    line = proxy.access_lines()[-1]
    assert [a["status"] for a in line["attempts"]] == [429, 429, 200]
    assert {a["deployment"] for a in line["attempts"]} == {"up"}
    metrics = await scrape(proxy)
    assert metrics[("signalbox_upstream_retries_total", (("reason", "429"), ("route", "chat")))] == 4
    assert metrics[("signalbox_upstream_requests_total", (("deployment", "up"), ("status", "429")))] == 4
    await settle(proxy)


async def test_a_hint_over_the_cap_moves_to_the_second_deployment(
    start_proxy: StartProxy, async_openai: MakeOpenAI, servers: Servers, admin: Any
) -> None:
    first, second = await servers.faulty("first"), await servers.faulty("second")
    routes = (
        "  - name: chat\n"
        "    deployments: [{upstream: first, weight: 1000}, {upstream: second, weight: 0.001}]\n"
        "    retry: {attempts: 3, max_retry_after: 1s}\n"
    )
    proxy = await start_proxy(policy(upstreams(first, second), routes))
    # What OpenAI sends when a key's request limit is used up: retry-after and the exhausted limit's reset.
    exhausted = {"retry-after": "30", "x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "30s"}
    first.script(Step(429, exhausted))
    raw = await create(async_openai(proxy))
    assert raw.headers["x-signalbox-deployment"] == "second" and raw.headers["x-signalbox-attempts"] == "2"
    # The exhausted limit put `first` on hold (adaptive pacing): the next request goes straight to `second`.
    raw = await create(async_openai(proxy))
    assert raw.headers["x-signalbox-attempts"] == "1" and raw.headers["x-signalbox-deployment"] == "second"
    assert (first.calls, second.calls) == (1, 2)
    held = by_deployment(await admin(proxy))["first"]
    assert 25 < held["pacing_hold_s"] <= 30 and held["circuit"] == "closed"
    # A 503 with a long retry-after is not waited out either; with no other deployment it is relayed as is.
    solo = await start_proxy(
        policy(upstreams(first), "  - {name: solo, upstream: first, retry: {attempts: 3, max_retry_after: 1s}}")
    )
    first.script(Step(503, {"retry-after": "30"}))
    with pytest.raises(openai.InternalServerError) as info:
        await create(async_openai(solo))
    assert info.value.response.headers["retry-after"] == "30"
    assert info.value.response.headers["x-signalbox-attempts"] == "1"
    assert "x-should-retry" not in info.value.response.headers  # the client may honour the hint itself


async def test_connection_refused_on_one_deployment_fails_over(
    start_proxy: StartProxy, async_openai: MakeOpenAI, servers: Servers
) -> None:
    live = await servers.faulty("live")
    lines = f"  dead: {{provider: openai, base_url: \"http://127.0.0.1:{closed_port()}/v1\"}}\n" + upstreams(live)
    routes = (
        "  - name: chat\n"
        "    deployments: [{upstream: dead, weight: 1000}, {upstream: live, weight: 0.001}]\n"
        "    retry: {attempts: 2}\n"
    )
    proxy = await start_proxy(policy(lines, routes))
    for stream in (False, True):
        raw = await create(async_openai(proxy), stream=stream)
        assert raw.headers["x-signalbox-deployment"] == "live" and raw.headers["x-signalbox-attempts"] == "2"
    attempts = proxy.access_lines()[-1]["attempts"]
    assert [(a["deployment"], a["status"], a["error"]) for a in attempts] == [
        ("dead", 0, "upstream_unreachable"), ("live", 200, None)
    ]
    await settle(proxy)


# --- circuit breakers -----------------------------------------------------------------------------------


async def test_a_breaker_opens_then_requests_skip_it_then_a_probe_closes_it(
    start_proxy: StartProxy, async_openai: MakeOpenAI, servers: Servers, admin: Any
) -> None:
    bad, good = await servers.faulty("bad"), await servers.faulty("good")
    lines = upstreams(bad, extra=", breaker: {consecutive_failures: 3, cooldown: 400ms}") + "\n" + upstreams(good)
    routes = (
        "  - name: chat\n"
        "    deployments: [{upstream: bad, weight: 1000}, {upstream: good, weight: 0.001}]\n"
        "    retry: {attempts: 2}\n"
    )
    proxy = await start_proxy(policy(lines, routes))
    client = async_openai(proxy)
    bad.script(*[Step(503)] * 3)
    for _ in range(3):  # each fails on `bad`, then succeeds on `good`
        raw = await create(client)
        assert raw.headers["x-signalbox-deployment"] == "good" and raw.headers["x-signalbox-attempts"] == "2"
    gauge = ("signalbox_upstream_circuit_open", (("deployment", "bad"),))
    assert (await scrape(proxy))[gauge] == 1.0
    state = by_deployment(await admin(proxy))["bad"]
    assert state["circuit"] == "open" and state["consecutive_failures"] == 3 and 0 < state["reopens_in_s"] <= 0.4
    for _ in range(3):  # open: skipped without a call
        raw = await create(client)
        assert raw.headers["x-signalbox-deployment"] == "good" and raw.headers["x-signalbox-attempts"] == "1"
    assert bad.calls == 3
    await asyncio.sleep(0.45)
    raw = await create(client)  # the half-open probe: `bad` has recovered
    assert raw.headers["x-signalbox-deployment"] == "bad" and raw.headers["x-signalbox-attempts"] == "1"
    metrics = await scrape(proxy)
    assert metrics[gauge] == 0.0
    for to in ("open", "half_open", "closed"):
        key = ("signalbox_upstream_circuit_transitions_total", (("deployment", "bad"), ("state", to)))
        assert metrics[key] == 1.0
    assert by_deployment(await admin(proxy))["bad"]["circuit"] == "closed"


async def test_every_circuit_open_is_a_503_with_retry_after(
    start_proxy: StartProxy, async_openai: MakeOpenAI, servers: Servers
) -> None:
    up = await servers.faulty("up")
    up.default = Step(500)
    lines = upstreams(up, extra=", breaker: {consecutive_failures: 2, cooldown: 5s}")
    proxy = await start_proxy(policy(lines, "  - {name: chat, upstream: up}"))
    for _ in range(2):
        with pytest.raises(openai.InternalServerError):
            await create(async_openai(proxy))
    with pytest.raises(openai.APIStatusError) as info:
        await create(async_openai(proxy))
    assert info.value.status_code == 503 and info.value.code == "circuit_open"
    assert 4 <= int(info.value.response.headers["retry-after"]) <= 5
    assert info.value.response.headers["x-signalbox-attempts"] == "0"
    assert up.calls == 2


# --- time limits ----------------------------------------------------------------------------------------------


async def test_a_stall_before_the_first_token_triggers_a_retry(
    start_proxy: StartProxy, async_openai: MakeOpenAI, servers: Servers
) -> None:
    up = await servers.faulty("up")
    route = "  - {name: chat, upstream: up, timeouts: {first_token: 300ms}, retry: {attempts: 2, retry_on: [timeout]}}"
    proxy = await start_proxy(policy(upstreams(up), route))
    for stream in (False, True):
        up.script(Step(stall=5.0))
        raw = await create(async_openai(proxy), stream=stream)
        if stream:
            assert [c async for c in raw.parse()]
        assert raw.headers["x-signalbox-attempts"] == "2"
        attempts = proxy.access_lines()[-1]["attempts"]
        assert [(a["status"], a["error"]) for a in attempts] == [(0, "upstream_timeout"), (200, None)]
    await settle(proxy)
    await until(lambda: up.abandoned == 2)  # the stalled attempts were let go, not left running upstream


async def test_a_stall_mid_stream_ends_with_an_error_event_closes_the_upstream_and_is_not_retried(
    start_proxy: StartProxy, async_openai: MakeOpenAI, servers: Servers
) -> None:
    up = await servers.faulty("up")
    route = (
        "  - {name: chat, upstream: up, timeouts: {first_token: 2s, idle: 300ms}, "
        "retry: {attempts: 3, retry_on: [timeout, 503]}}"
    )
    proxy = await start_proxy(policy(upstreams(up), route))
    up.script(Step(events=5, hang_after=2))
    stream = await async_openai(proxy).chat.completions.create(model="m", messages=MESSAGES, stream=True)
    seen = []
    with pytest.raises(openai.APIError) as info:
        async for chunk in stream:
            seen.append(chunk)
    assert len(seen) == 3 and "idle" in info.value.message  # role chunk + 2 tokens, then the error event
    await settle(proxy)
    await until(lambda: up.abandoned == 1)  # the proxy closed the upstream connection
    assert up.calls == 1  # no retry once bytes went out
    assert proxy.access_lines()[-1]["error"] == "upstream_timeout"
    # Upstream SSE comments every 100 ms are not progress: the 300 ms idle limit still ends the stream.
    up.script(Step(events=5, hang_after=1, comments=True))
    stream = await async_openai(proxy).chat.completions.create(model="m", messages=MESSAGES, stream=True)
    with pytest.raises(openai.APIError) as info:
        async for _ in stream:
            pass
    assert "idle" in info.value.message
    await until(lambda: up.abandoned == 2)


async def test_the_deadline_stops_retries_and_the_real_error_says_do_not_retry(
    start_proxy: StartProxy, async_openai: MakeOpenAI, servers: Servers
) -> None:
    up = await servers.faulty("up")
    up.default = Step(503, {"retry-after": "0.35"})
    route = "  - {name: chat, upstream: up, timeouts: {total: 1s}, retry: {attempts: 10, max_retry_after: 1s}}"
    proxy = await start_proxy(policy(upstreams(up), route))
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError) as info:
        await create(async_openai(proxy))
    took = time.monotonic() - started
    assert took > 0.65  # attempts at 0, 0.35, 0.7; the next wait would end past the deadline
    assert all(b - a >= 0.33 for a, b in zip(up.arrivals, up.arrivals[1:], strict=False))  # each retry-after waited out
    headers = info.value.response.headers
    assert info.value.status_code == 503 and "up says 503" in info.value.message  # the real upstream error
    assert headers["x-should-retry"] == "false" and headers["x-signalbox-attempts"] == "3"
    assert up.calls == 3


async def test_a_fallback_serves_within_the_deadline_and_says_so(
    start_proxy: StartProxy, async_openai: MakeOpenAI, servers: Servers
) -> None:
    primary, backup = await servers.faulty("primary"), await servers.faulty("backup")
    slow = await servers.faulty("slow")
    primary.default = Step(503)
    slow.default = Step(stall=10.0)
    routes = (
        "  - {name: chat, match: {model: m}, upstream: primary, retry: {attempts: 2, backoff: {base: 10ms}},"
        " fallbacks: [backup-route]}\n"
        "  - {name: backup-route, match: {model: backup-only}, upstream: backup, model: backup-model}\n"
        "  - {name: doomed, match: {model: doomed}, upstream: primary, timeouts: {total: 1s},"
        " fallbacks: [slow-route]}\n"
        "  - {name: slow-route, match: {model: slow-only}, upstream: slow}\n"
    )
    proxy = await start_proxy(policy(upstreams(primary, backup, slow), routes))
    raw = await create(async_openai(proxy))
    assert raw.headers["x-signalbox-fallback"] == "backup-route"
    assert raw.headers["x-signalbox-deployment"] == "backup/backup-model"
    assert raw.headers["x-signalbox-route"] == "chat" and raw.headers["x-signalbox-attempts"] == "3"
    assert "backup" in raw.parse().choices[0].message.content
    metrics = await scrape(proxy)
    assert metrics[("signalbox_fallbacks_total", (("fallback", "backup-route"), ("route", "chat")))] == 1
    # The deadline covers the fallback too: a stalled fallback is cut at `total`, not at its first_token.
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as info:
        await async_openai(proxy).chat.completions.create(model="doomed", messages=MESSAGES)
    assert time.monotonic() - started > 0.9  # the 1 s deadline, not the 10 s stall
    assert info.value.status_code in (503, 504)  # the real error if dispatch saw the deadline first
    assert info.value.response.headers["x-should-retry"] == "false"
    await settle(proxy)
    await until(lambda: slow.abandoned == 1)


# --- budget and pacing ----------------------------------------------------------------------------------------


async def test_a_budget_refusal_relays_the_error_and_leaves_the_sdk_free_to_retry(
    start_proxy: StartProxy, async_openai: MakeOpenAI, servers: Servers
) -> None:
    up = await servers.faulty("up")
    up.script(Step(503))
    route = "  - {name: chat, upstream: up, retry: {attempts: 3, budget: {percent: 0, min_retries: 0}}}"
    proxy = await start_proxy(policy(upstreams(up), route))
    with pytest.raises(openai.InternalServerError) as info:
        await create(async_openai(proxy))
    assert up.calls == 1  # the proxy's budget allows no retry...
    assert "x-should-retry" not in info.value.response.headers  # ...but says nothing against the client's
    metrics = await scrape(proxy)
    assert metrics[("signalbox_retry_budget_exhausted_total", (("upstream", "up"),))] == 1
    up.script(Step(503))
    raw = await create(async_openai(proxy, max_retries=1))  # the SDK's own retry is a new request: it succeeds
    assert "up" in raw.parse().choices[0].message.content
    assert up.calls == 3
    await settle(proxy)


async def test_retries_waiting_out_retry_after_do_not_use_up_the_budget(
    start_proxy: StartProxy, async_openai: MakeOpenAI, servers: Servers
) -> None:
    """Every 4th upstream call is a 429 with retry-after. The budget (20 %) bounds the retries *sent* per
    request, however long each waits: 100 requests buy up to 20 retries, each of which succeeds unless it
    is itself a 4th call. (A budget on retries in flight let about 2 at a time through, each holding its
    place for the whole wait, and told every refused client not to retry.)"""
    up = await servers.faulty("up")
    up.script(*[Step(), Step(), Step(), Step(429, {"retry-after": "0.3"})] * 60)
    route = "  - {name: chat, upstream: up, retry: {attempts: 3, budget: {percent: 20, min_retries: 0}}}"
    lines = upstreams(up, extra=", breaker: {consecutive_failures: 0, failure_ratio: 0}")
    proxy = await start_proxy(policy(lines, route))
    client = async_openai(proxy)
    outcomes: list[str] = []

    async def worker() -> None:
        for _ in range(10):
            try:
                await create(client)
                outcomes.append("ok")
            except openai.RateLimitError as error:
                outcomes.append(f"429 x-should-retry={error.response.headers.get('x-should-retry')}")

    await asyncio.gather(*(worker() for _ in range(10)))
    retries = up.calls - 100
    assert 0 < retries <= 20  # 20 % of the 100 first attempts, never more
    assert up.calls // 4 - retries == outcomes.count("429 x-should-retry=None")  # each failure retried or relayed
    assert outcomes.count("ok") >= 86  # 73 without retries; the concurrency budget got about 80
    assert "429 x-should-retry=false" not in outcomes
    await settle(proxy)


async def test_the_budget_caps_retries_during_an_outage(
    start_proxy: StartProxy, async_openai: MakeOpenAI, servers: Servers
) -> None:
    up = await servers.faulty("up")
    up.default = Step(503)
    retry = "retry: {attempts: 3, backoff: {base: 10ms}, budget: {percent: 20, min_retries: 0}}"
    route = f"  - {{name: chat, upstream: up, {retry}}}"
    lines = upstreams(up, extra=", breaker: {consecutive_failures: 0, failure_ratio: 0}")  # budget alone
    proxy = await start_proxy(policy(lines, route))
    client = async_openai(proxy)
    results = await asyncio.gather(*[create(client) for _ in range(20)], return_exceptions=True)
    assert all(isinstance(r, openai.InternalServerError) for r in results)
    assert 20 < up.calls <= 20 + 4  # 20 first attempts, 20 % of them retried at most (not 2 each)
    assert not [r for r in results if r.response.headers.get("x-should-retry")]  # type: ignore[union-attr]
    await settle(proxy)


async def test_pacing_holds_dispatch_until_the_reset_when_nothing_is_left(
    start_proxy: StartProxy, async_openai: MakeOpenAI, servers: Servers
) -> None:
    up = await servers.faulty("up")
    proxy = await start_proxy(policy(upstreams(up), "  - {name: chat, upstream: up}"))
    empty = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "400ms"}
    up.script(Step(headers=empty))
    await create(async_openai(proxy))
    await create(async_openai(proxy))  # waits in the proxy for the reset, then goes
    assert up.arrivals[1] - up.arrivals[0] >= 0.38
    # A reset further away than max_retry_after (2 s): refused at once, without a call that would be a 429.
    up.script(Step(headers={**empty, "x-ratelimit-reset-requests": "1m0s"}))
    await create(async_openai(proxy))
    with pytest.raises(openai.RateLimitError) as info:
        await create(async_openai(proxy))
    assert up.calls == 3
    assert 55 <= int(info.value.response.headers["retry-after"]) <= 60
    assert info.value.response.headers["x-signalbox-attempts"] == "0"


# --- cancellation and stale connections -----------------------------------------------------------------------


async def test_client_disconnect_during_backoff_cancels_everything(
    start_proxy: StartProxy, async_openai: MakeOpenAI, servers: Servers
) -> None:
    up = await servers.faulty("up")
    top = "queues:\n  q: {concurrency: 1}\n"
    route = (
        "  - {name: chat, upstream: up, queue: q, limits: {concurrent: 1}, "
        "retry: {attempts: 3, max_retry_after: 5s}}"
    )
    proxy = await start_proxy(policy(upstreams(up), route, top))
    up.script(Step(503, {"retry-after": "1.5"}))
    with pytest.raises(openai.APITimeoutError):
        await create(async_openai(proxy, timeout=0.4))  # leaves while the proxy waits out the 1.5 s
    await settle(proxy, 1.0)  # released at once, not after the backoff
    queue = proxy.state.scheduler.queues["q"]
    assert queue.active == 0
    raw = await create(async_openai(proxy))  # the slot and the concurrency reservation are free again
    assert raw.headers["x-signalbox-attempts"] == "1"
    await asyncio.sleep(1.3)
    assert up.calls == 2  # the abandoned call was never retried
    first = proxy.access_lines()[0]
    assert first["client_gone"] is True and [a["status"] for a in first["attempts"]] == [503]


async def test_an_upstream_closing_idle_keepalive_connections_never_surfaces_an_error(
    start_proxy: StartProxy, async_openai: MakeOpenAI, servers: Servers
) -> None:
    # vLLM's uvicorn closes idle keep-alive connections after 5 s; here the server does it after 250 ms while
    # the proxy keeps idle connections for 5 s, so it keeps picking sockets the server has just closed.
    up = await servers.faulty("vllm", keepalive=0.25)
    lines = upstreams(up, extra=", pool: {keepalive: 5s}")
    proxy = await start_proxy(policy(lines, "  - {name: chat, upstream: vllm}"))  # default: no retries
    client = async_openai(proxy)
    rng = random.Random(5)
    for i in range(16):
        await asyncio.sleep(0.25 + rng.uniform(-0.02, 0.02))
        raw = await create(client, stream=i % 2 == 1)
        assert raw.status_code == 200
        if i % 2:
            assert [c async for c in raw.parse()]
    assert len(set(up.peers)) > 8  # the server really did close the idle connections
    assert all(line["status"] == 200 for line in proxy.access_lines())


async def test_a_non_stream_answer_cut_mid_body_is_retried(
    start_proxy: StartProxy, async_openai: MakeOpenAI
) -> None:
    # Nothing reached the client yet when the body broke off, so it is still safe to retry.
    proxy = await start_proxy(
        """
        identify: {mode: api_key}
        tenants:
          alpha: {keys: [sk-alpha]}
        upstreams:
          mock: {provider: mock}
        routes:
          - {name: chat, upstream: mock, retry: {attempts: 2}}
        """
    )
    drop = {"x-mock-drop-after": "0"}  # headers, then the connection closes before the body
    with pytest.raises(openai.InternalServerError) as info:
        await async_openai(proxy).chat.completions.create(model="m", messages=MESSAGES, extra_headers=drop)
    assert info.value.status_code == 502 and info.value.response.headers["x-signalbox-attempts"] == "2"
    assert [a["error"] for a in proxy.access_lines()[-1]["attempts"]] == ["upstream_unreachable"] * 2
