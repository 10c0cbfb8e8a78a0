"""The stream relay end to end: heartbeats during silence, cancellation both ways, a client that stops
reading (backpressure, then the slow-client limit), first-token and idle limits, and upstreams that die
mid-stream. Clients are the official SDKs or raw sockets; upstreams are the mock on its own port (its
/mock/stats counts the connections the proxy dropped) or a scripted server that records how far it got."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest
from conftest import Proxy
from kit import build_policy, route_spec, upstream_spec
from stream_helpers import (
    SSE,
    PausedClient,
    Script,
    ScriptedUpstream,
    Servers,
    chat_chunk,
    endless,
    mock_stats,
    poll_mock,
    read_raw,
    sse,
    wait_for,
)

from proxy.mock.server import MockSettings, start_mock
from proxy.policy.load import PolicyError
from proxy.runtime import Settings
from proxy.streaming.relay import StreamSettings
from proxy.streaming.sse import SSEDecoder

pytestmark = pytest.mark.timeout(40)

StartProxy = Callable[..., Awaitable[Proxy]]
MakeOpenAI = Callable[..., openai.AsyncOpenAI]
PING = b": ping\n\n"  # a block of its own: no `id:` has reached the client (see test_heartbeat_framing.py)
PROMPT: Any = [{"role": "user", "content": "tell me about signal boxes on old railways"}]
ALPHA = {"x-api-key": "sk-alpha", "content-type": "application/json", "anthropic-version": "2023-06-01"}


@pytest.fixture
async def mock_url() -> AsyncIterator[str]:
    runner, url = await start_mock(MockSettings(output_tokens=6))
    yield url
    await runner.cleanup()


@pytest.fixture
async def scripted(servers: Servers) -> ScriptedUpstream:
    return await servers.scripted()


@pytest.fixture
async def claude() -> AsyncIterator[Callable[[Proxy], anthropic.AsyncAnthropic]]:
    clients: list[anthropic.AsyncAnthropic] = []

    def make(proxy: Proxy) -> anthropic.AsyncAnthropic:
        client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="sk-alpha", max_retries=0, timeout=15.0)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


def policy(
    mock_url: str, scripted: ScriptedUpstream, timeouts: str = "{}", extra_routes: tuple[dict[str, Any], ...] = ()
) -> str:
    """`gpt-*` → the mock as OpenAI (pass-through on /v1/chat/completions, translated on /v1/messages);
    `claude-*` → the mock as Anthropic (the reverse); `scripted-*` / `sc-*` → the scripted server as an
    OpenAI-compatible / Anthropic upstream."""
    upstreams = {
        "oai": upstream_spec(mock_url),
        "claude": upstream_spec(mock_url, "anthropic"),
        "scripted": upstream_spec(scripted.url, key=None),
        "scripted-claude": upstream_spec(scripted.url, "anthropic", key=None),
    }
    routes = [
        route_spec("gpt", "oai", model="gpt-*"),
        route_spec("claude", "claude", model="claude-*"),
        route_spec("scripted", "scripted", model="scripted-*"),
        route_spec("scripted-claude", "scripted-claude", model="sc-*"),
        *extra_routes,
    ]
    return build_policy(upstreams, routes, timeouts=timeouts)


def stream_settings(**kw: Any) -> Settings:
    return Settings(stream=StreamSettings(**{"heartbeat": 0.0, **kw}))


def chat_body(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": PROMPT, "stream": True, **extra}


def messages_body(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "max_tokens": 64, "messages": PROMPT, "stream": True, **extra}


async def idle_proxy(proxy: Proxy, limit_s: float = 1.0) -> None:
    """The proxy's request counter returns to zero: every handler ended and released what it held."""
    await wait_for(lambda: proxy.state.in_flight == 0, limit_s)


