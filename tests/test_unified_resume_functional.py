"""Resumable unified streams (docs/apps/unified-stream.md#resuming-a-dropped-stream) with Python clients as an
app would write them: over SSE a client reads part of a stream, drops the connection and resumes with
`Last-Event-ID`; over WebSocket a socket closes mid-stream and another socket resumes by stream id and seq;
each gets exactly the remaining events. Another tenant finds nothing; `cancel` and DELETE stop the generation
(the upstream connection closes, the slot comes back)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from conftest import Proxy
from kit import build_policy, route_spec, scrape, total, until, upstream_spec
from unified_helpers import STREAM, Received, chat, read_until, request, split_sse

from proxy.mock.server import MOCK_STATS, MockSettings, build_mock_app

pytestmark = pytest.mark.timeout(60)
StartProxy = Callable[..., Awaitable[Proxy]]
ALPHA = {"Authorization": "Bearer sk-alpha"}
BETA = {"Authorization": "Bearer sk-beta"}
SLOW = {"x-mock-token-delay-ms": "30", "x-mock-output-tokens": "40"}


class Mock:
    def __init__(self, app: Any, url: str) -> None:
        self.app = app
        self.url = url

    @property
    def disconnects(self) -> int:
        return int(self.app[MOCK_STATS].disconnects)


@pytest.fixture
async def mock(loopback: Any) -> AsyncIterator[Mock]:
    app = build_mock_app(MockSettings())
    yield Mock(app, await loopback.serve(app, handler_cancellation=True))


async def start(start_proxy: StartProxy, mock: Mock, heartbeat: float = 0.0) -> Proxy:
    route = route_spec("chat", "up", queue="q", stream={"resumable": {"buffer": "1MiB", "ttl": "30s"}})
    return await start_proxy(build_policy(
        {"up": upstream_spec(mock.url, "openai")}, [route],
        tenants={"alpha": {"keys": ["sk-alpha"]}, "beta": {"keys": ["sk-beta"]}},
        queues={"q": {"concurrency": 2, "max_waiting": 10, "max_wait": "10s"}},
    ), heartbeat=heartbeat)


async def whole(proxy: Proxy, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The same request's events read to the end without a drop (the mock is deterministic)."""
    async with aiohttp.ClientSession() as http, http.post(
        proxy.url + STREAM, json={"body": body}, headers={**ALPHA, **SLOW}
    ) as resp:
        return split_sse(await resp.read())


async def idle(proxy: Proxy) -> bool:
    return total(await scrape(proxy), "signalbox_active_requests", queue="q") == 0


async def test_sse_resume_gets_exactly_the_rest_and_only_for_its_tenant(start_proxy: StartProxy, mock: Mock) -> None:
    proxy = await start(start_proxy, mock)
    body = chat(prompt="the block instruments")
    expected = await whole(proxy, body)
    assert [e["seq"] for e in expected] == list(range(42)) and expected[-1]["finish_reason"] == "stop"
    async with aiohttp.ClientSession() as http:
        resp = await http.post(proxy.url + STREAM, json={"body": body}, headers={**ALPHA, **SLOW})
        stream_id = resp.headers["x-signalbox-stream-id"]
        raw = b""
        while raw.count(b"\n\n") < 5:
            raw += await resp.content.readany()
        resp.close()  # the connection drops mid-stream
        first = split_sse(raw[: raw.rindex(b"\n\n") + 2])
        last = first[-1]["seq"]
        for headers, status in (({**BETA, "Last-Event-ID": "0"}, 404), ({**ALPHA, "Last-Event-ID": "x"}, 400)):
            async with http.post(proxy.url + STREAM, headers={**headers, "x-signalbox-stream-id": stream_id}) as r:
                assert r.status == status
                assert (await r.json())["type"] == "error"
        async with http.post(proxy.url + STREAM, headers={
            **ALPHA, "x-signalbox-stream-id": stream_id, "Last-Event-ID": str(last)
        }) as again:
            assert again.status == 200 and again.headers["x-signalbox-stream-id"] == stream_id
            rest = split_sse(await again.read())
    assert first + rest == expected  # every event once, in order, the same as without a drop
    assert mock.disconnects == 0
    await until(lambda: idle(proxy))


