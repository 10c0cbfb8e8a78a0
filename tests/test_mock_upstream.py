"""The built-in mock upstream, driven over loopback by the official openai and anthropic SDKs
(and raw aiohttp where the SDKs hide the wire): formats, determinism, faults and stats."""

from __future__ import annotations

import asyncio
import json
import math
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
from hypothesis import given
from hypothesis import strategies as st
from kit import until

from proxy.mock.content import split_pieces
from proxy.mock.server import (
    MOCK_STATS,
    BadHeader,
    MockFault,
    MockSettings,
    MockStats,
    resolve_knobs,
    start_mock,
)

USER: Any = [{"role": "user", "content": "what is the weather in Paris"}]
WEATHER_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "unit": {"enum": ["c", "f"]},
            },
        },
    },
}
TIME_TOOL: Any = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}

Server = tuple[Any, str]
StartServer = Callable[..., Awaitable[str]]


@pytest.fixture
async def start() -> AsyncIterator[StartServer]:
    """Start mock servers on loopback with given settings; all are cleaned up after the test."""
    runners: list[Any] = []

    async def _start(**settings: Any) -> str:
        runner, url = await start_mock(MockSettings(**settings))
        runners.append(runner)
        return url

    yield _start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def url(start: StartServer) -> str:
    return await start(output_tokens=6)


@pytest.fixture
async def oai(url: str) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as client:
        yield client


@pytest.fixture
async def claude(url: str) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic.AsyncAnthropic(base_url=url, api_key="x", max_retries=0) as client:
        yield client


