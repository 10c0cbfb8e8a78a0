"""A whole answer's socket reads are bounded by `first_token` each (client.LazyReadTimer: one timer per
connection that a read moves on, instead of aiohttp's cancel and re-arm per read). Through the proxy, with a
real upstream on loopback that sends the body in pieces."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import openai
import orjson
import pytest
from aiohttp import web

ANSWER = orjson.dumps(
    {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
)


@pytest.fixture
async def dripping() -> AsyncIterator[tuple[str, list[float]]]:
    """An upstream that sends the headers, then the body in pieces `gaps` seconds apart (set per test)."""
    gaps: list[float] = []

    async def chat(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = len(ANSWER)
        await response.prepare(request)
        pieces = len(gaps) + 1
        size = -(-len(ANSWER) // pieces)
        for i in range(pieces):
            if i:
                await asyncio.sleep(gaps[i - 1])
            await response.write(ANSWER[i * size : (i + 1) * size])
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}/v1", gaps
    await runner.cleanup()


def _policy(base_url: str) -> str:
    return f"""
upstreams:
  slow: {{provider: openai, base_url: "{base_url}", api_key: sk-test-upstream, timeouts: {{first_token: 0.4s}}}}
tenants:
  alpha: {{keys: [sk-alpha]}}
routes:
  - {{name: chat, match: {{model: "*"}}, upstream: slow}}
"""


async def test_a_body_that_keeps_coming_within_first_token_per_read_is_relayed_whole(
    start_proxy: Callable[..., Any], async_openai: Callable[..., openai.AsyncOpenAI],
    dripping: tuple[str, list[float]],
) -> None:
    base_url, gaps = dripping
    gaps[:] = [0.25, 0.25, 0.25]  # 0.75 s in all, each gap under first_token: the moved deadline holds
    proxy = await start_proxy(_policy(base_url))
    answer = await async_openai(proxy).chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert answer.choices[0].message.content == "ok"


async def test_a_body_that_stalls_past_first_token_is_a_504(
    start_proxy: Callable[..., Any], async_openai: Callable[..., openai.AsyncOpenAI],
    dripping: tuple[str, list[float]],
) -> None:
    base_url, gaps = dripping
    gaps[:] = [0.1, 1.5]  # a read, then a silence longer than first_token
    proxy = await start_proxy(_policy(base_url))
    with pytest.raises(openai.APIStatusError) as info:
        await async_openai(proxy).chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 504
    assert "stopped sending mid-response" in info.value.message


async def test_reads_move_the_deadline_of_one_timer_which_fires_once_they_stop() -> None:
    from proxy.upstream.client import LazyReadTimer

    loop = asyncio.get_running_loop()
    protocol = LazyReadTimer(loop=loop)
    fired: list[float] = []
    protocol._on_read_timeout = lambda: fired.append(loop.time())  # type: ignore[method-assign]
    protocol.read_timeout = 0.5
    protocol.start_timeout()
    timer = protocol._read_timeout_handle
    assert timer is not None
    for _ in range(4):  # four reads well within the limit: they move its deadline, not its timer
        await asyncio.sleep(0.02)
        protocol._reschedule_timeout()
        assert protocol._read_timeout_handle is timer
    last_read = loop.time()
    await asyncio.sleep(0.8)
    assert len(fired) == 1  # once, after the limit counted from the last read
    assert fired[0] >= last_read + 0.5 - 0.002
    assert protocol._read_timeout_handle is None
