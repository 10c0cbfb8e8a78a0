"""Limits, queues and token accounting end to end: the proxy on loopback, the official openai SDK as the
client, and a gated upstream that holds requests until the test lets them go (so slots stay busy
exactly as long as a test needs) and reports token usage like OpenAI does."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web
from conftest import EchoUpstream, Proxy, Reply
from kit import Loopback, until

pytestmark = pytest.mark.timeout(30)

StartProxy = Callable[..., Awaitable[Proxy]]
MakeAsync = Callable[..., openai.AsyncOpenAI]
PROMPT, COMPLETION = 20, 10


@dataclass
class Gated:
    """An OpenAI-like upstream that records bodies in arrival order and, when `hold` is set, keeps each
    request waiting until `release()`."""

    url: str = ""
    hold: bool = False
    drop_stream: bool = False
    fail: bool = False
    seen: list[dict[str, Any]] = field(default_factory=list)
    done: int = 0
    gate: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(0))

    def release(self, n: int = 1) -> None:
        for _ in range(n):
            self.gate.release()

    def users(self) -> list[str]:
        return [body.get("user", "") for body in self.seen]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.seen.append(body)
        if self.hold:
            await self.gate.acquire()
        if self.fail:
            error = {"message": "the model is overloaded", "type": "server_error", "code": None}
            return web.json_response({"error": error}, status=500)
        usage = {"prompt_tokens": PROMPT, "completion_tokens": COMPLETION}
        usage["total_tokens"] = PROMPT + COMPLETION
        base = {"id": "chatcmpl-1", "created": 1, "model": body["model"]}
        if not body.get("stream"):
            self.done += 1
            message = {"role": "assistant", "content": "Hello"}
            choice = {"index": 0, "message": message, "finish_reason": "stop", "logprobs": None}
            answer = {**base, "object": "chat.completion", "choices": [choice], "usage": usage}
            return web.json_response(answer)
        include = (body.get("stream_options") or {}).get("include_usage") is True
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for text, finish in (("Hel", None), ("lo", None), (None, "stop")):
            delta = {"content": text} if text else {}
            chunk: dict[str, Any] = {
                **base, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            if include:
                chunk["usage"] = None
            await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
            if self.drop_stream:
                return response  # ends the body without [DONE] and without usage
        if include:
            last = {**base, "object": "chat.completion.chunk", "choices": [], "usage": usage}
            await response.write(b"data: " + orjson.dumps(last) + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        self.done += 1
        return response


@pytest.fixture
async def gated(loopback: Loopback) -> AsyncIterator[Gated]:
    upstream = Gated()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", upstream.handle)
    upstream.url = await loopback.serve(app, handler_cancellation=True)
    yield upstream
    upstream.release(1000)  # before `loopback` stops the server: no handler left waiting


def policy(
    upstream: Gated, *, tenants: str = "", route: str = "", queue: str = "", upstream_extra: str = ""
) -> str:
    """The test policy; `queue` holds `key: value` overrides of the chat queue's defaults."""
    fields = {"concurrency": "1", "max_waiting": "100", "max_wait": "5s"}
    fields |= dict(item.split(": ", 1) for item in queue.split(", ") if item)
    queue_text = ", ".join(f"{k}: {v}" for k, v in fields.items())
    return f"""
priorities: [critical, standard, batch]
upstreams:
  up:
    provider: openai
    base_url: {upstream.url}/v1
    api_key: sk-up
    {upstream_extra}
tenants:
  alpha: {{keys: [sk-alpha], max_priority: critical {tenants and ', ' + tenants}}}
  beta: {{keys: [sk-beta]}}
queues:
  chat: {{{queue_text}}}
routes:
  - name: chat
    match: {{path: /v1/chat/completions}}
    upstream: up
    {route}
"""


def chat(client: openai.AsyncOpenAI, user: str = "", **kwargs: Any) -> Awaitable[Any]:
    kwargs.setdefault("max_tokens", 50)
    return client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Hi"}], user=user, **kwargs
    )


def start(coro: Awaitable[Any]) -> asyncio.Task[Any]:
    async def run() -> Any:
        return await coro

    return asyncio.get_running_loop().create_task(run())