async def get_stats(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(url + "/mock/stats") as resp:
        result: dict[str, Any] = await resp.json()
        return result


async def wait_for_stats(url: str, check: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """Poll the stats endpoint until `check` holds (kit.until, at most 3 seconds); those stats."""

    async def matching() -> dict[str, Any] | None:
        stats = await get_stats(url)
        return stats if check(stats) else None

    found: dict[str, Any] = await until(matching, within=3.0)
    return found


# --- OpenAI chat ----------------------------------------------------------------------------------


async def test_chat_non_stream_is_deterministic_with_usage_and_headers(oai: openai.AsyncOpenAI) -> None:
    raw = await oai.chat.completions.with_raw_response.create(model="gpt-x", messages=USER)
    first = raw.parse()
    second = await oai.chat.completions.create(model="gpt-x", messages=USER)
    text = first.choices[0].message.content
    assert text is not None and text == second.choices[0].message.content
    assert text.split() == ["mock", "what", "is", "the", "weather", "in"]
    assert first.id.startswith("chatcmpl-") and first.model == "gpt-x" and first.system_fingerprint
    assert first.choices[0].finish_reason == "stop"
    assert first.usage is not None and first.usage.completion_tokens == 6
    assert first.usage.prompt_tokens >= 1
    assert first.usage.total_tokens == first.usage.prompt_tokens + 6
    assert raw.headers["x-request-id"].startswith("req_")
    assert raw.headers["x-ratelimit-remaining-requests"].isdigit()


async def test_chat_max_tokens_stops_with_length(oai: openai.AsyncOpenAI) -> None:
    for field in ("max_tokens", "max_completion_tokens"):
        resp = await oai.chat.completions.create(model="m", messages=USER, **{field: 2})  # type: ignore[call-overload]
        assert resp.choices[0].finish_reason == "length"
        assert resp.usage is not None and resp.usage.completion_tokens == 2
        assert resp.choices[0].message.content == "mock what"


async def test_chat_stream_matches_non_stream_and_include_usage(oai: openai.AsyncOpenAI) -> None:
    full = await oai.chat.completions.create(model="m", messages=USER)
    stream = await oai.chat.completions.create(
        model="m", messages=USER, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    contents = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(contents) == 6  # one delta per token
    assert "".join(contents) == full.choices[0].message.content
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks[:-1]][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 6
    assert all(c.usage is None for c in chunks[:-1])

    plain = [c async for c in await oai.chat.completions.create(model="m", messages=USER, stream=True)]
    assert all(c.choices for c in plain)  # no usage chunk unless asked for


async def test_chat_tool_calls_non_stream_and_named_choice(oai: openai.AsyncOpenAI) -> None:
    resp = await oai.chat.completions.create(model="m", messages=USER, tools=[WEATHER_TOOL, TIME_TOOL])
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    args = json.loads(call.function.arguments)
    assert isinstance(args["city"], str) and isinstance(args["days"], int) and args["unit"] == "c"

    named = await oai.chat.completions.create(
        model="m",
        messages=USER,
        tools=[WEATHER_TOOL, TIME_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )
    assert named.choices[0].message.tool_calls is not None
    named_call = named.choices[0].message.tool_calls[0]
    assert named_call.type == "function" and named_call.function.name == "get_time"
    off = await oai.chat.completions.create(
        model="m", messages=USER, tools=[WEATHER_TOOL], tool_choice="none"
    )
    assert off.choices[0].message.tool_calls is None and off.choices[0].finish_reason == "stop"


async def test_chat_tool_calls_streamed_accumulate_to_json(oai: openai.AsyncOpenAI) -> None:
    full = await oai.chat.completions.create(model="m", messages=USER, tools=[WEATHER_TOOL])
    assert full.choices[0].message.tool_calls is not None
    full_call = full.choices[0].message.tool_calls[0]
    assert full_call.type == "function"
    expected = json.loads(full_call.function.arguments)

    raw = await oai.chat.completions.create(model="m", messages=USER, tools=[WEATHER_TOOL], stream=True)
    deltas = [c.choices[0].delta.tool_calls for c in [c async for c in raw] if c.choices[0].delta.tool_calls]
    assert len(deltas) > 2
    assert deltas[0][0].id and deltas[0][0].function and deltas[0][0].function.name == "get_weather"
    assert all(d[0].id is None and d[0].function and d[0].function.name is None for d in deltas[1:])

    async with oai.chat.completions.stream(model="m", messages=USER, tools=[WEATHER_TOOL]) as stream:
        final = await stream.get_final_completion()
    assert final.choices[0].finish_reason == "tool_calls"
    assert final.choices[0].message.tool_calls is not None
    assert json.loads(final.choices[0].message.tool_calls[0].function.arguments) == expected


async def test_legacy_completions_stream_and_not(oai: openai.AsyncOpenAI) -> None:
    full = await oai.completions.create(model="m", prompt="say hello", max_tokens=3)
    assert full.object == "text_completion" and full.choices[0].text == "mock say hello"
    assert full.choices[0].finish_reason == "length"
    stream = await oai.completions.create(model="m", prompt="say hello", stream=True)
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].text for c in chunks) == "mock say hello say hello say"
    assert chunks[-1].choices[0].finish_reason == "stop"


# --- embeddings and models ------------------------------------------------------------------------


async def test_embeddings_base64_and_float_agree_and_position_is_irrelevant(oai: openai.AsyncOpenAI) -> None:
    batch = await oai.embeddings.create(model="e", input=["alpha", "beta", "gamma"])  # SDK asks for base64
    alone = await oai.embeddings.create(model="e", input="gamma", encoding_format="float")
    first = await oai.embeddings.create(model="e", input=["gamma", "alpha"], encoding_format="float")
    assert [d.index for d in batch.data] == [0, 1, 2]
    assert batch.data[2].embedding == alone.data[0].embedding == first.data[0].embedding
    assert batch.data[0].embedding == first.data[1].embedding
    assert batch.data[0].embedding != batch.data[1].embedding
    vec = alone.data[0].embedding
    assert len(vec) == 8 and math.isclose(math.fsum(x * x for x in vec), 1.0, rel_tol=1e-5)
    sized = await oai.embeddings.create(model="e", input="gamma", dimensions=32)
    assert len(sized.data[0].embedding) == 32
    singles = [await oai.embeddings.create(model="e", input=w) for w in ("alpha", "beta", "gamma")]
    assert batch.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)


async def test_embeddings_token_arrays(oai: openai.AsyncOpenAI) -> None:
    many = await oai.embeddings.create(model="e", input=[[1, 2, 3], [4, 5]])
    one = await oai.embeddings.create(model="e", input=[4, 5])
    assert many.usage.prompt_tokens == 5 and one.usage.prompt_tokens == 2
    assert many.data[1].embedding == one.data[0].embedding != many.data[0].embedding


async def test_embeddings_empty_input_names_its_index(oai: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        await oai.embeddings.create(model="e", input=["ok", "fine", ""])
    assert err.value.param == "input" and "index 2" in err.value.message
    with pytest.raises(openai.BadRequestError):
        await oai.embeddings.create(model="e", input=[])


async def test_models_list(oai: openai.AsyncOpenAI) -> None:
    models = [m async for m in oai.models.list()]
    assert len(models) >= 2 and all(m.object == "model" for m in models)


# --- Anthropic ------------------------------------------------------------------------------------


async def test_anthropic_message_text_and_stream_agree(claude: anthropic.AsyncAnthropic) -> None:
    raw = await claude.messages.with_raw_response.create(model="claude-x", max_tokens=100, messages=USER)
    msg = await raw.parse()
    assert raw.headers["request-id"].startswith("req_")
    assert msg.id.startswith("msg_") and msg.model == "claude-x" and msg.stop_reason == "end_turn"
    assert msg.content[0].type == "text" and msg.content[0].text.split()[0] == "mock"
    assert msg.usage.output_tokens == 6 and msg.usage.input_tokens >= 1

    events = [e.type async for e in await claude.messages.create(
        model="claude-x", max_tokens=100, messages=USER, stream=True
    )]
    assert events == ["message_start", "content_block_start"] + ["content_block_delta"] * 6 + [
        "content_block_stop", "message_delta", "message_stop",
    ]  # the SDK skips the ping
    async with claude.messages.stream(model="claude-x", max_tokens=100, messages=USER) as stream:
        final = await stream.get_final_message()
    assert final.content[0].type == "text" and final.content[0].text == msg.content[0].text
    assert final.usage.output_tokens == 6 and final.stop_reason == "end_turn"

    short = await claude.messages.create(model="claude-x", max_tokens=2, messages=USER)
    assert short.stop_reason == "max_tokens" and short.usage.output_tokens == 2


async def test_anthropic_tool_use_stream_and_not(claude: anthropic.AsyncAnthropic) -> None:
    tools: Any = [
        {"name": "lookup", "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}}},
        {"name": "get_weather", "input_schema": {"properties": {"city": {"type": "string"}}}},
    ]
    choice: Any = {"type": "tool", "name": "get_weather"}
    msg = await claude.messages.create(
        model="c", max_tokens=50, messages=USER, tools=tools, tool_choice=choice
    )
    block = msg.content[0]
    assert msg.stop_reason == "tool_use" and block.type == "tool_use" and block.name == "get_weather"
    assert isinstance(block.input, dict) and isinstance(block.input["city"], str)
    async with claude.messages.stream(
        model="c", max_tokens=50, messages=USER, tools=tools, tool_choice=choice
    ) as stream:
        final = await stream.get_final_message()
    assert final.content[0].type == "tool_use" and final.content[0].input == block.input
    assert final.stop_reason == "tool_use"


async def test_anthropic_count_tokens_and_required_max_tokens(
    url: str, claude: anthropic.AsyncAnthropic
) -> None:
    counted = await claude.messages.count_tokens(model="c", messages=USER, system="be brief")
    msg = await claude.messages.create(model="c", max_tokens=5, messages=USER, system="be brief")
    assert counted.input_tokens == msg.usage.input_tokens >= 1
    async with aiohttp.ClientSession() as session:
        async with session.post(url + "/v1/messages", json={"model": "c", "messages": USER}) as resp:
            body = await resp.json()
    assert resp.status == 400 and resp.headers["request-id"]
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in body["error"]["message"]


# --- faults ---------------------------------------------------------------------------------------


async def test_status_fault_raises_the_sdk_error_with_retry_after(
    url: str, oai: openai.AsyncOpenAI, claude: anthropic.AsyncAnthropic
) -> None:
    with pytest.raises(openai.RateLimitError) as rate:
        await oai.chat.completions.create(
            model="m", messages=USER, extra_headers={"x-mock-status": "429", "x-mock-retry-after": "1.5"}
        )
    assert rate.value.response.headers["retry-after"] == "1.5"
    assert rate.value.response.headers["retry-after-ms"] == "1500"
    assert rate.value.code == "rate_limit_exceeded" and rate.value.type == "requests"
    with pytest.raises(openai.InternalServerError) as server:
        await oai.embeddings.create(model="e", input="x", extra_headers={"x-mock-status": "503"})
    assert server.value.type == "server_error" and "retry-after" not in server.value.response.headers
    with pytest.raises(anthropic.OverloadedError) as over:
        await claude.messages.create(
            model="c", max_tokens=5, messages=USER, extra_headers={"x-mock-status": "529"}
        )
    assert over.value.response.headers["request-id"].startswith("req_")
    assert (await get_stats(url))["faults"]["status"] == 3


async def test_bad_header_value_is_a_400_in_the_provider_shape(
    oai: openai.AsyncOpenAI, claude: anthropic.AsyncAnthropic
) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        await oai.chat.completions.create(model="m", messages=USER, extra_headers={"x-mock-ttft-ms": "soon"})
    assert "x-mock-ttft-ms" in err.value.message
    with pytest.raises(anthropic.BadRequestError) as aerr:
        await claude.messages.create(
            model="c", max_tokens=5, messages=USER, extra_headers={"x-mock-status": "200"}
        )
    assert "x-mock-status" in str(aerr.value)


async def test_drop_fault_truncates_streams_and_bodies(url: str, oai: openai.AsyncOpenAI) -> None:
    stream = await oai.chat.completions.create(
        model="m", messages=USER, stream=True, extra_headers={"x-mock-drop-after": "3"}
    )
    got: list[Any] = []
    with pytest.raises(openai.APIConnectionError):
        async for chunk in stream:
            got.append(chunk)
    assert len(got) == 3
    with pytest.raises(openai.APIConnectionError):
        await oai.chat.completions.create(model="m", messages=USER, extra_headers={"x-mock-drop-after": "0"})
    async with anthropic.AsyncAnthropic(base_url=url, api_key="x", max_retries=0) as claude:
        events = await claude.messages.create(
            model="c", max_tokens=5, messages=USER, stream=True, extra_headers={"x-mock-drop-after": "4"}
        )
        seen: list[str] = []
        with pytest.raises(Exception) as exc:  # noqa: B017 - the anthropic SDK surfaces the raw transport error
            async for event in events:
                seen.append(event.type)
        assert "message_stop" not in seen and not isinstance(exc.value, AssertionError)
    stats = await get_stats(url)
    assert stats["faults"]["drop"] == 3 and stats["disconnects"] == 0  # the server hung up, not the client


async def test_stall_and_ttft_are_observed(start: StartServer) -> None:
    url = await start(ttft=0.3, output_tokens=2)
    loop = asyncio.get_running_loop()
    body = {"model": "m", "messages": USER, "stream": True}
    async with aiohttp.ClientSession() as session:
        t0 = loop.time()
        async with session.post(url + "/v1/chat/completions", json=body) as resp:
            t_headers = loop.time()
            await resp.content.readuntil(b"\n\n")
            t_first = loop.time()
            await resp.read()
        assert t_first - t0 >= 0.3 and t_first - t_headers >= 0.15  # headers go out before the ttft wait
        t0 = loop.time()
        headers = {"x-mock-stall-ms": "250", "x-mock-ttft-ms": "0"}
        async with session.post(url + "/v1/chat/completions", json=body, headers=headers) as resp:
            assert loop.time() - t0 >= 0.25  # a stall holds back even the headers
            assert resp.status == 200
            await resp.read()
    assert (await get_stats(url))["faults"]["stall"] == 1


async def test_probabilistic_faults_follow_the_seed(start: StartServer) -> None:
    fault = MockFault("status", probability=0.5, status=503)
    runs: list[list[int]] = []
    for _ in range(2):
        url = await start(faults=(fault,), seed=1234)
        async with aiohttp.ClientSession() as session:
            statuses = []
            for _ in range(30):
                async with session.get(url + "/v1/models") as resp:
                    statuses.append(resp.status)
        runs.append(statuses)
        assert (await get_stats(url))["faults"]["status"] == statuses.count(503)
    assert runs[0] == runs[1]
    assert set(runs[0]) == {200, 503}


# --- stats ----------------------------------------------------------------------------------------


async def test_stats_count_paths_concurrency_and_reset(url: str, oai: openai.AsyncOpenAI) -> None:
    slow = {"x-mock-ttft-ms": "300"}
    await asyncio.gather(
        *(oai.chat.completions.create(model="m", messages=USER, extra_headers=slow) for _ in range(4))
    )
    await oai.embeddings.create(model="e", input="x")
    stats = await get_stats(url)
    assert stats["requests_total"] == 5 and stats["in_flight"] == 0 and stats["max_in_flight"] == 4
    assert stats["by_path"] == {"/v1/chat/completions": 4, "/v1/embeddings": 1}
    async with aiohttp.ClientSession() as session, session.post(url + "/mock/stats/reset") as resp:
        assert (await resp.json())["requests_total"] == 0
    assert (await get_stats(url))["max_in_flight"] == 0


async def test_client_disconnect_mid_stream_is_counted(url: str) -> None:
    body = {"model": "m", "messages": USER, "stream": True}
    headers = {"x-mock-output-tokens": "500", "x-mock-token-delay-ms": "10"}
    async with aiohttp.ClientSession() as session:
        resp = await session.post(url + "/v1/chat/completions", json=body, headers=headers)
        await resp.content.readuntil(b"\n\n")
        assert (await get_stats(url))["in_flight"] == 1
        resp.close()  # drop the connection with most of the stream still to come
    stats = await wait_for_stats(url, lambda s: s["disconnects"] == 1 and s["in_flight"] == 0)
    assert stats["faults"]["drop"] == 0


async def test_app_key_exposes_the_same_stats() -> None:
    runner, url = await start_mock(MockSettings())
    try:
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as client:
            await client.models.list()
        stats = runner.app[MOCK_STATS]
        assert isinstance(stats, MockStats) and stats.as_json() == await get_stats(url)
        assert stats.by_path == {"/v1/models": 1}
    finally:
        await runner.cleanup()


# --- pure decisions -------------------------------------------------------------------------------


def test_headers_override_settings_and_faults() -> None:
    settings = MockSettings(ttft=1.0, output_tokens=9, faults=(MockFault("drop", after_events=5),))
    knobs = resolve_knobs({"x-mock-ttft-ms": "250", "x-mock-drop-after": "1"}, settings, random.Random(0))
    assert (knobs.ttft, knobs.output_tokens, knobs.drop_after, knobs.status) == (0.25, 9, 1, None)
    plain = resolve_knobs({}, settings, random.Random(0))
    assert (plain.ttft, plain.drop_after) == (1.0, 5)
    never = MockSettings(faults=(MockFault("status", probability=0.0),))
    assert all(resolve_knobs({}, never, random.Random(i)).status is None for i in range(50))


@pytest.mark.parametrize(
    "name,value",
    [
        ("x-mock-output-tokens", "1.5"),
        ("x-mock-output-tokens", "-1"),
        ("x-mock-ttft-ms", "nan"),
        ("x-mock-status", "200"),
        ("x-mock-retry-after", "soon"),
        ("x-mock-drop-after", ""),
    ],
)
def test_bad_header_values_are_rejected(name: str, value: str) -> None:
    with pytest.raises(BadHeader, match=name):
        resolve_knobs({name: value}, MockSettings(), random.Random(0))


@given(st.text(max_size=60), st.integers(min_value=1, max_value=80))
def test_split_pieces_covers_the_text_in_at_most_k_nonempty_pieces(text: str, k: int) -> None:
    pieces = split_pieces(text, k)
    assert "".join(pieces) == text
    assert len(pieces) <= k and (all(pieces) or text == "")


def test_faults_with_times_script_a_sequence_one_per_request() -> None:
    from proxy.mock.faults import MockFault, MockSettings, resolve_knobs

    settings = MockSettings(faults=(
        MockFault("status", status=503, times=2),
        MockFault("status", status=429, retry_after=0.3, times=1),
        MockFault("drop", after_events=0, times=1),
    ))
    used = [0, 0, 0]
    rng = random.Random(1)
    seen = [resolve_knobs({}, settings, rng, used) for _ in range(6)]
    assert [(k.status, k.retry_after, k.drop_after) for k in seen] == [
        (503, None, None), (503, None, None), (429, 0.3, None), (None, None, 0), (None, None, None),
        (None, None, None),
    ]
    assert used == [2, 1, 1]