def assert_pings_at_boundaries(body: bytes) -> int:
    """Every heartbeat sits between whole events (at the start or after a blank line); returns how many."""
    count, pos = 0, body.find(PING)
    while pos >= 0:
        assert pos == 0 or body[:pos].endswith((b"\n\n", PING)), (
            f"heartbeat inside an event at {pos}: {body[:pos][-80:]!r}"
        )
        count += 1
        pos = body.find(PING, pos + len(PING))
    return count


# --- heartbeats --------------------------------------------------------------------------------------


async def test_heartbeats_fill_a_silent_first_token_at_event_boundaries(
    start_proxy: StartProxy,
    mock_url: str,
    scripted: ScriptedUpstream,
    async_openai: MakeOpenAI,
    claude: Callable[[Proxy], anthropic.AsyncAnthropic],
) -> None:
    proxy = await start_proxy(policy(mock_url, scripted), settings=stream_settings(heartbeat=1.0))
    quiet = {"x-mock-ttft-ms": "3000"}
    # Silence before the first token and again between two tokens.
    raw_task = read_raw(
        proxy.v1 + "/chat/completions",
        chat_body("gpt-a"),
        {**ALPHA, **quiet, "x-mock-token-delay-ms": "1200", "x-mock-output-tokens": "1"},
    )
    sdk = async_openai(proxy, timeout=15.0)

    async def openai_text(model: str) -> str:
        stream = await sdk.chat.completions.create(
            model=model, messages=PROMPT, stream=True, extra_headers=quiet
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def anthropic_text() -> str:
        async with claude(proxy).messages.stream(
            model="claude-a", max_tokens=64, messages=PROMPT, extra_headers=quiet
        ) as stream:
            message = await stream.get_final_message()
        assert message.content[0].type == "text"
        return message.content[0].text

    raw, passed, translated, front = await asyncio.gather(
        raw_task, openai_text("gpt-a"), openai_text("claude-a"), anthropic_text()
    )
    assert raw.status == 200
    body = raw.body
    first_data = body.index(b"data:")
    # One heartbeat right after the headers, then one per second of silence (3 s: at 0, 1, 2 and maybe 3).
    before = body[:first_data]
    assert before in (PING * 3, PING * 4), before
    arrivals = [t for t, chunk in raw.chunks if chunk.startswith(PING)]
    assert raw.chunks[0][1].startswith(PING)  # the first bytes after the headers are a heartbeat
    assert arrivals[1] - arrivals[0] > 0.8  # then one per second, not one per read
    # And at least one in each 1.2 s gap between the later events.
    assert assert_pings_at_boundaries(body) >= len(before) // len(PING) + 3
    events = SSEDecoder().feed(body.replace(PING, b""))
    assert [e.data for e in events][-1] == "[DONE]" and len(events) == 4  # role, 1 token, the finish, DONE
    # The SDKs parse the same kind of stream cleanly, and their text is what a stream without silence gives.
    plain = await sdk.chat.completions.create(model="gpt-a", messages=PROMPT, stream=True)
    expected = "".join([c.choices[0].delta.content or "" async for c in plain if c.choices])
    assert passed == translated == front == expected != ""
    await idle_proxy(proxy)


async def test_heartbeats_while_a_translated_stream_is_silent(
    start_proxy: StartProxy, mock_url: str, scripted: ScriptedUpstream
) -> None:
    # OpenAI front, Anthropic upstream: the heartbeat is a comment line, never an OpenAI data event.
    proxy = await start_proxy(policy(mock_url, scripted), settings=stream_settings(heartbeat=0.3))
    raw = await read_raw(
        proxy.v1 + "/chat/completions", chat_body("claude-a"), {**ALPHA, "x-mock-token-delay-ms": "700"}
    )
    assert raw.status == 200
    assert assert_pings_at_boundaries(raw.body) >= 6
    events = SSEDecoder().feed(raw.body.replace(PING, b""))
    assert events[-1].data == "[DONE]"
    assert all(e.event is None for e in events)  # OpenAI chunks carry no `event:` line
    assert "".join(
        orjson.loads(e.data)["choices"][0]["delta"].get("content") or "" for e in events[:-1]
    ).startswith("mock")


# --- cancellation: the client leaves ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", chat_body("gpt-a")),  # pass-through
        ("/v1/chat/completions", chat_body("claude-a")),  # OpenAI front, Anthropic upstream
        ("/v1/messages", messages_body("claude-a")),  # Anthropic pass-through
        ("/v1/messages", messages_body("gpt-a")),  # Anthropic front, OpenAI upstream
    ],
    ids=["openai-pass", "openai-from-anthropic", "anthropic-pass", "anthropic-from-openai"],
)
async def test_client_disconnect_mid_stream_closes_the_upstream_at_once(
    start_proxy: StartProxy, mock_url: str, scripted: ScriptedUpstream, path: str, body: dict[str, Any]
) -> None:
    proxy = await start_proxy(policy(mock_url, scripted))
    slow = {**ALPHA, "x-mock-token-delay-ms": "200", "x-mock-output-tokens": "50"}
    raw = await read_raw(proxy.url + path, body, slow, stop_after=1)  # one read of events, then close
    assert raw.status == 200 and b"data:" in raw.body
    # 50 tokens 200 ms apart: a disconnect counted by the mock means the upstream was let go mid-stream.
    await poll_mock(mock_url, lambda s: s["disconnects"] == 1 and s["in_flight"] == 0, limit_s=2.0)
    await idle_proxy(proxy, 0.5)
    line = proxy.access_lines()[-1]
    assert line["path"] == path and line["client_gone"] is True
    assert (line["status"], line["outcome"]) == (499, "cancelled")  # the 200 went out, but the client left


