"""What a client that never comes back costs: a fast upstream produces far more than the stream's buffer
while nobody reads, and the proxy holds no more than the buffer of it, by its own gauge (sampled all along)
and by tracemalloc (the live allocations of the resume package once the generation has ended). The process
cap on bytes across streams holds the same way with two detached streams."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from conftest import Proxy
from kit import build_policy, route_spec, upstream_spec
from kit.metrics import scrape, total
from kit.polling import until
from resume_helpers import read_stream

from proxy.mock.server import MockSettings, start_mock
from proxy.runtime import Settings
from proxy.streaming.relay import StreamSettings
from proxy.tasks import spawn

pytestmark = pytest.mark.timeout(90)

StartProxy = Callable[..., Awaitable[Proxy]]
BUFFER = 64 * 1024
FAST = {"x-mock-output-tokens": "20000"}  # ~5 MB of events, as fast as the mock writes them
BODY: Any = {"model": "gpt-a", "messages": [{"role": "user", "content": "go on and on"}], "stream": True}


@pytest.fixture
async def mock_url() -> AsyncIterator[str]:
    runner, url = await start_mock(MockSettings())
    yield url
    await runner.cleanup()


def policy(mock_url: str) -> str:
    stream = {"resumable": {"buffer": BUFFER, "ttl": "5m"}}  # never the bound here, however loaded the machine
    return build_policy({"oai": upstream_spec(mock_url)}, [route_spec("gpt", "oai", stream=stream)])


async def sample_max(read: Callable[[], int], into: list[int]) -> None:
    while True:
        into.append(read())
        await asyncio.sleep(0.002)


def held_by_resume_package(snapshot: tracemalloc.Snapshot) -> int:
    kept = snapshot.filter_traces([tracemalloc.Filter(True, "*/proxy/streaming/resume/*")])
    return sum(stat.size for stat in kept.statistics("filename"))


async def test_a_detached_stream_holds_no_more_than_its_buffer(start_proxy: StartProxy, mock_url: str) -> None:
    proxy = await start_proxy(policy(mock_url))
    hub = proxy.state.streams
    samples: list[int] = []
    sampler = spawn(sample_max(lambda: hub.buffered, samples), name="sampler")
    tracemalloc.start(1)
    try:
        first = await read_stream("POST", proxy.url + "/v1/chat/completions", body=BODY, headers=FAST, stop_after=1)
        assert first.stream_id is not None
        ring = hub.local(first.stream_id)
        assert ring is not None
        await until(lambda: ring.ended, within=60)
        held = held_by_resume_package(tracemalloc.take_snapshot())
    finally:
        tracemalloc.stop()
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
    produced = ring.next  # events generated while nobody read
    assert produced > 20000, list(ring.events)[-1]
    assert ring.first > produced - 1000  # the oldest went; only the newest stayed
    assert max(samples) <= BUFFER and ring.size <= BUFFER
    # What the resume package holds: the buffered events (made in events.py) with their object headers, and a
    # few small objects of the ring and the hub; nothing grows with what was generated.
    headers = sum(sys.getsizeof(event) - len(event) for event in ring.events)
    assert ring.size <= held <= BUFFER + headers + 16 * 1024
    gauge = total(await scrape(proxy), "signalbox_stream_buffered_bytes")
    assert 0 < gauge <= BUFFER


async def test_the_process_cap_bounds_every_stream_together(start_proxy: StartProxy, mock_url: str) -> None:
    cap = 48 * 1024
    proxy = await start_proxy(policy(mock_url), settings=Settings(stream=StreamSettings(heartbeat=0.0,
                                                                                        resume_max_bytes=cap)))
    hub = proxy.state.streams
    samples: list[int] = []
    sampler = spawn(sample_max(lambda: hub.buffered, samples), name="sampler")
    try:
        got = await asyncio.gather(*[
            read_stream("POST", proxy.url + "/v1/chat/completions", body=BODY, headers=FAST, stop_after=1)
            for _ in range(2)
        ])
        rings = [hub.local(g.stream_id or "") for g in got]
        assert all(r is not None for r in rings)
        await until(lambda: all(r is not None and r.ended for r in rings), within=60)
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
    assert max(samples) <= cap + 4 * 1024  # at most one event over while an append makes room
    assert hub.buffered <= cap