def waiting(proxy: Proxy, name: str = "chat") -> int:
    queue = proxy.state.scheduler.queues.get(name)
    return len(queue.board) if queue is not None else 0


async def usage_of(proxy: Proxy, key: str) -> Any:
    (usage,) = await proxy.state.admission.store.remaining([key])
    return usage


# --- rate limits ------------------------------------------------------------------------------------


async def test_the_61st_request_in_a_minute_gets_a_rate_limit_error_with_retry_after(
    start_proxy: StartProxy, async_openai: MakeAsync, gated: Gated
) -> None:
    proxy = await start_proxy(policy(gated, tenants="limits: {requests_per_minute: 60}"))
    alpha = async_openai(proxy)
    for _ in range(60):
        await chat(alpha)
    with pytest.raises(openai.RateLimitError) as caught:
        await chat(alpha)
    error = caught.value
    headers = error.response.headers
    assert 1 <= int(headers["retry-after"]) <= 60
    assert 1000 <= int(headers["retry-after-ms"]) <= 60_000
    assert headers["x-ratelimit-limit-requests"] == "60"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"].endswith("s")
    assert "x-should-retry" not in headers  # a retry after Retry-After succeeds
    assert error.code == "rate_limit_exceeded"
    assert "tenant 'alpha'" in error.message and "60 requests per minute" in error.message
    assert len(gated.seen) == 60
    await chat(async_openai(proxy, key="sk-beta"))  # another tenant is not affected
    assert len(gated.seen) == 61


async def test_route_per_tenant_and_upstream_limits_all_apply(
    start_proxy: StartProxy, async_openai: MakeAsync, gated: Gated
) -> None:
    proxy = await start_proxy(policy(
        gated,
        route="limits: {per_tenant: {requests_per_minute: 2}}",
        upstream_extra="limits: {requests_per_minute: 3}",
    ))
    alpha, beta = async_openai(proxy), async_openai(proxy, key="sk-beta")
    await chat(alpha)
    await chat(alpha)
    with pytest.raises(openai.RateLimitError, match="route 'chat' for tenant 'alpha'"):
        await chat(alpha)
    await chat(beta)  # beta has its own per-tenant count...
    with pytest.raises(openai.RateLimitError, match="upstream 'up'.*tenant 'beta'"):
        await chat(beta)  # ...but the upstream's 3 per minute are used up
    assert len(gated.seen) == 3


# --- queues -----------------------------------------------------------------------------------------


async def test_a_queued_request_proceeds_when_the_slot_frees(
    start_proxy: StartProxy, async_openai: MakeAsync, gated: Gated
) -> None:
    gated.hold = True
    proxy = await start_proxy(policy(gated, route="queue: chat"))
    alpha = async_openai(proxy)
    first = start(chat(alpha, user="first"))
    await until(lambda: len(gated.seen) == 1)
    second = start(chat(alpha, user="second"))
    await until(lambda: waiting(proxy) == 1)
    await asyncio.sleep(0.05)
    assert gated.users() == ["first"]  # the second one waits in the proxy, not at the upstream
    gated.release()
    await first
    await until(lambda: len(gated.seen) == 2)
    gated.release()
    assert (await second).choices[0].message.content == "Hello"
    queue = proxy.state.scheduler.queues["chat"]
    assert queue.active == 0 and queue.admitted == 2
    async with aiohttp.ClientSession() as session, session.get(proxy.url + "/metrics") as response:
        text = await response.text()
    assert 'signalbox_queue_wait_seconds_count{queue="chat"} 1.0' in text  # the one that waited
    assert 'signalbox_active_requests{queue="chat"} 0.0' in text
    assert 'signalbox_queue_length{priority="standard",queue="chat"} 0.0' in text


async def test_a_flooding_tenant_does_not_starve_a_single_request(
    start_proxy: StartProxy, async_openai: MakeAsync, gated: Gated
) -> None:
    gated.hold = True
    proxy = await start_proxy(policy(gated, route="queue: chat"))
    alpha, beta = async_openai(proxy, max_retries=0), async_openai(proxy, key="sk-beta")
    flood = [start(chat(alpha, user=f"a{i}")) for i in range(20)]
    await until(lambda: len(gated.seen) == 1 and waiting(proxy) == 19)
    lone = start(chat(beta, user="b"))
    await until(lambda: waiting(proxy) == 20)
    for _ in range(2):  # within the next two slot releases
        seen = len(gated.seen)
        gated.release()
        await until(lambda: len(gated.seen) == seen + 1)  # noqa: B023 - awaited before the next turn
    assert "b" in gated.users()[:3]
    gated.release(100)
    await asyncio.gather(lone, *flood)


