"""Resumable streams end to end (memory store): a client's connection is cut mid-stream, the generation goes
on without it, and a reconnect with Last-Event-ID gets exactly the remaining events: for an OpenAI chat
stream, an Anthropic Messages stream and a translated upstream (Anthropic behind chat completions, OpenAI
behind messages). Only the same tenant may resume."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import yaml
from conftest import Proxy
from kit import build_policy, route_spec, upstream_spec
from kit.metrics import scrape, total
from kit.polling import until
from resume_helpers import data_of, read_stream, resume, text_of
from stream_helpers import mock_stats

from proxy.mock.server import MockSettings, start_mock

pytestmark = pytest.mark.timeout(60)

StartProxy = Callable[..., Awaitable[Proxy]]
PROMPT: Any = [{"role": "user", "content": "tell me about signal boxes and their levers"}]
TOKENS = 12
PACED = {"x-mock-token-delay-ms": "40"}


@pytest.fixture
async def mock_url() -> AsyncIterator[str]:
    runner, url = await start_mock(MockSettings(output_tokens=TOKENS))
    yield url
    await runner.cleanup()


def policy(mock_url: str, *, resumable: str = "{buffer: 1MiB, ttl: 30s}") -> str:
    upstreams = {"oai": upstream_spec(mock_url), "claude": upstream_spec(mock_url, "anthropic")}
    stream = {"resumable": yaml.safe_load(resumable)}
    routes = [
        route_spec("gpt", "oai", model="gpt-*", stream=stream),
        route_spec("claude", "claude", model="claude-*", stream=stream),
    ]
    tenants = {"alpha": {"keys": ["sk-alpha"]}, "beta": {"keys": ["sk-beta"]}}
    return build_policy(upstreams, routes, tenants=tenants)


CASES = [
    pytest.param("/v1/chat/completions", {"model": "gpt-a", "messages": PROMPT, "stream": True}, id="openai"),
    pytest.param("/v1/messages", {"model": "claude-a", "max_tokens": 64, "messages": PROMPT, "stream": True},
                 id="anthropic"),
    pytest.param("/v1/chat/completions", {"model": "claude-a", "messages": PROMPT, "stream": True},
                 id="translated-anthropic-upstream"),
    pytest.param("/v1/messages", {"model": "gpt-a", "max_tokens": 64, "messages": PROMPT, "stream": True},
                 id="translated-openai-upstream"),
]


@pytest.mark.parametrize(("path", "body"), CASES)
async def test_a_reconnect_with_last_event_id_gets_exactly_the_remaining_events(
    start_proxy: StartProxy, mock_url: str, path: str, body: dict[str, Any]
) -> None:
    proxy = await start_proxy(policy(mock_url))
    whole = await read_stream("POST", proxy.url + path, body=body)
    assert whole.status == 200 and whole.stream_id is not None
    assert whole.ids == list(range(len(whole.blocks)))  # every event numbered, from 0

    first = await read_stream("POST", proxy.url + path, body=body, headers=PACED, stop_after=4)
    assert first.ids == [0, 1, 2, 3] and first.stream_id is not None and first.stream_id != whole.stream_id
    await asyncio.sleep(0.3)  # the generation goes on meanwhile
    rest = await resume(proxy.url + path, first.stream_id, 3, body=body)
    assert rest.status == 200 and rest.stream_id == first.stream_id
    assert rest.ids == list(range(4, len(whole.blocks)))  # no repeat, no loss
    blocks = first.blocks + rest.blocks
    assert text_of(blocks) == text_of(whole.blocks)
    assert data_of(blocks[-1]) == "[DONE]" or data_of(blocks[-1])["type"] == "message_stop"
    stats = await mock_stats(mock_url)
    assert stats["disconnects"] == 0  # the upstream was never cut: the generation ran to its end
    found = await scrape(proxy)
    assert total(found, "signalbox_stream_resumes_total", source="local") == 1


async def test_a_resume_waits_for_the_live_tail(start_proxy: StartProxy, mock_url: str) -> None:
    """Resumed before the generation ended: the buffered events, then the rest as they come."""
    proxy = await start_proxy(policy(mock_url))
    body = {"model": "gpt-a", "messages": PROMPT, "stream": True}
    slow = {"x-mock-token-delay-ms": "150"}
    whole = await read_stream("POST", proxy.url + "/v1/chat/completions", body=body)
    first = await read_stream("POST", proxy.url + "/v1/chat/completions", body=body, headers=slow, stop_after=2)
    assert first.stream_id is not None
    rest = await resume(proxy.url + "/v1/chat/completions", first.stream_id, 1)
    assert rest.ids == list(range(2, len(whole.blocks)))
    assert data_of(rest.blocks[-1]) == "[DONE]"
    assert text_of(first.blocks + rest.blocks) == text_of(whole.blocks)


async def test_another_tenant_cannot_resume(start_proxy: StartProxy, mock_url: str) -> None:
    proxy = await start_proxy(policy(mock_url))
    body = {"model": "gpt-a", "messages": PROMPT, "stream": True}
    first = await read_stream("POST", proxy.url + "/v1/chat/completions", body=body, headers=PACED, stop_after=2)
    assert first.stream_id is not None
    other = await resume(proxy.url + "/v1/chat/completions", first.stream_id, 1,
                         headers={"Authorization": "Bearer sk-beta", "x-api-key": "sk-beta"})
    assert other.status == 404
    assert b"stream_not_found" in other.body and first.stream_id.encode() not in other.body
    unknown = await resume(proxy.url + "/v1/chat/completions", "sbs_nope", 1)
    assert unknown.status == 404
    mine = await resume(proxy.url + "/v1/chat/completions", first.stream_id, 1)
    assert mine.status == 200 and mine.ids[0] == 2
    found = await scrape(proxy)
    assert total(found, "signalbox_stream_resume_failures_total", reason="unknown") == 2


async def test_a_detached_generation_keeps_its_slot_until_it_ends(start_proxy: StartProxy, mock_url: str) -> None:
    """The request's concurrency stays taken while its generation runs without a client, and is back after."""
    text = policy(mock_url).replace("  stream:", "  limits: {concurrent: 1}\n  stream:", 1)
    proxy = await start_proxy(text)
    body = {"model": "gpt-a", "messages": PROMPT, "stream": True}
    slow = {"x-mock-token-delay-ms": "100"}
    first = await read_stream("POST", proxy.url + "/v1/chat/completions", body=body, headers=slow, stop_after=2)
    assert first.stream_id is not None
    await until(lambda: proxy.state.streams.detached == 1)
    refused = await read_stream("POST", proxy.url + "/v1/chat/completions", body=body)
    assert refused.status == 429  # the detached generation still holds the one slot
    await until(lambda: proxy.state.streams.detached == 0, within=10)
    again = await read_stream("POST", proxy.url + "/v1/chat/completions", body=body)
    assert again.status == 200


