"""What bounds a detached generation besides its buffer: `ttl` (nobody reads it: stopped, the upstream
closed) and the process's cap on detached generations; and how heartbeats are framed on a resumable
stream (a standalone `: ping` block before the first `id:`, glued to the next event after it), so that a
hand-written blank-line parser and the SDKs both get every event."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import openai
import pytest
from conftest import Proxy
from kit import build_policy, route_spec, upstream_spec
from kit.metrics import scrape, total
from kit.polling import until
from resume_helpers import read_stream, resume
from stream_helpers import mock_stats

from proxy.mock.server import MockSettings, start_mock
from proxy.runtime import Settings
from proxy.streaming.relay import StreamSettings

pytestmark = pytest.mark.timeout(60)

StartProxy = Callable[..., Awaitable[Proxy]]
BODY: Any = {"model": "gpt-a", "messages": [{"role": "user", "content": "signal boxes"}], "stream": True}
CHAT = "/v1/chat/completions"


@pytest.fixture
async def mock_url() -> AsyncIterator[str]:
    runner, url = await start_mock(MockSettings(output_tokens=12))
    yield url
    await runner.cleanup()


def policy(mock_url: str, ttl: str = "30s") -> str:
    stream = {"resumable": {"buffer": "1MiB", "ttl": ttl}}
    return build_policy({"oai": upstream_spec(mock_url)}, [route_spec("gpt", "oai", stream=stream)])


async def test_a_generation_nobody_reads_for_ttl_is_stopped(start_proxy: StartProxy, mock_url: str) -> None:
    proxy = await start_proxy(policy(mock_url, ttl="1s"))
    slow = {"x-mock-token-delay-ms": "500"}  # 12 tokens: 6 s, far longer than the ttl
    first = await read_stream("POST", proxy.url + CHAT, body=BODY, headers=slow, stop_after=1)
    assert first.stream_id is not None
    await until(lambda: proxy.state.streams.detached == 1)
    await until(lambda: proxy.state.streams.detached == 0, within=10)
    assert (await mock_stats(mock_url))["disconnects"] == 1  # stopped: the upstream connection closed
    assert total(await scrape(proxy), "signalbox_resumable_streams_stopped_total", reason="ttl") == 1
    late = await resume(proxy.url + CHAT, first.stream_id, 0)  # what was generated is still there, then the end
    assert late.status == 200 and b"stream_stopped" in late.blocks[-1]


async def test_a_reader_keeps_a_generation_alive_past_the_ttl(start_proxy: StartProxy, mock_url: str) -> None:
    proxy = await start_proxy(policy(mock_url, ttl="1s"))
    slow = {"x-mock-token-delay-ms": "250"}  # 3 s of tokens
    first = await read_stream("POST", proxy.url + CHAT, body=BODY, headers=slow, stop_after=2)
    assert first.stream_id is not None
    rest = await resume(proxy.url + CHAT, first.stream_id, 1)  # attached within the ttl: reads to the end
    assert rest.blocks[-1].startswith(b"data: [DONE]")
    assert (await mock_stats(mock_url))["disconnects"] == 0


async def test_past_the_detached_cap_a_leaving_client_stops_its_generation(
    start_proxy: StartProxy, mock_url: str
) -> None:
    settings = Settings(stream=StreamSettings(heartbeat=0.0, resume_max_detached=1))
    proxy = await start_proxy(policy(mock_url), settings=settings)
    slow = {"x-mock-token-delay-ms": "200"}
    kept = await read_stream("POST", proxy.url + CHAT, body=BODY, headers=slow, stop_after=1)
    await until(lambda: proxy.state.streams.detached == 1)
    cut = await read_stream("POST", proxy.url + CHAT, body=BODY, headers=slow, stop_after=1)
    assert kept.stream_id and cut.stream_id
    assert total(await scrape(proxy), "signalbox_resumable_streams_stopped_total", reason="detached_limit") == 1
    first = await resume(proxy.url + CHAT, kept.stream_id, 0)
    assert first.blocks[-1].startswith(b"data: [DONE]")  # the one within the cap ran to its end


async def test_heartbeats_are_standalone_before_the_first_id_and_glued_after(
    start_proxy: StartProxy, async_openai: Callable[..., openai.AsyncOpenAI], mock_url: str
) -> None:
    proxy = await start_proxy(policy(mock_url), heartbeat=0.1)
    slow = {"x-mock-token-delay-ms": "250", "x-mock-ttft-ms": "300"}
    got = await read_stream("POST", proxy.url + CHAT, body=BODY, headers=slow)
    assert got.body.startswith(b": ping\n\n")  # before any id: a block of its own
    naive = [block for block in got.body.split(b"\n\n") if block.startswith((b"data:", b"event:"))]
    after_first = got.body[got.body.index(b"id: 0\n\n") :]
    assert b"\n\n: ping\n\n" not in after_first and b": ping\ndata:" in after_first  # glued once an id went out
    # A parser that keeps blocks starting with a field misses exactly the glued ones (it must strip comment
    # lines first, as docs/apps/streaming.md says); the SDK gets every event.
    assert len(naive) + after_first.count(b": ping\ndata:") == len(got.blocks)
    client = async_openai(proxy, default_headers=slow)
    stream = await client.chat.completions.create(model="gpt-a", messages=BODY["messages"], stream=True)
    chunks = [chunk async for chunk in stream]
    assert len(chunks) == len(got.blocks) - 1  # every event but [DONE]