async def test_disconnect_while_queued_frees_everything_and_never_reaches_the_upstream(
    start_proxy: StartProxy, async_openai: MakeAsync, gated: Gated
) -> None:
    gated.hold = True
    proxy = await start_proxy(policy(gated, route="queue: chat", tenants="limits: {requests_per_minute: 10}"))
    alpha = async_openai(proxy)
    first = start(chat(alpha, user="first"))
    await until(lambda: len(gated.seen) == 1)
    async with aiohttp.ClientSession() as session:
        body = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "user": "gone"}
        leaving = start(session.post(proxy.v1 + "/chat/completions", json=body,
                                     headers={"Authorization": "Bearer sk-alpha"}))
        await until(lambda: waiting(proxy) == 1)
        assert (await usage_of(proxy, "tenant:alpha")).requests.used == 2
        leaving.cancel()
        await asyncio.gather(leaving, return_exceptions=True)
    queue = proxy.state.scheduler.queues["chat"]
    await until(lambda: waiting(proxy) == 0)
    assert queue.rejected == {} and queue.left == 1  # a cancellation, not a rejection
    assert (await usage_of(proxy, "tenant:alpha")).requests.used == 1  # its reservation was given back
    gated.release()
    await first
    gated.hold = False
    await chat(alpha, user="third")
    assert gated.users() == ["first", "third"]  # the upstream never saw the one that left
    assert queue.active == 0


async def test_queue_full_and_queue_timeout(
    start_proxy: StartProxy, async_openai: MakeAsync, gated: Gated
) -> None:
    gated.hold = True
    proxy = await start_proxy(policy(gated, route="queue: chat", queue="max_waiting: 1, max_wait: 300ms"))
    alpha = async_openai(proxy)
    first = start(chat(alpha))
    await until(lambda: len(gated.seen) == 1)
    second = start(chat(alpha))
    await until(lambda: waiting(proxy) == 1)
    with pytest.raises(openai.RateLimitError) as full:
        await chat(alpha)
    assert full.value.response.headers["x-should-retry"] == "false"
    assert "queue 'chat' is full" in full.value.message
    with pytest.raises(openai.RateLimitError, match=r"waited 0\.\d+s in queue 'chat'"):
        await second
    gated.release()
    await first
    async with aiohttp.ClientSession() as session, session.get(proxy.url + "/metrics") as response:
        text = await response.text()
    assert 'signalbox_rejections_total{reason="queue_full"} 1.0' in text
    assert 'signalbox_rejections_total{reason="queue_timeout"} 1.0' in text
    assert 'signalbox_queue_slots{queue="chat"} 1.0' in text


async def test_priority_header_is_served_first_within_the_tenant_cap(
    start_proxy: StartProxy, async_openai: MakeAsync, gated: Gated
) -> None:
    gated.hold = True
    proxy = await start_proxy(policy(gated, route="queue: chat"))
    alpha, beta = async_openai(proxy), async_openai(proxy, key="sk-beta")
    first = start(chat(alpha, user="first"))
    await until(lambda: len(gated.seen) == 1)
    low = start(chat(alpha, user="batch", extra_headers={"x-signalbox-priority": "batch"}))
    await until(lambda: waiting(proxy) == 1)
    capped = start(chat(beta, user="beta-asks-critical", extra_headers={"x-signalbox-priority": "critical"}))
    await until(lambda: waiting(proxy) == 2)
    high = start(chat(alpha, user="critical", extra_headers={"x-signalbox-priority": "critical"}))
    await until(lambda: waiting(proxy) == 3)
    with pytest.raises(openai.BadRequestError, match="unknown priority class 'urgent'"):
        await chat(alpha, extra_headers={"x-signalbox-priority": "urgent"})
    gated.release(10)
    await asyncio.gather(first, low, capped, high)
    # beta may not ask for critical (capped at its default, standard); batch waits for both.
    assert gated.users() == ["first", "critical", "beta-asks-critical", "batch"]