async def test_client_disconnect_during_silence_and_via_the_sdk(
    start_proxy: StartProxy, mock_url: str, scripted: ScriptedUpstream, async_openai: MakeOpenAI
) -> None:
    proxy = await start_proxy(policy(mock_url, scripted))
    # Before the first token: no byte flows either way, yet the close reaches the upstream at once.
    async with aiohttp.ClientSession() as http:
        resp = await http.post(
            proxy.v1 + "/chat/completions",
            data=orjson.dumps(chat_body("gpt-a")),
            headers={**ALPHA, "x-mock-ttft-ms": "20000"},
        )
        assert resp.status == 200
        resp.close()
    await poll_mock(mock_url, lambda s: s["disconnects"] == 1, limit_s=2.0)  # 20 s before its first token
    await idle_proxy(proxy, 0.5)
    # The openai SDK's own close() after two chunks.
    stream = await async_openai(proxy).chat.completions.create(
        model="claude-a", messages=PROMPT, stream=True, extra_headers={"x-mock-token-delay-ms": "200"}
    )
    got = 0
    async for _ in stream:
        got += 1
        if got == 2:
            break
    await stream.close()
    await poll_mock(mock_url, lambda s: s["disconnects"] == 2, limit_s=2.0)
    await idle_proxy(proxy, 0.5)
    assert (await mock_stats(mock_url))["in_flight"] == 0


# --- the upstream dies mid-stream ------------------------------------------------------------------------


async def test_upstream_drop_raises_in_the_openai_sdk_on_a_translated_stream(
    start_proxy: StartProxy, mock_url: str, scripted: ScriptedUpstream, async_openai: MakeOpenAI
) -> None:
    proxy = await start_proxy(policy(mock_url, scripted))
    stream = await async_openai(proxy).chat.completions.create(
        model="claude-a", messages=PROMPT, stream=True, extra_headers={"x-mock-drop-after": "4"}
    )
    seen: list[Any] = []
    with pytest.raises(openai.APIError) as info:
        async for chunk in stream:
            seen.append(chunk)
    assert not isinstance(info.value, openai.APIStatusError)
    assert "upstream 'claude' broke the connection mid-response" in info.value.message
    # message_start, content_block_start, ping and one text delta became the role chunk and one content chunk.
    assert [c.choices[0].delta.content for c in seen] == ["", "mock"]
    assert proxy.access_lines()[-1]["error"] == "upstream_unreachable"
    await idle_proxy(proxy)


