"""The Realtime API pass-through end to end (docs/apps/realtime.md): the official openai SDK's Realtime
client, with only base_url changed, talks to the mock's Realtime endpoint through the proxy; the session
limit refuses one session too many; an idle session is closed; frames and bytes are counted both ways."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from conftest import Proxy
from kit import build_policy, route_spec, scrape, total, until, upstream_spec

from proxy.mock.server import MOCK_STATS, MockSettings, build_mock_app

pytestmark = pytest.mark.timeout(40)
StartProxy = Callable[..., Awaitable[Proxy]]
AUTH = {"Authorization": "Bearer sk-alpha"}


@pytest.fixture
async def mock(loopback: Any) -> AsyncIterator[tuple[Any, str]]:
    app = build_mock_app(MockSettings(output_tokens=5))
    yield app, await loopback.serve(app, handler_cancellation=True)


def policy(url: str, **realtime: Any) -> str:
    routes = [route_spec("rt", "up", path="/v1/realtime", model="gpt-realtime*"),
              route_spec("chat", "up", path="/v1/chat/completions")]
    tenants = {"alpha": {"keys": ["sk-alpha"]}, "beta": {"keys": ["sk-beta"]}}
    return build_policy({"up": upstream_spec(url)}, routes, tenants=tenants,
                        realtime=realtime)


def ws_url(proxy: Proxy, model: str = "gpt-realtime-mini") -> str:
    return proxy.url + "/v1/realtime?model=" + model


async def test_the_openai_sdk_realtime_client_works_through_the_proxy(
    start_proxy: StartProxy, mock: tuple[Any, str]
) -> None:
    app, url = mock
    proxy = await start_proxy(policy(url))
    client = openai.AsyncOpenAI(base_url=proxy.v1, api_key="sk-alpha", max_retries=0)
    deltas: list[str] = []
    async with client.realtime.connect(model="gpt-realtime-mini") as connection:
        first = await asyncio.wait_for(connection.recv(), 5)
        assert first.type == "session.created" and first.session.model == "gpt-realtime-mini"  # type: ignore[union-attr]
        await connection.conversation.item.create(
            item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "lever frame"}]}
        )
        await connection.response.create()
        async with asyncio.timeout(10):
            async for event in connection:
                if event.type == "response.output_text.delta":
                    deltas.append(event.delta)
                if event.type == "response.done":
                    usage = event.response.usage
                    break
    assert "".join(deltas) == "mock lever frame lever frame" and usage is not None and usage.output_tokens == 5
    assert app[MOCK_STATS].by_path["/v1/realtime"] == 1
    await until(lambda: proxy.state.in_flight == 0)
    found = await scrape(proxy)
    up = total(found, "signalbox_realtime_frames_total", direction="client_to_upstream")
    down = total(found, "signalbox_realtime_frames_total", direction="upstream_to_client")
    assert up == 2 and down == 1 + 2 + 2 + 5 + 3  # session.created, item added/done, the response: 2, 5 deltas, 3
    assert total(found, "signalbox_realtime_bytes_total", direction="client_to_upstream") > 100
    await until(lambda: _closed(proxy, "client_closed"))


async def _closed(proxy: Proxy, outcome: str) -> bool:
    found = await scrape(proxy)
    return (total(found, "signalbox_realtime_sessions_total", outcome=outcome) == 1
            and total(found, "signalbox_realtime_sessions_active") == 0)


async def test_the_session_limit_refuses_one_session_too_many(start_proxy: StartProxy, mock: tuple[Any, str]) -> None:
    _, url = mock
    proxy = await start_proxy(policy(url, max_sessions=2, max_sessions_per_tenant=1))
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(ws_url(proxy), headers=AUTH) as first:
            assert orjson.loads((await first.receive()).data)["type"] == "session.created"
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(ws_url(proxy), headers=AUTH)
            assert refused.value.status == 429  # alpha's one session
            async with http.ws_connect(ws_url(proxy), headers={"Authorization": "Bearer sk-beta"}) as other:
                assert orjson.loads((await other.receive()).data)["type"] == "session.created"
                with pytest.raises(aiohttp.WSServerHandshakeError) as full:
                    await http.ws_connect(ws_url(proxy), headers={"Authorization": "Bearer sk-beta"})
                assert full.value.status == 429
        await until(lambda: proxy.app[_sessions()].total == 0)
        async with http.ws_connect(ws_url(proxy), headers=AUTH) as again:  # the sessions were given back
            assert orjson.loads((await again.receive()).data)["type"] == "session.created"
        for headers, status in (({}, 401), ({"Authorization": "Bearer sk-nobody"}, 401)):
            with pytest.raises(aiohttp.WSServerHandshakeError) as no_key:
                await http.ws_connect(ws_url(proxy), headers=headers)
            assert no_key.value.status == status
        with pytest.raises(aiohttp.WSServerHandshakeError) as no_route:
            await http.ws_connect(ws_url(proxy, "other-model"), headers=AUTH)
        assert no_route.value.status == 404
    found = await scrape(proxy)
    assert total(found, "signalbox_realtime_sessions_total", outcome="refused_limit") == 2


def _sessions() -> Any:
    from proxy.ingress.realtime.relay import SESSIONS

    return SESSIONS


async def test_an_idle_session_is_closed_on_both_sides(start_proxy: StartProxy, mock: tuple[Any, str]) -> None:
    app, url = mock
    proxy = await start_proxy(policy(url, idle_timeout="400ms"))
    async with aiohttp.ClientSession() as http, http.ws_connect(ws_url(proxy), headers=AUTH) as ws:
        assert orjson.loads((await ws.receive()).data)["type"] == "session.created"
        await ws.send_str(orjson.dumps({"type": "session.update", "session": {"instructions": "terse"}}).decode())
        updated = orjson.loads((await ws.receive()).data)
        assert updated["type"] == "session.updated" and updated["session"]["instructions"] == "terse"
        closing = await asyncio.wait_for(ws.receive(), 5)
        assert closing.type == aiohttp.WSMsgType.CLOSE and closing.data == 1000 and closing.extra == "idle timeout"
    await until(lambda: _closed(proxy, "idle_timeout"))
    await until(lambda: app[MOCK_STATS].in_flight == 0)  # the upstream's socket closed too


async def test_a_message_over_the_limit_ends_the_session(start_proxy: StartProxy, mock: tuple[Any, str]) -> None:
    _, url = mock
    proxy = await start_proxy(policy(url, max_message="1KiB"))
    async with aiohttp.ClientSession() as http, http.ws_connect(ws_url(proxy), headers=AUTH) as ws:
        assert orjson.loads((await ws.receive()).data)["type"] == "session.created"
        await ws.send_str(orjson.dumps({"type": "session.update", "session": {"instructions": "x" * 2048}}).decode())
        closing = await asyncio.wait_for(ws.receive(), 5)
        assert closing.type == aiohttp.WSMsgType.CLOSE and closing.data == 1009
    await until(lambda: _closed(proxy, "too_big"))