# --- token limits -----------------------------------------------------------------------------------


async def test_token_limit_settles_from_the_real_usage(
    start_proxy: StartProxy, async_openai: MakeAsync, gated: Gated
) -> None:
    proxy = await start_proxy(policy(gated, tenants="limits: {tokens_per_minute: 5000}"))
    alpha = async_openai(proxy)
    await chat(alpha, max_tokens=900)
    tokens = (await usage_of(proxy, "tenant:alpha")).tokens
    assert tokens.used == pytest.approx(PROMPT + COMPLETION)  # not the ~900 reserved
    stream = await chat(alpha, max_tokens=900, stream=True)
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello"
    assert all(c.usage is None and c.choices for c in chunks)  # the usage chunk was stripped
    assert gated.seen[-1]["stream_options"] == {"include_usage": True}  # ...but asked for upstream
    tokens = (await usage_of(proxy, "tenant:alpha")).tokens
    assert tokens.used == pytest.approx(2 * (PROMPT + COMPLETION))
    asked = await chat(alpha, stream=True, stream_options={"include_usage": True})
    usage_chunks = [c for c in [chunk async for chunk in asked] if c.usage is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0].usage.total_tokens == PROMPT + COMPLETION
    async with aiohttp.ClientSession() as session, session.get(proxy.url + "/metrics") as response:
        text = await response.text()
    assert f'signalbox_tokens_total{{kind="settled",tenant="alpha"}} {3.0 * (PROMPT + COMPLETION)}' in text
    assert 'signalbox_tokens_total{kind="refunded",tenant="alpha"}' in text
    assert 'signalbox_limiter_remaining{limit="tenant:alpha/tokens_per_minute",tenant="alpha"}' in text


async def test_stream_usage_is_asked_of_the_deployment_that_answers(
    start_proxy: StartProxy, async_openai: MakeAsync, gated: Gated
) -> None:
    """The route's own upstream speaks Anthropic (it reports usage by itself) but is down; its fallback is
    OpenAI-compatible. The fallback's attempt asks for the usage chunk, settles on it, and strips it."""
    with socket.socket() as sock:  # a loopback port with nobody listening: the Anthropic upstream is down
        sock.bind(("127.0.0.1", 0))
        down = sock.getsockname()[1]
    proxy = await start_proxy(f"""
upstreams:
  claude: {{provider: anthropic, base_url: "http://127.0.0.1:{down}/v1", api_key: sk-claude}}
  up: {{provider: openai, base_url: "{gated.url}/v1", api_key: sk-up}}
tenants:
  alpha: {{keys: [sk-alpha], limits: {{tokens_per_minute: 5000}}}}
routes:
  - {{name: chat, match: {{path: /v1/chat/completions}}, upstream: claude, fallbacks: [backup]}}
  - {{name: backup, match: {{path: /nowhere}}, upstream: up}}
""")
    stream = await chat(async_openai(proxy), max_tokens=900, stream=True)
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello"
    assert all(c.usage is None and c.choices for c in chunks)  # the client did not ask for usage
    assert gated.seen[-1]["stream_options"] == {"include_usage": True}
    tokens = (await usage_of(proxy, "tenant:alpha")).tokens
    assert tokens.used == pytest.approx(PROMPT + COMPLETION)  # settled, not the ~900 estimate


def responses_event(kind: str, **fields: Any) -> bytes:
    return f"event: {kind}\n".encode() + b"data: " + orjson.dumps({"type": kind, **fields}) + b"\n\n"