@pytest.mark.parametrize("model", ["claude-a", "gpt-a"], ids=["anthropic-pass", "anthropic-from-openai"])
async def test_upstream_drop_raises_in_the_anthropic_sdk(
    start_proxy: StartProxy,
    mock_url: str,
    scripted: ScriptedUpstream,
    claude: Callable[[Proxy], anthropic.AsyncAnthropic],
    model: str,
) -> None:
    proxy = await start_proxy(policy(mock_url, scripted))
    client = claude(proxy)
    with pytest.raises(anthropic.APIStatusError) as info:
        async with client.messages.stream(
            model=model, max_tokens=64, messages=PROMPT, extra_headers={"x-mock-drop-after": "4"}
        ) as stream:
            await stream.get_final_message()
    assert info.value.body["type"] == "error"  # type: ignore[index]
    assert info.value.body["error"]["type"] == "api_error"  # type: ignore[index]
    assert "broke the connection mid-response" in info.value.message
    # The same stream without the fault ends cleanly: the error is the drop, not the relay.
    async with client.messages.stream(model=model, max_tokens=64, messages=PROMPT) as stream:
        assert (await stream.get_final_message()).stop_reason == "end_turn"
    await idle_proxy(proxy)


ANTHROPIC_HEAD = [
    sse(
        {
            "type": "message_start",
            "message": {
                "id": "msg_1",
                "type": "message",
                "role": "assistant",
                "content": [],
                "model": "sc-m",
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": 3, "output_tokens": 1},
            },
        },
        "message_start",
    ),
    sse(
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        "content_block_start",
    ),
    sse(
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hel"}},
        "content_block_delta",
    ),
]


async def test_anthropic_stream_ended_cleanly_but_early_gets_an_error_event(
    start_proxy: StartProxy,
    mock_url: str,
    scripted: ScriptedUpstream,
    claude: Callable[[Proxy], anthropic.AsyncAnthropic],
) -> None:
    # Well framed HTTP (the terminating chunk arrives) but no message_stop: a truncated answer, which the
    # client must hear about instead of a silent short message.
    proxy = await start_proxy(policy(mock_url, scripted))
    scripted.reply(Script(headers=SSE, events=ANTHROPIC_HEAD))
    raw = await read_raw(proxy.url + "/v1/messages", messages_body("sc-m"), ALPHA)
    events = SSEDecoder().feed(raw.body)
    assert b"".join(e.raw for e in events[:-1]) == b"".join(ANTHROPIC_HEAD)
    assert events[-1].event == "error"
    assert orjson.loads(events[-1].data)["error"]["type"] == "api_error"
    scripted.reply(Script(headers=SSE, events=ANTHROPIC_HEAD))
    with pytest.raises(anthropic.APIStatusError) as info:
        async with claude(proxy).messages.stream(model="sc-m", max_tokens=64, messages=PROMPT) as stream:
            await stream.get_final_message()
    assert "ended the stream early" in info.value.message
    # Translated for the OpenAI front the same truncation raises in the openai SDK.
    scripted.reply(Script(headers=SSE, events=ANTHROPIC_HEAD))
    client = openai.AsyncOpenAI(base_url=proxy.v1, api_key="sk-alpha", max_retries=0, timeout=10)
    async with client:
        stream_o = await client.chat.completions.create(model="sc-m", messages=PROMPT, stream=True)
        with pytest.raises(openai.APIError, match="ended the stream early"):
            async for _ in stream_o:
                pass
    await idle_proxy(proxy)


# --- a client that stops reading ---------------------------------------------------------------------------

BIG_EVENT = chat_chunk({"content": "x" * (64 * 1024)})  # sent back to back, without end