async def test_a_resume_from_a_dropped_id_is_refused_in_the_clients_protocol(
    start_proxy: StartProxy, mock_url: str
) -> None:
    proxy = await start_proxy(policy(mock_url, resumable="{buffer: 1KiB, ttl: 30s}"))
    body = {"model": "claude-a", "max_tokens": 64, "messages": PROMPT, "stream": True}
    first = await read_stream("POST", proxy.url + "/v1/messages", body=body, headers=PACED, stop_after=1)
    assert first.stream_id is not None
    ring = proxy.state.streams.local(first.stream_id)
    assert ring is not None
    await until(lambda: ring.ended, within=10)  # ended: the buffer kept only the newest events
    assert ring.first > 1 and ring.size <= 1024
    gone = await resume(proxy.url + "/v1/messages", first.stream_id, 0)
    assert gone.status == 409
    assert b'"type":"error"' in gone.body and b"no longer buffered" in gone.body
    tail = await resume(proxy.url + "/v1/messages", first.stream_id, ring.first - 1)
    assert tail.status == 200 and data_of(tail.blocks[-1])["type"] == "message_stop"


async def test_an_attached_client_loses_nothing_however_small_the_buffer(
    start_proxy: StartProxy, mock_url: str
) -> None:
    """A client that reads is waited for, as on a plain stream: the buffer drops only what every attached
    reader has written (here a 1 KiB buffer under a fast upstream of ~4,000 events)."""
    proxy = await start_proxy(policy(mock_url, resumable="{buffer: 1KiB, ttl: 30s}"))
    body = {"model": "gpt-a", "messages": PROMPT, "stream": True}
    got = await read_stream("POST", proxy.url + "/v1/chat/completions", body=body,
                            headers={"x-mock-output-tokens": "4000"})
    assert got.ids == list(range(len(got.blocks))) and len(got.blocks) > 4000
    assert data_of(got.blocks[-1]) == "[DONE]"