async def test_a_responses_api_stream_settles_on_the_usage_of_its_last_event(
    start_proxy: StartProxy, async_openai: MakeAsync, echo: EchoUpstream
) -> None:
    """The Responses API streams typed events and reports usage only inside response.completed's
    `response`; its inline image is charged flat (not 100,000 tokens of base64, over the limit)."""
    proxy = await start_proxy(f"""
upstreams:
  up: {{provider: openai, base_url: "{echo.url}/v1", api_key: sk-up}}
tenants:
  alpha: {{keys: [sk-alpha], limits: {{tokens_per_minute: 20000}}}}
routes:
  - {{name: all, upstream: up}}
""")
    response = {"id": "resp_1", "object": "response", "created_at": 1, "model": "m", "output": [],
                "status": "in_progress", "usage": None}
    usage = {"input_tokens": 1210, "output_tokens": 3, "total_tokens": 1213,
             "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}}
    echo.reply(Reply(headers=[("Content-Type", "text/event-stream")], chunks=[
        responses_event("response.created", sequence_number=0, response=response),
        responses_event("response.output_text.delta", sequence_number=1, item_id="msg_1", output_index=0,
                        content_index=0, delta="Hi!", logprobs=[]),
        responses_event("response.completed", sequence_number=2,
                        response={**response, "status": "completed", "usage": usage}),
    ]))
    image = {"type": "input_image", "image_url": "data:image/png;base64," + "A" * 400_000}
    turn = {"role": "user", "content": [{"type": "input_text", "text": "what is it?"}, image]}
    stream = await async_openai(proxy).responses.create(model="m", input=[turn], stream=True, max_output_tokens=100)
    events = [event async for event in stream]
    assert [e.type for e in events] == ["response.created", "response.output_text.delta", "response.completed"]
    assert events[-1].response.usage.total_tokens == 1213
    tokens = (await usage_of(proxy, "tenant:alpha")).tokens
    assert tokens.used == pytest.approx(1213)


async def test_an_interrupted_stream_settles_on_the_estimate(
    start_proxy: StartProxy, async_openai: MakeAsync, gated: Gated
) -> None:
    gated.drop_stream = True
    proxy = await start_proxy(policy(gated, tenants="limits: {tokens_per_minute: 5000}"))
    stream = await chat(async_openai(proxy), max_tokens=900, stream=True)
    with pytest.raises(openai.APIError, match="ended the stream early"):
        async for _ in stream:
            pass
    tokens = (await usage_of(proxy, "tenant:alpha")).tokens
    assert 900 < tokens.used < 1000  # the estimate: prompt estimate + max_tokens


async def test_over_a_token_limit_the_route_rejects_or_waits_for_a_refund(
    start_proxy: StartProxy, async_openai: MakeAsync, gated: Gated
) -> None:
    gated.hold = True
    limits = "limits: {tokens_per_minute: 1000}"
    text = policy(gated, tenants=limits, route="on_limit: queue\n    queue: chat", queue="concurrency: 5")
    proxy = await start_proxy(text)
    alpha = async_openai(proxy)
    first = start(chat(alpha, max_tokens=600, user="first"))
    await until(lambda: len(gated.seen) == 1)
    second = start(chat(alpha, max_tokens=600, user="second"))  # 600 + 600 > 1000: waits
    await asyncio.sleep(0.2)
    assert len(gated.seen) == 1
    gated.release()  # the first settles at 30 tokens, refunding the rest...
    await first
    await until(lambda: len(gated.seen) == 2, within=3)  # ...so the second is admitted
    gated.release()
    await second
    with pytest.raises(openai.RateLimitError, match="request too large") as too_big:
        await chat(alpha, max_tokens=5000)
    assert too_big.value.response.headers["x-should-retry"] == "false"
    assert too_big.value.response.headers["x-ratelimit-limit-tokens"] == "1000"


async def test_reject_on_token_limit_says_tokens(
    start_proxy: StartProxy, async_openai: MakeAsync, gated: Gated
) -> None:
    gated.hold = True
    proxy = await start_proxy(policy(gated, tenants="limits: {tokens_per_minute: 1000}"))
    alpha = async_openai(proxy)
    first = start(chat(alpha, max_tokens=600))
    await until(lambda: len(gated.seen) == 1)
    with pytest.raises(openai.RateLimitError) as caught:
        await chat(alpha, max_tokens=600)
    assert caught.value.type == "tokens" and "1000 tokens per minute" in caught.value.message
    assert int(caught.value.response.headers["x-ratelimit-remaining-tokens"]) < 600
    gated.release()
    await first


# --- streams that wait --------------------------------------------------------------------------------


async def test_a_waiting_stream_gets_headers_and_queue_heartbeats_then_its_answer(
    start_proxy: StartProxy, async_openai: MakeAsync, gated: Gated
) -> None:
    gated.hold = True
    proxy = await start_proxy(policy(gated, route="queue: chat", queue="heartbeat_while_queued: true"),
                              heartbeat=0.05)
    alpha = async_openai(proxy)
    first = start(chat(alpha))
    await until(lambda: len(gated.seen) == 1)
    body = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "stream": True}
    async with aiohttp.ClientSession() as session, session.post(
        proxy.v1 + "/chat/completions", json=body, headers={"Authorization": "Bearer sk-alpha"}
    ) as response:
        assert response.status == 200  # committed while still queued
        assert response.headers["Content-Type"].startswith("text/event-stream")
        received = b""
        while received.count(b": queued position=1\n") < 2:
            received += await asyncio.wait_for(response.content.readany(), 2)
        assert waiting(proxy) == 1
        gated.release(2)
        received += await asyncio.wait_for(response.content.read(), 5)
    assert b'"content":"Hel"' in received and received.endswith(b"data: [DONE]\n\n")
    await first
    # The SDK reads such a stream as usual: comments are ignored.
    first = start(chat(alpha))
    await until(lambda: len(gated.seen) == 3)
    stream_task = start(chat(alpha, stream=True))
    await until(lambda: waiting(proxy) == 1)
    await asyncio.sleep(0.15)
    gated.release(2)
    chunks = [c async for c in await stream_task]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello"
    await first