async def test_a_paused_client_stops_upstream_reads(
    start_proxy: StartProxy, mock_url: str, scripted: ScriptedUpstream
) -> None:
    proxy = await start_proxy(policy(mock_url, scripted))  # slow-client limit: the default 60 s
    scripted.reply(Script(headers=SSE, events=endless(BIG_EVENT)))
    client = PausedClient()
    try:
        head = await client.open(proxy.url, "/v1/chat/completions", chat_body("scripted-m"), ALPHA)
        assert head.startswith(b"HTTP/1.1 200")
        await wait_for(lambda: bool(scripted.outcomes) and scripted.last.written > 0, 2.0)
        await asyncio.sleep(1.0)  # let every buffer on the way fill up
        early = scripted.last.written
        await asyncio.sleep(1.5)
        late = scripted.last.written
        # The relay stopped reading, TCP pushed back, and the upstream's writes block. What got out is the
        # kernel's socket buffers on both hops (up to 4 MiB of send buffer each here, plus receive buffers
        # the kernel grew while the stream ran freely; about 9 MiB on the reference box) and the proxy's
        # own few hundred KiB (aiohttp's read buffer, one event, the 64 KiB write mark): bounded, and flat.
        assert late - early <= 2 * len(BIG_EVENT), (early, late)
        assert late < 48 * 1024**2, late
        assert scripted.last.gone_at is None and proxy.state.in_flight == 1
    finally:
        await client.close()
    await wait_for(lambda: scripted.last.gone_at is not None, 1.0)
    await idle_proxy(proxy)


async def test_slow_client_limit_ends_the_stream_and_closes_the_upstream(
    start_proxy: StartProxy, mock_url: str, scripted: ScriptedUpstream
) -> None:
    proxy = await start_proxy(policy(mock_url, scripted), settings=stream_settings(slow_client=1.0))
    scripted.reply(Script(headers=SSE, events=endless(BIG_EVENT)))
    client = PausedClient()
    try:
        await client.open(proxy.url, "/v1/chat/completions", chat_body("scripted-m"), ALPHA)
        paused = time.monotonic()
        await wait_for(lambda: bool(scripted.outcomes) and scripted.last.gone_at is not None, 5.0)
        gone_at = scripted.last.gone_at
        assert gone_at is not None
        # Blocked writes start within a few hundred ms of the pause; the limit then allows 1 s.
        assert gone_at - paused > 0.9  # the limit allowed its second before closing
        assert scripted.last.written < 48 * 1024**2
        await idle_proxy(proxy)
        # The proxy aborted the connection: once we read again we reach its end instead of more events.
        assert await client.read_to_end(limit_s=3.0) < 48 * 1024**2
    finally:
        await client.close()
    line = proxy.access_lines()[-1]
    assert line["status"] == 200 and line["client_gone"] is True and line["stream"] is True
    assert line["outcome"] == "cancelled" and line["reason"] == "slow_client"
    assert line["error"] == "slow_client"  # told apart from a client that left on its own
    assert 'signalbox_proxy_errors_total{reason="slow_client"} 1.0' in await metrics_text(proxy)


async def metrics_text(proxy: Proxy) -> str:
    async with aiohttp.ClientSession() as session, session.get(proxy.url + "/metrics") as response:
        return await response.text()


# --- upstream connections -------------------------------------------------------------------------------


async def test_finished_streams_reuse_the_upstream_connection(
    start_proxy: StartProxy, mock_url: str, scripted: ScriptedUpstream
) -> None:
    # A stream that ended properly hands its connection back to the pool (no new TCP or TLS handshake per
    # stream); one the client abandoned is closed, so the upstream stops generating.
    proxy = await start_proxy(policy(mock_url, scripted))
    done = [chat_chunk({"content": "a"}), chat_chunk({}, finish="stop"), b"data: [DONE]\n\n"]
    for _ in range(3):
        scripted.reply(Script(headers=SSE, events=done))
        assert (
            await read_raw(proxy.v1 + "/chat/completions", chat_body("scripted-m"), ALPHA)
        ).body == b"".join(done)
        await idle_proxy(proxy)
    assert len(set(scripted.peers)) == 1, scripted.peers
    scripted.reply(Script(headers=SSE, events=done, gap=0.5))
    await read_raw(proxy.v1 + "/chat/completions", chat_body("scripted-m"), ALPHA, stop_after=1)
    await wait_for(lambda: scripted.last.gone_at is not None, 1.0)
    scripted.reply(Script(headers=SSE, events=done))
    await read_raw(proxy.v1 + "/chat/completions", chat_body("scripted-m"), ALPHA)
    assert scripted.peers[-1] != scripted.peers[0]


