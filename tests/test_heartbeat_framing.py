"""Heartbeat framing as clients see it: a hand-written parser that splits the body on blank lines and keeps
the blocks starting with `data:` or `event:` gets every event, and so do the openai and anthropic SDKs,
with a heartbeat every 100 ms between tokens 250 ms apart. Once an `id:` has reached the client, a
heartbeat joins the next block instead (an SDK decoder that has seen an id dispatches a comment-only block
as an empty event)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anthropic
import openai
import orjson
import pytest
from conftest import Proxy
from kit import build_policy, route_spec, upstream_spec
from stream_helpers import SSE, Script, ScriptedUpstream, Servers, chat_chunk, read_raw

from proxy.mock.server import MockSettings, start_mock
from proxy.runtime import Settings
from proxy.streaming.relay import StreamSettings

pytestmark = pytest.mark.timeout(40)

StartProxy = Callable[..., Awaitable[Proxy]]
PROMPT: Any = [{"role": "user", "content": "tell me about signal boxes"}]
SLOW = {"x-mock-token-delay-ms": "250"}
KEYS = {"Authorization": "Bearer sk-alpha", "x-api-key": "sk-alpha", "anthropic-version": "2023-06-01"}
BEATING = Settings(stream=StreamSettings(heartbeat=0.1))


@pytest.fixture
async def mock_url() -> AsyncIterator[str]:
    runner, url = await start_mock(MockSettings(output_tokens=6))
    yield url
    await runner.cleanup()


@pytest.fixture
async def scripted(servers: Servers) -> ScriptedUpstream:
    return await servers.scripted()


def policy(mock_url: str, scripted: ScriptedUpstream) -> str:
    upstreams = {
        "oai": upstream_spec(mock_url),
        "claude": upstream_spec(mock_url, "anthropic"),
        "scripted": upstream_spec(scripted.url, key=None),
    }
    routes = [
        route_spec("gpt", "oai", model="gpt-*"),
        route_spec("claude", "claude", model="claude-*"),
        route_spec("scripted", "scripted", model="scripted-*"),
    ]
    return build_policy(upstreams, routes)


def naive_blocks(body: bytes) -> list[bytes]:
    """The hand-written parser: split on blank lines, keep what starts with `data:` or `event:`."""
    return [block for block in body.split(b"\n\n") if block.startswith((b"data:", b"event:"))]


def data_of(block: bytes) -> Any:
    line = next(line for line in block.split(b"\n") if line.startswith(b"data:"))
    value = line.removeprefix(b"data:").strip()
    return value.decode() if value == b"[DONE]" else orjson.loads(value)


async def test_a_blank_line_splitting_parser_gets_every_event_between_heartbeats(
    start_proxy: StartProxy, mock_url: str, scripted: ScriptedUpstream
) -> None:
    proxy = await start_proxy(policy(mock_url, scripted), settings=BEATING)
    plain = await start_proxy(policy(mock_url, scripted))  # no heartbeats: what the events must be
    for path, body in (
        ("/chat/completions", {"model": "gpt-a", "messages": PROMPT, "stream": True}),
        ("/messages", {"model": "claude-a", "max_tokens": 64, "messages": PROMPT, "stream": True}),
        ("/chat/completions", {"model": "claude-a", "messages": PROMPT, "stream": True}),  # translated
    ):
        beating, quiet = await asyncio.gather(
            read_raw(proxy.v1 + path, body, {**KEYS, **SLOW}), read_raw(plain.v1 + path, body, {**KEYS, **SLOW})
        )
        assert beating.status == quiet.status == 200
        assert beating.body.count(b": ping\n\n") >= 6  # one after the headers, then in every 250 ms gap
        assert b"id:" not in beating.body
        expected = [_without_ids(data_of(b)) for b in naive_blocks(quiet.body)]
        assert len(expected) >= 8
        assert [_without_ids(data_of(b)) for b in naive_blocks(beating.body)] == expected, path


def _without_ids(value: Any) -> Any:
    """Event payloads minus what differs between two generations (ids, timestamps)."""
    if isinstance(value, dict):
        return {k: _without_ids(v) for k, v in value.items() if k not in ("id", "created")}
    return value


async def test_both_sdks_get_every_token_with_heartbeats_every_100ms(
    start_proxy: StartProxy,
    mock_url: str,
    scripted: ScriptedUpstream,
    async_openai: Callable[..., openai.AsyncOpenAI],
) -> None:
    proxy = await start_proxy(policy(mock_url, scripted), settings=BEATING)
    plain = await start_proxy(policy(mock_url, scripted))
    claude = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="sk-alpha", max_retries=0, timeout=15.0)

    async def openai_text(target: Proxy, model: str) -> str:
        stream = await async_openai(target, timeout=15.0).chat.completions.create(
            model=model, messages=PROMPT, stream=True, extra_headers=SLOW
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    try:
        async with claude.messages.stream(
            model="claude-a", max_tokens=64, messages=PROMPT, extra_headers=SLOW
        ) as stream:
            anthropic_text = "".join([text async for text in stream.text_stream])
    finally:
        await claude.close()
    expected = await openai_text(plain, "gpt-a")
    assert expected != ""
    assert await openai_text(proxy, "gpt-a") == await openai_text(proxy, "claude-a") == expected
    assert anthropic_text == expected


async def test_after_an_id_heartbeats_join_the_next_block(
    start_proxy: StartProxy,
    mock_url: str,
    scripted: ScriptedUpstream,
    async_openai: Callable[..., openai.AsyncOpenAI],
) -> None:
    proxy = await start_proxy(policy(mock_url, scripted), settings=BEATING)
    events = [chat_chunk({"content": c}) for c in ("a", "b", "c")]
    events = [b"id: " + str(i).encode() + b"\n" + e for i, e in enumerate(events, 1)]
    events += [chat_chunk({}, finish="stop"), b"data: [DONE]\n\n"]
    script = Script(headers=SSE, events=events, ttft=0.25, gap=0.25)
    scripted.reply(script, script)
    raw = await read_raw(proxy.v1 + "/chat/completions", {"model": "scripted-m", "stream": True}, KEYS)
    body = raw.body
    first_id = body.index(b"id: 1")
    # Before the first id: heartbeats are blocks of their own; after it, lone lines glued to the next block.
    assert body[:first_id].count(b": ping\n\n") >= 2
    after = body[first_id:]
    assert after.count(b": ping\n") >= 3 and b": ping\n\n" not in after
    assert body.replace(b": ping\n\n", b"").replace(b": ping\n", b"") == b"".join(events)
    # The SDK, which has seen an id, dispatches no empty event (its json.loads would fail on one).
    stream = await async_openai(proxy, timeout=15.0).chat.completions.create(
        model="scripted-m", messages=PROMPT, stream=True
    )
    assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]) == "abc"