async def test_a_socket_resumes_on_another_socket_and_cancels(start_proxy: StartProxy, mock: Mock) -> None:
    proxy = await start(start_proxy, mock)
    body = chat(prompt="tablet working")
    expected = [{k: v for k, v in e.items()} for e in await whole(proxy, body)]
    async with aiohttp.ClientSession() as http:
        got = Received()
        async with http.ws_connect(proxy.url + STREAM, headers=ALPHA) as ws:
            await ws.send_json(request("a", body, token_delay_ms="30", output_tokens="40"))
            await read_until(ws, got, lambda g: len(g.of("a")) >= 4)
        first = got.of("a")
        stream_id = first[0]["stream_id"]  # named in the first event from the stream
        async with http.ws_connect(proxy.url + STREAM, headers=BETA) as other:
            await other.send_json({"type": "resume", "id": "x", "stream": stream_id, "after": 0})
            refused = Received()
            await read_until(other, refused, lambda g: g.complete("x") is not None)
            assert refused.of("x")[0]["error"]["code"] == "stream_not_found"
        again = Received()
        async with http.ws_connect(proxy.url + STREAM, headers=ALPHA) as ws:
            await ws.send_json({"type": "resume", "id": "b", "stream": stream_id, "after": first[-1]["seq"]})
            await read_until(ws, again, lambda g: g.complete("b") is not None)
        events = [{k: v for k, v in e.items() if k not in ("id", "stream_id")} for e in first + again.of("b")]
        assert events == expected
        # A second request, cancelled from a socket that resumed it: the generation stops.
        cut = Received()
        async with http.ws_connect(proxy.url + STREAM, headers=ALPHA) as ws:
            await ws.send_json(request("c", chat(prompt="a long one"), token_delay_ms="200", output_tokens="200"))
            await read_until(ws, cut, lambda g: len(g.of("c")) >= 1)
        async with http.ws_connect(proxy.url + STREAM, headers=ALPHA) as ws:
            await ws.send_json({"type": "resume", "id": "d", "stream": cut.of("c")[0]["stream_id"], "after": 0})
            await read_until(ws, cut, lambda g: len(g.of("d")) >= 1)
            await ws.send_json({"type": "cancel", "id": "d"})
            await read_until(ws, cut, lambda g: g.complete("d") is not None)
    assert cut.complete("d")["finish_reason"] == "cancelled"  # type: ignore[index]
    await until(lambda: mock.disconnects == 1)
    await until(lambda: idle(proxy))


async def test_delete_stops_a_detached_sse_stream(start_proxy: StartProxy, mock: Mock) -> None:
    proxy = await start(start_proxy, mock)
    async with aiohttp.ClientSession() as http:
        resp = await http.post(proxy.url + STREAM, json={"body": chat()},
                               headers={**ALPHA, "x-mock-token-delay-ms": "200", "x-mock-output-tokens": "200"})
        stream_id = resp.headers["x-signalbox-stream-id"]
        await resp.content.readany()
        resp.close()  # detached: the generation goes on without its client
        async with http.delete(proxy.url + STREAM, headers={**BETA, "x-signalbox-stream-id": stream_id}) as r:
            assert r.status == 404  # not beta's
        assert mock.disconnects == 0
        async with http.delete(proxy.url + STREAM, headers={**ALPHA, "x-signalbox-stream-id": stream_id}) as r:
            assert r.status == 204
        await until(lambda: mock.disconnects == 1)
        await until(lambda: idle(proxy))
        async with http.post(proxy.url + STREAM, headers={**ALPHA, "x-signalbox-stream-id": stream_id,
                                                           "Last-Event-ID": "0"}) as again:
            rest = split_sse(await again.read())
    assert rest[-1] == {"type": "stream_complete", "seq": rest[-1]["seq"], "finish_reason": "cancelled"}
    assert orjson.dumps(rest).count(b'"error"') == 0


async def test_heartbeats_are_numbered_events_every_reader_sees_alike(start_proxy: StartProxy, mock: Mock) -> None:
    """Heartbeats are kept with the stream: a resume from the first event reads the same events, heartbeats
    and all, as the client that was there."""
    proxy = await start(start_proxy, mock, heartbeat=0.1)
    async with aiohttp.ClientSession() as http:
        async with http.post(proxy.url + STREAM, json={"body": chat()}, headers={
            **ALPHA, "x-mock-ttft-ms": "500", "x-mock-token-delay-ms": "300", "x-mock-output-tokens": "3"
        }) as resp:
            stream_id = resp.headers["x-signalbox-stream-id"]
            live = split_sse(await resp.read())
        async with http.post(proxy.url + STREAM, headers={
            **ALPHA, "x-signalbox-stream-id": stream_id, "Last-Event-ID": ""
        }) as again:
            replayed = split_sse(await again.read())
    kinds = [e["type"] for e in live]
    assert kinds.count("heartbeat") >= 2 and kinds.count("text_delta") == 3
    assert [e["seq"] for e in live] == list(range(len(live)))
    assert replayed == live