# --- per-route stream settings ----------------------------------------------------------------------------


def tuned_policy(mock_url: str, scripted: ScriptedUpstream) -> str:
    tuned = route_spec("tuned", "scripted", model="tuned-*", stream={"heartbeat": "300ms", "slow_client": "1s"})
    return policy(mock_url, scripted, extra_routes=(tuned,))


async def test_route_stream_settings_override_the_process_settings(
    start_proxy: StartProxy, mock_url: str, scripted: ScriptedUpstream
) -> None:
    # The process has heartbeats off and a 60 s slow-client limit; the `tuned` route asks for 300 ms and 1 s.
    proxy = await start_proxy(tuned_policy(mock_url, scripted))
    gappy = [chat_chunk({"content": "a"}), chat_chunk({"content": "b"}, finish="stop"), b"data: [DONE]\n\n"]
    scripted.reply(Script(headers=SSE, events=gappy, gap=0.7), Script(headers=SSE, events=gappy, gap=0.7))
    tuned = await read_raw(proxy.v1 + "/chat/completions", chat_body("tuned-m"), ALPHA)
    plain = await read_raw(proxy.v1 + "/chat/completions", chat_body("scripted-m"), ALPHA)
    assert plain.body == b"".join(gappy)
    assert assert_pings_at_boundaries(tuned.body) >= 3  # one after the headers, then in each 0.7 s gap
    assert tuned.body.replace(PING, b"") == plain.body
    # The route's slow-client limit ends a paused client's stream after about a second.
    scripted.reply(Script(headers=SSE, events=endless(BIG_EVENT)))
    client = PausedClient()
    try:
        await client.open(proxy.url, "/v1/chat/completions", chat_body("tuned-m"), ALPHA)
        paused = time.monotonic()
        await wait_for(lambda: scripted.last.gone_at is not None, 5.0)
        assert (scripted.last.gone_at or 0) - paused > 0.9
        assert scripted.last.written < 48 * 1024**2  # cut, not read to the end
    finally:
        await client.close()
    await idle_proxy(proxy)


async def test_route_slow_client_must_be_positive(make_plan: Callable[[str], Any]) -> None:
    with pytest.raises(PolicyError) as info:
        make_plan(
            """
            upstreams: {u: {provider: openai, base_url: "http://127.0.0.1:9/v1"}}
            routes:
              - {name: r, upstream: u, stream: {slow_client: 0s}}
            """
        )
    assert "slow_client" in str(info.value.problems)


# --- time limits --------------------------------------------------------------------------------------------


