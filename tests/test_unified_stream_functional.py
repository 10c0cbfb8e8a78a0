"""The unified event stream end to end (docs/apps/unified-stream.md): a Python aiohttp WebSocket client
multiplexes requests against the mock upstream and cancels one; the same events over SSE read by a
hand-written parser; translated from an Anthropic-format upstream; tool-call deltas; the socket's bounds
(authentication, in-flight requests, idle time) and a client that stops reading."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from conftest import Proxy
from kit import build_policy, route_spec, scrape, total, until, upstream_spec
from unified_helpers import STREAM, Received, chat, post_sse, read_until, request, split_sse, without_ids

from proxy.mock.server import MOCK_STATS, MockSettings, build_mock_app

pytestmark = pytest.mark.timeout(40)
StartProxy = Callable[..., Awaitable[Proxy]]
AUTH = {"Authorization": "Bearer sk-alpha"}


class Mock:
    def __init__(self, app: Any, url: str) -> None:
        self.app = app
        self.url = url

    @property
    def disconnects(self) -> int:
        return int(self.app[MOCK_STATS].disconnects)

    async def answer(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """What the mock answers this body without a stream (the text every stream must add up to)."""
        headers = {"anthropic-version": "2023-06-01"} if path == "/v1/messages" else {}
        async with aiohttp.ClientSession() as http, http.post(self.url + path, json=body, headers=headers) as resp:
            assert resp.status == 200
            answer: dict[str, Any] = await resp.json()
            return answer


@pytest.fixture
async def mock(loopback: Any) -> AsyncIterator[Mock]:
    app = build_mock_app(MockSettings(output_tokens=6))
    yield Mock(app, await loopback.serve(app, handler_cancellation=True))


def policy(url: str, *, provider: str = "openai", queue: int = 3, top: dict[str, Any] | None = None,
           stream: dict[str, Any] | None = None) -> str:
    route = route_spec("chat", "up", queue="q", **({"stream": stream} if stream else {}))
    return build_policy({"up": upstream_spec(url, provider)}, [route],
                        queues={"q": {"concurrency": queue, "max_waiting": 10, "max_wait": "10s"}}, **(top or {}))


def chat_text(answer: dict[str, Any]) -> str:
    text: str = answer["choices"][0]["message"]["content"]
    return text


async def open_socket(http: aiohttp.ClientSession, proxy: Proxy) -> aiohttp.ClientWebSocketResponse:
    return await http.ws_connect(proxy.url + STREAM, headers=AUTH)


async def active(proxy: Proxy) -> float:
    return total(await scrape(proxy), "signalbox_active_requests", queue="q")


async def idle_queue(proxy: Proxy) -> bool:
    return await active(proxy) == 0


async def test_a_socket_multiplexes_three_requests_and_cancels_one(start_proxy: StartProxy, mock: Mock) -> None:
    proxy = await start_proxy(policy(mock.url))
    bodies = {rid: chat(prompt=f"request {rid} about signal levers") for rid in "abc"}
    expected = {rid: chat_text(await mock.answer("/v1/chat/completions", body)) for rid, body in bodies.items()}
    async with aiohttp.ClientSession() as http, await open_socket(http, proxy) as ws:
        await ws.send_json(request("a", bodies["a"], token_delay_ms="20"))
        await ws.send_json(request("b", bodies["b"], token_delay_ms="300", output_tokens="40"))
        await ws.send_json(request("c", bodies["c"], token_delay_ms="20"))
        got = Received()
        await read_until(ws, got, lambda g: any(e["type"] == "text_delta" for e in g.of("b")))
        assert await active(proxy) >= 1  # b holds its slot while it streams
        await ws.send_json({"type": "cancel", "id": "b"})
        await read_until(ws, got, lambda g: all(g.complete(r) for r in "abc"))
        assert got.complete("b") is not None and got.complete("b")["finish_reason"] == "cancelled"
        for rid in "ac":
            assert got.text(rid) == expected[rid]
            assert got.complete(rid)["finish_reason"] == "stop"  # type: ignore[index]
            kinds = [e["type"] for e in got.of(rid)]
            assert kinds[-2:] == ["usage", "stream_complete"] and set(kinds[:-2]) == {"text_delta"}
            assert [e["seq"] for e in got.of(rid)] == list(range(len(kinds)))
        assert 0 < len(got.text("b")) < len(expected["a"]) * 10  # it stopped early
        await until(lambda: mock.disconnects == 1)  # the proxy closed b's upstream connection
        await until(lambda: idle_queue(proxy))  # every slot is back while the socket stays open
        await ws.send_json(request("d", bodies["a"]))  # the socket goes on
        await read_until(ws, got, lambda g: g.complete("d") is not None)
        assert got.text("d") == expected["a"]
    await until(lambda: proxy.state.in_flight == 0)
    outcomes = sorted(line["outcome"] for line in proxy.access_lines())
    assert outcomes == ["cancelled", "ok", "ok", "ok"]


async def test_the_same_events_over_sse_split_on_blank_lines(start_proxy: StartProxy, mock: Mock) -> None:
    proxy = await start_proxy(policy(mock.url))
    body = chat(prompt="the lever frame")
    expected = chat_text(await mock.answer("/v1/chat/completions", body))
    status, raw = await post_sse(proxy.url, {"path": "/v1/chat/completions", "body": body}, AUTH)
    assert status == 200
    events = split_sse(raw)
    assert "".join(e["text"] for e in events if e["type"] == "text_delta") == expected
    assert [e["seq"] for e in events] == list(range(len(events)))
    assert events[-2]["type"] == "usage" and events[-2]["output_tokens"] == 6
    assert events[-1] == {"type": "stream_complete", "seq": len(events) - 1, "finish_reason": "stop"}
    async with aiohttp.ClientSession() as http, await open_socket(http, proxy) as ws:
        await ws.send_json(request("x", body))
        got = Received()
        await read_until(ws, got, lambda g: g.complete("x") is not None)
    assert without_ids(got.of("x")) == events  # one event model, two framings


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
async def test_translated_from_an_anthropic_format_upstream(start_proxy: StartProxy, mock: Mock, path: str) -> None:
    proxy = await start_proxy(policy(mock.url, provider="anthropic"))
    body = chat(model="claude-x", prompt="semaphore signals", max_tokens=64)
    answer = await mock.answer("/v1/messages", body)
    expected = "".join(block["text"] for block in answer["content"])
    status, raw = await post_sse(proxy.url, {"path": path, "body": body}, AUTH)
    assert status == 200, raw
    events = split_sse(raw)
    assert "".join(e["text"] for e in events if e["type"] == "text_delta") == expected
    usage = [e for e in events if e["type"] == "usage"]
    assert usage and usage[0]["input_tokens"] == answer["usage"]["input_tokens"]
    assert usage[0]["output_tokens"] == answer["usage"]["output_tokens"]
    assert events[-1]["type"] == "stream_complete" and events[-1]["finish_reason"] == "stop"


TOOLS = [{"type": "function", "function": {"name": "set_signal", "parameters": {
    "type": "object", "properties": {"aspect": {"type": "string"}, "box": {"type": "integer"}},
    "required": ["aspect", "box"]}}}]


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_tool_call_argument_deltas(start_proxy: StartProxy, mock: Mock, provider: str) -> None:
    proxy = await start_proxy(policy(mock.url, provider=provider))
    body = chat(prompt="set the home signal", tools=TOOLS, tool_choice="required", max_tokens=64)
    async with aiohttp.ClientSession() as http, await open_socket(http, proxy) as ws:
        await ws.send_json(request("t", body, output_tokens="12"))
        got = Received()
        await read_until(ws, got, lambda g: g.complete("t") is not None)
    calls = [e for e in got.of("t") if e["type"] == "tool_call"]
    assert len(calls) >= 2  # the arguments arrive in pieces
    assert {(e["index"], e["call_id"], e["name"]) for e in calls} == {(0, calls[0]["call_id"], "set_signal")}
    assert calls[0]["call_id"]
    arguments = orjson.loads("".join(e["arguments_delta"] for e in calls))
    assert set(arguments) == {"aspect", "box"} and isinstance(arguments["box"], int)
    assert got.complete("t")["finish_reason"] == "tool_calls"  # type: ignore[index]


async def test_responses_api_events(start_proxy: StartProxy, mock: Mock) -> None:
    proxy = await start_proxy(policy(mock.url))
    body = {"model": "gpt-4o", "input": "the token instrument"}
    answer = await mock.answer("/v1/responses", body)
    expected = answer["output"][0]["content"][0]["text"]
    status, raw = await post_sse(proxy.url, {"path": "/v1/responses", "body": body}, AUTH)
    events = split_sse(raw)
    assert status == 200 and "".join(e["text"] for e in events if e["type"] == "text_delta") == expected
    assert [e["type"] for e in events[-2:]] == ["usage", "stream_complete"]


async def test_an_unauthenticated_socket_is_refused_before_the_upgrade(start_proxy: StartProxy, mock: Mock) -> None:
    proxy = await start_proxy(policy(mock.url))
    async with aiohttp.ClientSession() as http:
        for headers in ({}, {"Authorization": "Bearer sk-nobody"}):
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(proxy.url + STREAM, headers=headers)
            assert refused.value.status == 401
        status, raw = await post_sse(proxy.url, {"body": chat()}, {})
        assert status == 401 and orjson.loads(raw)["error"]["code"] == "invalid_api_key"


async def test_queued_events_and_the_in_flight_bound(start_proxy: StartProxy, mock: Mock) -> None:
    proxy = await start_proxy(policy(mock.url, queue=1, top={"stream_socket": {"max_in_flight": 2}}))
    async with aiohttp.ClientSession() as http, await open_socket(http, proxy) as ws:
        await ws.send_json(request("slow", chat(), token_delay_ms="100"))
        got = Received()
        await read_until(ws, got, lambda g: g.of("slow"))
        await ws.send_json(request("waits", chat()))
        await ws.send_json(request("third", chat()))
        await read_until(ws, got, lambda g: g.complete("third") is not None and g.complete("waits") is not None)
    queued = [e for e in got.of("waits") if e["type"] == "queued"]
    assert queued and queued[0]["position"] == 1 and queued[0]["waiting_for"] == "queue"
    assert got.text("waits") == got.text("slow")
    (error,) = [e for e in got.of("third") if e["type"] == "error"]
    assert error["error"]["status"] == 429 and error["error"]["code"] == "too_many_in_flight"
    assert got.complete("third")["finish_reason"] == "error"  # type: ignore[index]


async def test_an_upstream_error_is_an_error_event_or_the_status(start_proxy: StartProxy, mock: Mock) -> None:
    proxy = await start_proxy(policy(mock.url))
    headers = {**AUTH, "x-mock-status": "503", "x-mock-retry-after": "7"}
    status, raw = await post_sse(proxy.url, {"body": chat()}, headers)
    refused = orjson.loads(raw)
    assert status == 503 and refused["type"] == "error" and refused["error"]["status"] == 503
    async with aiohttp.ClientSession() as http, await open_socket(http, proxy) as ws:
        await ws.send_json(request("e", chat(), status="400"))
        got = Received()
        await read_until(ws, got, lambda g: g.complete("e") is not None)
    assert [e["type"] for e in got.of("e")] == ["error", "stream_complete"]
    assert got.of("e")[0]["error"]["status"] == 400 and got.complete("e")["finish_reason"] == "error"  # type: ignore[index]


async def test_an_idle_socket_is_closed(start_proxy: StartProxy, mock: Mock) -> None:
    proxy = await start_proxy(policy(mock.url, top={"stream_socket": {"idle_timeout": "300ms"}}))
    async with aiohttp.ClientSession() as http, await open_socket(http, proxy) as ws:
        message = await asyncio.wait_for(ws.receive(), 5)
        assert message.type == aiohttp.WSMsgType.CLOSE and message.data == 1000 and message.extra == "idle timeout"
    assert total(await scrape(proxy), "signalbox_stream_sockets_total", reason="idle_timeout") == 1


def _handshake(port: int) -> bytes:
    return (
        f"GET {STREAM} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        "Authorization: Bearer sk-alpha\r\n\r\n"
    ).encode()


def _masked_text(payload: bytes) -> bytes:
    mask = b"\x01\x02\x03\x04"
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    assert len(payload) < 65536
    return b"\x81\xfe" + len(payload).to_bytes(2, "big") + mask + body


async def test_a_client_that_stops_reading_is_cut_by_the_slow_client_rule(start_proxy: StartProxy, mock: Mock) -> None:
    """A raw socket with a small receive buffer sends one request and never reads: the proxy's queue for it
    fills (stream_socket.send_buffer), the relay stops reading the upstream, and after the route's
    slow_client the socket is closed and the upstream connection dropped."""
    proxy = await start_proxy(policy(mock.url, top={"stream_socket": {"send_buffer": "4KiB"}},
                                     stream={"slow_client": "500ms"}))
    port = int(proxy.url.rsplit(":", 1)[1])
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_connect(raw, ("127.0.0.1", port))
        await loop.sock_sendall(raw, _handshake(port))
        message = request("flood", chat(prompt="x " * 200), output_tokens="100000")
        await loop.sock_sendall(raw, _masked_text(orjson.dumps(message)))
        await until(lambda: mock.disconnects == 1, within=20)
        await until(lambda: proxy.state.in_flight == 0)
    finally:
        raw.close()
    (line,) = proxy.access_lines()
    assert line["outcome"] == "cancelled" and line["reason"] == "slow_client"


async def test_heartbeat_events_during_silence_reach_a_naive_parser(start_proxy: StartProxy, mock: Mock) -> None:
    """Heartbeats are events of their own (numbered like the others), so a parser that splits on blank lines
    loses nothing; the text still adds up."""
    proxy = await start_proxy(policy(mock.url), heartbeat=0.1)
    body = chat(prompt="block instruments")
    expected = chat_text(await mock.answer("/v1/chat/completions", body))
    headers = {**AUTH, "x-mock-ttft-ms": "450", "x-mock-token-delay-ms": "150"}
    status, raw = await post_sse(proxy.url, {"body": body}, headers)
    events = split_sse(raw)
    assert status == 200 and [e["seq"] for e in events] == list(range(len(events)))
    beats = [e for e in events if e["type"] == "heartbeat"]
    assert len(beats) >= 3 and beats[0] == {"type": "heartbeat", "seq": 0}
    assert "".join(e["text"] for e in events if e["type"] == "text_delta") == expected
    assert events[-1]["type"] == "stream_complete" and events[-1]["finish_reason"] == "stop"


async def test_a_message_over_the_size_limit_closes_the_socket(start_proxy: StartProxy, mock: Mock) -> None:
    proxy = await start_proxy(policy(mock.url, top={"stream_socket": {"max_message": "1KiB"}}))
    async with aiohttp.ClientSession() as http, await open_socket(http, proxy) as ws:
        await ws.send_json(request("big", chat(prompt="x" * 2048)))
        message = await asyncio.wait_for(ws.receive(), 5)
        assert message.type == aiohttp.WSMsgType.CLOSE and message.data == 1009
    await until(lambda: _closed_for(proxy, "too_big"))


async def _closed_for(proxy: Proxy, reason: str) -> bool:
    return total(await scrape(proxy), "signalbox_stream_sockets_total", reason=reason) == 1


async def test_a_browser_names_its_key_in_a_subprotocol(start_proxy: StartProxy, mock: Mock) -> None:
    """Browsers cannot set headers on a WebSocket: `signalbox.bearer.<key>` beside `signalbox.v1`."""
    proxy = await start_proxy(policy(mock.url))
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(proxy.url + STREAM, protocols=("signalbox.v1", "signalbox.bearer.sk-alpha")) as ws:
            assert ws.protocol == "signalbox.v1"
            await ws.send_json(request("p", chat()))
            got = Received()
            await read_until(ws, got, lambda g: g.complete("p") is not None)
        assert got.complete("p")["finish_reason"] == "stop"  # type: ignore[index]
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(proxy.url + STREAM, protocols=("signalbox.v1", "signalbox.bearer.sk-wrong"))
        assert refused.value.status == 401


async def test_an_anthropic_body_to_an_openai_compatible_upstream(start_proxy: StartProxy, mock: Mock) -> None:
    """The other translation: an Anthropic Messages body on a route to an OpenAI-compatible upstream."""
    proxy = await start_proxy(policy(mock.url))
    body = chat(prompt="distant signals", max_tokens=64)
    expected = chat_text(await mock.answer("/v1/chat/completions", body))
    async with aiohttp.ClientSession() as http, await open_socket(http, proxy) as ws:
        await ws.send_json(request("m", body, path="/v1/messages"))
        got = Received()
        await read_until(ws, got, lambda g: g.complete("m") is not None)
    assert got.text("m") == expected and got.complete("m")["finish_reason"] == "stop"  # type: ignore[index]
    assert [e for e in got.of("m") if e["type"] == "usage"][0]["output_tokens"] == 6
