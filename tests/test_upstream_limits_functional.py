"""Upstream limits (`upstreams.<name>.limits`) end to end: they count exactly the calls each upstream receives.
The proxy on loopback, fault-injecting OpenAI-compatible upstreams (resilience_helpers.Faulty) that record every
arrival, the official openai (and anthropic) SDKs as clients with their own retries off.

Covered: a pool fills a limited upstream up to its limit and sends the rest to the others; every upstream over
its limit is a 429 in the client's protocol (or, with `on_limit: queue`, a wait until capacity returns); a
concurrency limit is given back after a stream, an upstream error, a client that left mid-stream or during a
backoff; a retry to another deployment and a fallback count against the upstream they reach; an embeddings
batch counts once; explain says where the check happens."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
from aiohttp import web
from conftest import Proxy, closed_port
from kit import until
from resilience_helpers import Faulty, Servers, Step, servers_fixture
from test_batching_functional import EmbedUpstream

from proxy.admission.limits import Usage
from proxy.admission.local import LocalStore
from proxy.policy.compile import compile_plan
from proxy.policy.explain import explain
from proxy.policy.explain_text import format_text
from proxy.policy.load import load_policy

pytestmark = pytest.mark.timeout(30)

StartProxy = Callable[..., Awaitable[Proxy]]
MakeOpenAI = Callable[..., openai.AsyncOpenAI]
MESSAGES: Any = [{"role": "user", "content": "which signal is at danger?"}]
USAGE_TOTAL = 6  # what Faulty reports for a whole answer

servers = pytest.fixture(servers_fixture)


def policy(*upstreams: tuple[Faulty | str, str], routes: str, top: str = "") -> str:
    """`upstreams`: (server or base URL, its `limits` mapping or "")."""
    lines = []
    for up, limits in upstreams:
        name, url = (up.name, up.url) if isinstance(up, Faulty) else up.split("=", 1)
        extra = f", limits: {limits}" if limits else ""
        lines.append(f'  {name}: {{provider: openai, base_url: "{url}/v1"{extra}}}')
    return (
        "identify: {mode: api_key}\ntenants:\n  alpha: {keys: [sk-alpha]}\n"
        "upstreams:\n" + "\n".join(lines) + f"\n{top}routes:\n{routes}"
    )


async def create(client: openai.AsyncOpenAI, **kw: Any) -> Any:
    """A chat completion with its raw response (for the headers)."""
    return await client.chat.completions.with_raw_response.create(model="m", messages=MESSAGES, **kw)


async def usage(proxy: Proxy, key: str) -> Usage:
    (found,) = await proxy.state.admission.store.remaining([key])
    return found


async def free(proxy: Proxy, key: str) -> None:
    """The upstream's concurrency count is back to zero (it may lag the client's last byte by a moment)."""

    async def released() -> bool:
        found = (await usage(proxy, key)).concurrent
        assert found is not None
        return found[1] == 0

    await until(released)


async def requests_counted(proxy: Proxy, key: str) -> float:
    meter = (await usage(proxy, key)).requests
    assert meter is not None
    return meter.used


# --- a pool around a limited upstream ---------------------------------------------------------------------------


async def test_a_pool_fills_the_limited_upstream_up_to_its_limit_and_sends_the_rest_elsewhere(
    start_proxy: StartProxy, async_openai: MakeOpenAI, servers: Servers
) -> None:
    a, b = await servers.faulty("a"), await servers.faulty("b")
    route = "  - {name: chat, deployments: [{upstream: b, weight: 1000}, {upstream: a, weight: 0.001}]}"
    proxy = await start_proxy(policy((a, ""), (b, "{requests_per_minute: 3}"), routes=route))
    proxy.state.upstreams.rng = random.Random(7)  # b is chosen first whenever it has room
    client = async_openai(proxy)
    answers = await asyncio.gather(*(create(client) for _ in range(10)))  # nothing is rejected
    served = [r.headers["x-signalbox-deployment"] for r in answers]
    assert b.calls == 3 and served.count("b") == 3  # never more than its limit within the window...
    assert a.calls == 7 and served.count("a") == 7  # ...the excess went to a
    assert all(r.headers["x-signalbox-attempts"] == "1" for r in answers)  # skipped, not tried and failed
    counted = (await usage(proxy, "upstream:b")).requests
    assert counted is not None and counted.used == pytest.approx(3)


async def test_every_upstream_over_its_limit_is_a_429_in_the_clients_protocol(
    start_proxy: StartProxy, async_openai: MakeOpenAI, servers: Servers
) -> None:
    a, b = await servers.faulty("a"), await servers.faulty("b")
    route = "  - {name: chat, match: {model: m}, deployments: [{upstream: a}, {upstream: b}]}"
    one = "{requests_per_minute: 1}"
    proxy = await start_proxy(policy((a, one), (b, one), routes=route))
    client = async_openai(proxy)
    first, second = await create(client), await create(client)
    assert {first.headers["x-signalbox-deployment"], second.headers["x-signalbox-deployment"]} == {"a", "b"}
    with pytest.raises(openai.RateLimitError) as info:
        await create(client)
    headers = info.value.response.headers
    assert 1 <= int(headers["retry-after"]) <= 120 and 1000 <= int(headers["retry-after-ms"]) <= 120_000
    assert headers["x-ratelimit-limit-requests"] == "1" and headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-signalbox-attempts"] == "0" and "x-should-retry" not in headers
    assert info.value.code == "rate_limit_exceeded"
    assert "upstream '" in info.value.message and "1 requests per minute" in info.value.message
    async with anthropic.AsyncAnthropic(base_url=proxy.url, api_key="sk-alpha", max_retries=0) as claude:
        with pytest.raises(anthropic.RateLimitError) as refused:
            await claude.messages.create(model="m", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    assert refused.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    assert int(refused.value.response.headers["retry-after"]) >= 1
    assert a.calls == 1 and b.calls == 1
    await until(lambda: len(proxy.access_lines()) == 4)
    assert [line["error"] for line in proxy.access_lines()[2:]] == ["upstream_rate_limit"] * 2


async def test_on_limit_queue_waits_for_the_upstreams_window_then_succeeds(
    start_proxy: StartProxy, async_openai: MakeOpenAI, servers: Servers
) -> None:
    a, b = await servers.faulty("a"), await servers.faulty("b")
    top = "queues:\n  q: {max_wait: 5s}\n"
    route = "  - {name: chat, deployments: [{upstream: a}, {upstream: b}], on_limit: queue, queue: q}"
    one = "{requests_per_minute: 1}"
    proxy = await start_proxy(policy((a, one), (b, one), routes=route, top=top))
    proxy.state.admission.store = LocalStore(window=0.5)  # "per minute" lasts 0.5 s here: the test stays short
    client = async_openai(proxy)
    answers = await asyncio.gather(*(create(client) for _ in range(3)))
    assert all(r.http_response.status_code == 200 for r in answers)
    arrivals = sorted(a.arrivals + b.arrivals)
    assert len(arrivals) == 3
    assert arrivals[2] - arrivals[0] > 0.2  # the third waited in the proxy for a window to slide


async def test_on_limit_queue_waits_for_a_concurrency_slot_at_the_upstream(
    start_proxy: StartProxy, async_openai: MakeOpenAI, servers: Servers
) -> None:
    up = await servers.faulty("up")
    top = "queues:\n  q: {max_wait: 5s}\n"
    route = "  - {name: chat, upstream: up, on_limit: queue, queue: q}"
    proxy = await start_proxy(policy((up, "{concurrent: 1}"), routes=route, top=top))
    up.script(Step(stall=0.5))
    client = async_openai(proxy)
    slow = asyncio.get_running_loop().create_task(create(client))
    while up.calls == 0:  # noqa: ASYNC110 - the state lives in the server's handler
        await asyncio.sleep(0.01)
    follower = await create(client)
    assert (await slow).http_response.status_code == 200 and follower.http_response.status_code == 200
    assert up.arrivals[1] - up.arrivals[0] >= 0.45  # sent only once the first had finished


async def test_a_stream_waiting_for_upstream_capacity_gets_its_200_and_heartbeats(
    start_proxy: StartProxy, async_openai: MakeOpenAI, servers: Servers
) -> None:
    # The call waits in its queue for the upstream's capacity, and the queue's
    # heartbeat_while_queued still keeps a silent stream from being cut by a load balancer.
    up = await servers.faulty("up")
    top = "queues:\n  q: {max_wait: 5s, heartbeat_while_queued: true}\n"
    route = "  - {name: chat, upstream: up, on_limit: queue, queue: q}"
    proxy = await start_proxy(policy((up, "{concurrent: 1}"), routes=route, top=top), heartbeat=0.05)
    up.script(Step(stall=0.6))
    slow = asyncio.get_running_loop().create_task(create(async_openai(proxy)))
    while up.calls == 0:  # noqa: ASYNC110 - the state lives in the server's handler
        await asyncio.sleep(0.01)
    body = {"model": "m", "messages": MESSAGES, "stream": True}
    async with aiohttp.ClientSession() as http:
        response = await http.post(proxy.v1 + "/chat/completions", json=body,
                                   headers={"Authorization": "Bearer sk-alpha"})
        assert response.status == 200 and not slow.done()  # committed while the slot is still taken
        received = await asyncio.wait_for(response.content.read(), 5)
    beats = received.count(b": queued position=1")  # it waits in the queue, slot and limits alike
    assert beats >= 3, received[:300]
    assert received.endswith(b"data: [DONE]\n\n") and b'"finish_reason":"stop"' in received
    assert received.rindex(b": queued") < received.index(b"data: {")  # no heartbeat inside the stream
    assert (await slow).http_response.status_code == 200
    assert up.calls == 2


# --- concurrency is always given back ----------------------------------------------------------------------------


async def test_upstream_concurrency_is_released_after_streams_errors_and_clients_that_leave(
    start_proxy: StartProxy, async_openai: MakeOpenAI, servers: Servers
) -> None:
    up = await servers.faulty("up")
    route = "  - {name: chat, upstream: up, retry: {attempts: 2, max_retry_after: 5s}}"
    proxy = await start_proxy(policy((up, "{concurrent: 1, requests_per_minute: 100}"), routes=route))
    client = async_openai(proxy)
    # A stream holds the upstream's one slot until it ends: another request meanwhile is refused.
    up.script(Step(events=3, hang_after=1))
    body = {"model": "m", "messages": MESSAGES, "stream": True}
    async with aiohttp.ClientSession() as http:
        response = await http.post(proxy.v1 + "/chat/completions", json=body,
                                   headers={"Authorization": "Bearer sk-alpha"})
        assert response.status == 200
        await response.content.readany()  # the first events arrived; the upstream now hangs
        with pytest.raises(openai.RateLimitError, match="concurrency limit exceeded: upstream 'up'") as info:
            await create(client)
        assert info.value.response.headers["retry-after"] == "1"  # a hint: nobody knows when a stream ends
        response.close()  # the client leaves mid-stream
    await until(lambda: up.abandoned == 1)  # the proxy closed the upstream connection...
    await free(proxy, "upstream:up")  # ...and gave the slot back
    # A whole stream, then an upstream error that is not retried: each gives the slot back.
    stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]) == "up-0 up-1 up-2 "
    await free(proxy, "upstream:up")
    up.script(Step(400))
    with pytest.raises(openai.BadRequestError):
        await create(client)
    await free(proxy, "upstream:up")
    # A client that leaves while the proxy waits out a retry hint: the retry's reservation goes back unsent.
    up.script(Step(503, {"retry-after": "1.5"}))
    with pytest.raises(openai.APITimeoutError):
        await create(async_openai(proxy, timeout=0.4))
    await free(proxy, "upstream:up")
    raw = await create(client)  # the slot is free: the next request goes through at once
    assert raw.headers["x-signalbox-attempts"] == "1"
    # Counted: the cut stream, the whole one, the 400, the 503 and the last one; not the refused request,
    # nor the retry that never left the proxy.
    assert up.calls == 5 and await requests_counted(proxy, "upstream:up") == pytest.approx(5)


# --- retries and fallbacks count where they go ---------------------------------------------------------------------


async def test_a_retry_to_another_deployment_counts_against_the_upstream_it_reached(
    start_proxy: StartProxy, async_openai: MakeOpenAI, servers: Servers
) -> None:
    a, b = await servers.faulty("a"), await servers.faulty("b")
    dead = f"dead=http://127.0.0.1:{closed_port()}"
    limits = "{requests_per_minute: 10, tokens_per_minute: 100000, concurrent: 2}"
    route = (
        "  - {name: chat, retry: {attempts: 3}, deployments: "
        "[{upstream: dead, weight: 1000}, {upstream: a, weight: 10}, {upstream: b, weight: 0.001}]}"
    )
    proxy = await start_proxy(policy((dead, limits), (a, limits), (b, limits), routes=route))
    proxy.state.upstreams.rng = random.Random(3)
    a.script(Step(503))
    raw = await create(async_openai(proxy), max_tokens=500)
    # dead: connection refused; a: 503; b: the answer. Each upstream counted the one call it got.
    assert raw.headers["x-signalbox-deployment"] == "b" and raw.headers["x-signalbox-attempts"] == "3"
    for key, tokens in (("upstream:dead", 0), ("upstream:a", 0), ("upstream:b", USAGE_TOTAL)):
        found = await usage(proxy, key)
        assert found.requests is not None and found.requests.used == pytest.approx(1), key
        assert found.tokens is not None and found.tokens.used == pytest.approx(tokens), key  # settled per attempt
        assert found.concurrent == (2, 0), key
    assert a.calls == 1 and b.calls == 1


async def test_a_stream_settles_its_upstreams_tokens_with_the_real_usage(
    start_proxy: StartProxy, async_openai: MakeOpenAI, servers: Servers
) -> None:
    up = await servers.faulty("up")
    proxy = await start_proxy(policy((up, "{tokens_per_minute: 100000}"), routes="  - {name: chat, upstream: up}"))
    stream = await async_openai(proxy).chat.completions.create(
        model="m", messages=MESSAGES, stream=True, max_tokens=900
    )
    chunks = [chunk async for chunk in stream]
    assert all(c.usage is None for c in chunks)  # the usage chunk the proxy asked for is not relayed...

    async def settled() -> bool:
        tokens = (await usage(proxy, "upstream:up")).tokens
        assert tokens is not None
        return bool(tokens.used == pytest.approx(3 + 3))  # ...but settles the upstream's tokens, not ~900

    await until(settled)


async def test_a_fallback_route_is_counted_against_its_own_upstream(
    start_proxy: StartProxy, async_openai: MakeOpenAI, servers: Servers
) -> None:
    a, b = await servers.faulty("a"), await servers.faulty("b")
    routes = (
        "  - {name: chat, match: {model: m}, upstream: a, fallbacks: [backup]}\n"
        "  - {name: backup, match: {model: backup}, upstream: b}"
    )
    one = "{requests_per_minute: 1}"
    proxy = await start_proxy(policy((a, one), (b, one), routes=routes))
    client = async_openai(proxy)
    assert "x-signalbox-fallback" not in (await create(client)).headers
    second = await create(client)  # a is over its limit: the fallback's upstream takes it
    assert second.headers["x-signalbox-fallback"] == "backup" and second.headers["x-signalbox-deployment"] == "b"
    with pytest.raises(openai.RateLimitError):
        await create(client)
    with pytest.raises(openai.RateLimitError, match="upstream 'b'"):
        await client.chat.completions.create(model="backup", messages=MESSAGES)  # b's own route sees it too
    assert a.calls == 1 and b.calls == 1


async def test_a_call_waiting_for_capacity_counts_its_fallback_once(
    start_proxy: StartProxy, async_openai: MakeOpenAI, servers: Servers
) -> None:
    a, b = await servers.faulty("a"), await servers.faulty("b")
    top = "queues:\n  q: {max_wait: 5s}\n"
    routes = (
        "  - {name: chat, match: {model: m}, upstream: a, fallbacks: [backup], on_limit: queue, queue: q}\n"
        "  - {name: backup, match: {model: backup}, upstream: b}"
    )
    one = "{requests_per_minute: 1}"
    proxy = await start_proxy(policy((a, one), (b, one), routes=routes, top=top))
    proxy.state.admission.store = LocalStore(window=1.2)  # a and b refuse for 1.2 s: rechecked every 0.5 s
    client = async_openai(proxy)
    await create(client)
    await create(client)  # a is full: backup's b takes it (one fallback)
    waited = await create(client)  # both full: it waits in its queue for a or b, then goes where room came
    assert waited.http_response.status_code == 200
    registry = proxy.state.metrics.registry
    count = registry.get_sample_value("signalbox_fallbacks_total", {"route": "chat", "fallback": "backup"})
    went_to_backup = waited.http_response.headers.get("x-signalbox-fallback") == "backup"
    assert count == 1 + went_to_backup  # one per call that went to the fallbacks, never one per look


async def test_routes_that_reach_no_limited_upstream_pay_nothing_for_upstream_limits(
    start_proxy: StartProxy, async_openai: MakeOpenAI, servers: Servers
) -> None:
    a, b = await servers.faulty("a"), await servers.faulty("b")
    routes = (
        "  - {name: plain, match: {model: m}, upstream: a}\n"
        "  - {name: spare, match: {model: spare}, upstream: b, fallbacks: [other]}\n"
        "  - {name: other, match: {model: other}, upstream: a}"
    )
    proxy = await start_proxy(policy((a, ""), (b, "{concurrent: 3}"), routes=routes))
    plain, spare, other = proxy.state.plans.current.routes
    assert not plain.upstream_limited and plain.deployments[0].limit is None  # admission stays the no-op
    assert spare.upstream_limited and not spare.upstream_tokens and not other.upstream_limited
    raw = await create(async_openai(proxy))
    assert raw.headers["x-signalbox-attempts"] == "1"
    assert [u.key for u in await proxy.state.admission.store.remaining()] == []  # nothing was counted


# --- embeddings batches ------------------------------------------------------------------------------------------


async def test_an_embeddings_batch_is_one_call_against_the_upstreams_limit(
    start_proxy: StartProxy, async_openai: MakeOpenAI, servers: Servers
) -> None:
    embed = EmbedUpstream()  # the embeddings server of the batching tests
    app = web.Application()
    app.router.add_post("/v1/embeddings", embed.handle)
    embed.url = await servers.serve(app, handler_cancellation=True)
    route = "  - {name: emb, match: {path: /v1/embeddings}, upstream: up, batch: {max_wait: 300ms}}"
    limits = "{requests_per_minute: 2, tokens_per_minute: 100000}"
    proxy = await start_proxy(policy((f"up={embed.url}", limits), routes=route))
    client = async_openai(proxy)
    answers = await asyncio.gather(*(client.embeddings.create(model="e", input=f"text {i}") for i in range(5)))
    assert len(answers) == 5 and embed.calls == 1  # five callers, one upstream call...
    found = await usage(proxy, "upstream:up")
    assert found.requests is not None and found.requests.used == pytest.approx(1)  # ...counted once
    assert found.tokens is not None and found.tokens.used == pytest.approx(embed.usage[0])  # its real usage


# --- explain -------------------------------------------------------------------------------------------------------


def test_explain_says_upstream_limits_are_checked_per_attempt_on_the_deployments_that_reach_them(
    write_policy: Callable[..., Any],
) -> None:
    text = """
    identify: {mode: api_key}
    tenants: {alpha: {keys: [sk-alpha], limits: {requests_per_minute: 60}}}
    upstreams:
      a: {provider: openai, base_url: "http://127.0.0.1:9/v1", limits: {requests_per_minute: 100}}
      b: {provider: openai, base_url: "http://127.0.0.1:9/v1", limits: {concurrent: 4}}
      c: {provider: openai, base_url: "http://127.0.0.1:9/v1"}
    routes:
      - {name: chat, match: {model: m}, deployments: [{upstream: c}, {upstream: a, model: x}], fallbacks: [spare]}
      - {name: spare, match: {model: spare}, upstream: b}
    """
    loaded = load_policy(write_policy(text))
    answer = explain(loaded, compile_plan(loaded), model="m", tenant="alpha")
    checks = answer["limits"]["checks"]
    assert [(c["key"], c["checked"]) for c in checks] == [
        ("tenant:alpha", "admission"), ("upstream:a", "per attempt"), ("upstream:b", "per attempt"),
    ]
    assert checks[1]["deployments"] == ["a/x"] and checks[2]["deployments"] == ["b (fallback spare)"]
    assert "skipped" in answer["limits"]["upstream_limits"] and "429" in answer["limits"]["upstream_limits"]
    assert "upstream 'a' [upstream:a] (from upstream, checked per attempt on a/x): requests_per_minute=100" in (
        format_text(answer)
    )