async def test_first_token_limit_before_any_byte_is_a_504_on_both_fronts(
    start_proxy: StartProxy,
    mock_url: str,
    scripted: ScriptedUpstream,
    async_openai: MakeOpenAI,
    claude: Callable[[Proxy], anthropic.AsyncAnthropic],
) -> None:
    proxy = await start_proxy(policy(mock_url, scripted, timeouts="{first_token: 300ms}"))
    stall = {"x-mock-stall-ms": "5000"}  # no response headers for 5 s
    with pytest.raises(openai.InternalServerError) as whole:
        await async_openai(proxy).chat.completions.create(
            model="claude-a", messages=PROMPT, extra_headers=stall
        )
    with pytest.raises(openai.InternalServerError) as streamed:
        await async_openai(proxy).chat.completions.create(
            model="claude-a", messages=PROMPT, stream=True, extra_headers=stall
        )
    with pytest.raises(anthropic.APIStatusError) as front:
        await claude(proxy).messages.create(
            model="gpt-a", max_tokens=16, messages=PROMPT, extra_headers=stall
        )
    assert whole.value.status_code == streamed.value.status_code == front.value.status_code == 504
    assert whole.value.code == "upstream_timeout" and "first_token" in whole.value.message
    assert front.value.body["type"] == "error"  # type: ignore[index]
    assert "first_token" in front.value.body["error"]["message"]  # type: ignore[index]
    await poll_mock(
        mock_url, lambda s: s["disconnects"] == 3, limit_s=1.0
    )  # each stalled upstream was let go
    await idle_proxy(proxy)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", chat_body("claude-a")),
        ("/v1/messages", messages_body("claude-a")),
        ("/v1/messages", messages_body("gpt-a")),
    ],
    ids=["openai-from-anthropic", "anthropic-pass", "anthropic-from-openai"],
)
async def test_headers_then_silence_ends_with_a_timeout_event(
    start_proxy: StartProxy, mock_url: str, scripted: ScriptedUpstream, path: str, body: dict[str, Any]
) -> None:
    # The proxy sends its stream headers once the upstream's arrive; from then on a timeout is an event.
    proxy = await start_proxy(policy(mock_url, scripted, timeouts="{first_token: 300ms}"))
    raw = await read_raw(proxy.url + path, body, {**ALPHA, "x-mock-ttft-ms": "5000"})
    assert raw.status == 200
    events = SSEDecoder().feed(raw.body)
    assert len(events) == 1
    error = orjson.loads(events[0].data)
    if path == "/v1/messages":
        assert events[0].event == "error" and error["type"] == "error"
        message = error["error"]["message"]
    else:
        assert events[0].event is None
        message = error["error"]["message"]
        assert error["error"]["code"] == "upstream_timeout"
    assert "first_token" in message
    await poll_mock(mock_url, lambda s: s["disconnects"] == 1, limit_s=1.0)
    await idle_proxy(proxy)


async def test_first_token_counts_from_the_request_sent_not_from_the_headers(
    start_proxy: StartProxy, mock_url: str, scripted: ScriptedUpstream, async_openai: MakeOpenAI
) -> None:
    # 0.7 s to the headers, then 0.7 s to the first token: 1.4 s from the request, over the 1 s first_token.
    proxy = await start_proxy(policy(mock_url, scripted, timeouts="{first_token: 1s}"))
    slow = {"x-mock-stall-ms": "700", "x-mock-ttft-ms": "700"}
    started = time.monotonic()
    with pytest.raises(openai.APIError) as info:
        stream = await async_openai(proxy).chat.completions.create(
            model="gpt-a", messages=PROMPT, stream=True, extra_headers=slow
        )
        async for _ in stream:
            pass
    assert "first_token" in info.value.message
    # Counted from the headers the first token (0.7 s after them) would be in time and the stream would succeed.
    assert time.monotonic() - started > 0.95
    await idle_proxy(proxy)


@pytest.mark.parametrize("model", ["gpt-a", "claude-a"], ids=["pass", "translated"])
async def test_idle_limit_mid_stream_ends_with_an_error_and_closes_the_upstream(
    start_proxy: StartProxy, mock_url: str, scripted: ScriptedUpstream, async_openai: MakeOpenAI, model: str
) -> None:
    proxy = await start_proxy(policy(mock_url, scripted, timeouts="{first_token: 2s, idle: 300ms}"))
    stream = await async_openai(proxy).chat.completions.create(
        model=model, messages=PROMPT, stream=True, extra_headers={"x-mock-token-delay-ms": "5000"}
    )
    seen: list[Any] = []
    with pytest.raises(openai.APIError) as info:
        async for chunk in stream:
            seen.append(chunk)
    assert seen and "idle" in info.value.message
    await poll_mock(mock_url, lambda s: s["disconnects"] == 1, limit_s=1.0)
    assert proxy.access_lines()[-1]["error"] == "upstream_timeout"
    await idle_proxy(proxy)