async def test_a_waiting_stream_rejected_later_gets_an_error_event(
    start_proxy: StartProxy, async_openai: MakeAsync, gated: Gated
) -> None:
    gated.hold = True
    text = policy(gated, route="queue: chat", queue="heartbeat_while_queued: true, max_wait: 300ms")
    proxy = await start_proxy(text, heartbeat=0.05)
    alpha = async_openai(proxy)
    first = start(chat(alpha))
    await until(lambda: len(gated.seen) == 1)
    stream = await chat(alpha, stream=True)  # headers arrive at once: the SDK returns a stream
    with pytest.raises(openai.APIError, match=r"waited 0\.\d+s in queue 'chat'"):
        async for _ in stream:
            pass
    gated.release()
    await first
    assert len(gated.seen) == 1


async def test_a_stream_waiting_for_a_limit_gets_heartbeats_then_proceeds(
    start_proxy: StartProxy, async_openai: MakeAsync, gated: Gated
) -> None:
    gated.hold = True
    limits = "limits: {tokens_per_minute: 1000}"
    text = policy(gated, tenants=limits, route="on_limit: queue\n    queue: chat",
                  queue="concurrency: 5, heartbeat_while_queued: true")
    proxy = await start_proxy(text, heartbeat=0.05)
    first = start(chat(async_openai(proxy), max_tokens=600))
    await until(lambda: len(gated.seen) == 1)
    body = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "stream": True, "max_tokens": 600}
    async with aiohttp.ClientSession() as session, session.post(
        proxy.v1 + "/chat/completions", json=body, headers={"Authorization": "Bearer sk-alpha"}
    ) as response:
        assert response.status == 200
        received = await asyncio.wait_for(response.content.readany(), 2)
        assert received.startswith(b": queued position=1")  # one wait, in the queue, for every limit
        gated.release()  # the first settles and refunds: the stream is admitted
        await until(lambda: len(gated.seen) == 2)
        gated.release()
        received += await asyncio.wait_for(response.content.read(), 5)
    assert received.endswith(b"data: [DONE]\n\n") and b'"usage":{' not in received
    await first


async def test_an_upstream_error_after_an_early_commit_arrives_as_an_error_event(
    start_proxy: StartProxy, async_openai: MakeAsync, gated: Gated
) -> None:
    gated.hold = True
    proxy = await start_proxy(policy(gated, route="queue: chat", queue="heartbeat_while_queued: true"),
                              heartbeat=0.05)
    alpha = async_openai(proxy)
    first = start(chat(alpha))
    await until(lambda: len(gated.seen) == 1)
    stream = await chat(alpha, stream=True)  # committed while queued
    gated.fail = True
    gated.release(2)
    with pytest.raises(openai.APIError, match="the model is overloaded"):
        async for _ in stream:
            pass
    with pytest.raises(openai.InternalServerError):
        await first
