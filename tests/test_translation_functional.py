"""Vendor translation end to end, with the official SDKs as clients and real upstreams on loopback.

The openai SDK against an Anthropic upstream and the anthropic SDK against an OpenAI-compatible one (text and
tools, streamed and whole, which must agree); Anthropic-to-Anthropic pass-through byte for byte; errors in the
client's own shape on both fronts, including vLLM's and TGI's non-OpenAI error bodies; and a TGI-style stream.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest
from conftest import UPSTREAM_KEY, Proxy
from kit import build_policy, route_spec, upstream_spec
from stream_helpers import JSON, SSE, Script, ScriptedUpstream, Servers, chat_chunk, read_raw, sse

from proxy.mock.server import MockSettings, start_mock
from proxy.streaming.sse import SSEDecoder

pytestmark = pytest.mark.timeout(30)

StartProxy = Callable[..., Awaitable[Proxy]]
MakeOpenAI = Callable[..., openai.AsyncOpenAI]
MakeAnthropic = Callable[..., anthropic.AsyncAnthropic]

OUTPUT_TOKENS = 7
PROMPT: Any = [{"role": "user", "content": "what is the weather in Paris for three days"}]
OPENAI_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city", "days"],
        },
    },
}
ANTHROPIC_TOOL: Any = {
    "name": "get_weather",
    "description": "Weather in a city",
    "input_schema": OPENAI_TOOL["function"]["parameters"],
}


@pytest.fixture
async def mock_url() -> AsyncIterator[str]:
    """The mock upstream on its own port: it speaks OpenAI under /v1/chat/completions and Anthropic under
    /v1/messages, so one server is an `openai` and an `anthropic` upstream at once."""
    runner, url = await start_mock(MockSettings(output_tokens=OUTPUT_TOKENS))
    yield url
    await runner.cleanup()


@pytest.fixture
async def scripted(servers: Servers) -> ScriptedUpstream:
    return await servers.scripted()


@pytest.fixture
async def async_anthropic() -> AsyncIterator[MakeAnthropic]:
    """async_anthropic(proxy, key="sk-alpha", **kw) -> AsyncAnthropic on the proxy; no retries, 10 s limit."""
    clients: list[anthropic.AsyncAnthropic] = []

    def make(proxy: Proxy, key: str | None = "sk-alpha", **kwargs: Any) -> anthropic.AsyncAnthropic:
        kwargs.setdefault("max_retries", 0)
        kwargs.setdefault("timeout", 10.0)
        client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key=key, **kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


def policy(mock_url: str, scripted: ScriptedUpstream) -> str:
    upstreams = {
        "claude": upstream_spec(mock_url, "anthropic"),
        "oai": upstream_spec(mock_url),
        "compat": upstream_spec(scripted.url),
        "fixed-claude": upstream_spec(scripted.url, "anthropic"),
    }
    routes = [
        route_spec("to-claude", "claude", model="claude-*"),
        route_spec("to-oai", "oai", model="gpt-*"),
        route_spec("to-compat", "compat", model="compat-*"),
        route_spec("to-fixed-claude", "fixed-claude", model="fixed-*"),
    ]
    return build_policy(upstreams, routes)


@pytest.fixture
async def proxy(start_proxy: StartProxy, mock_url: str, scripted: ScriptedUpstream) -> Proxy:
    return await start_proxy(policy(mock_url, scripted))


def tool_calls_of_stream(chunks: list[Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(id, name, arguments) per tool call, accumulated from stream deltas the way the SDK docs describe."""
    calls: dict[int, dict[str, str]] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or []:
                acc = calls.setdefault(call.index, {"id": "", "name": "", "arguments": ""})
                acc["id"] += call.id or ""
                if call.function is not None:
                    acc["name"] += call.function.name or ""
                    acc["arguments"] += call.function.arguments or ""
    return [(c["id"], c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())]


# --- the openai SDK against an Anthropic upstream -------------------------------------------------------


async def test_openai_sdk_text_streamed_and_whole_agree_over_an_anthropic_upstream(
    proxy: Proxy, async_openai: MakeOpenAI, mock_url: str
) -> None:
    client = async_openai(proxy)
    whole = await client.chat.completions.create(model="claude-x", messages=PROMPT, max_tokens=64)
    stream = await client.chat.completions.create(
        model="claude-x", messages=PROMPT, max_tokens=64, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert whole.object == "chat.completion" and whole.model == "claude-x"
    assert whole.choices[0].message.role == "assistant"
    assert text == whole.choices[0].message.content
    assert (
        [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        == whole.choices[0].finish_reason
        == "stop"
    )
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and whole.usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == OUTPUT_TOKENS
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert {c.id for c in chunks} == {chunks[0].id}  # one id across the stream, as OpenAI does
    # And it is the Anthropic upstream's own answer, not something the proxy made up.
    async with anthropic.AsyncAnthropic(base_url=mock_url, api_key="x", max_retries=0) as direct:
        message = await direct.messages.create(model="claude-x", max_tokens=64, messages=PROMPT)
    assert message.content[0].type == "text"
    assert text == message.content[0].text
    assert whole.usage.prompt_tokens == message.usage.input_tokens


async def test_openai_sdk_tool_calls_streamed_and_whole_agree_over_an_anthropic_upstream(
    proxy: Proxy, async_openai: MakeOpenAI, mock_url: str
) -> None:
    client = async_openai(proxy)
    whole = await client.chat.completions.create(model="claude-x", messages=PROMPT, tools=[OPENAI_TOOL])
    stream = await client.chat.completions.create(
        model="claude-x", messages=PROMPT, tools=[OPENAI_TOOL], stream=True
    )
    chunks = [chunk async for chunk in stream]
    streamed = tool_calls_of_stream(chunks)
    message = whole.choices[0].message
    assert message.tool_calls is not None and len(message.tool_calls) == 1
    call = message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("toolu_")
    assert whole.choices[0].finish_reason == "tool_calls"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert len(streamed) == 1 and streamed[0][0].startswith("toolu_")
    assert streamed[0][1:] == (call.function.name, json.loads(call.function.arguments))
    assert call.function.name == "get_weather"
    assert set(json.loads(call.function.arguments)) == {"city", "days"}
    # The Anthropic upstream saw the OpenAI tool translated, and answered with the same input.
    async with anthropic.AsyncAnthropic(base_url=mock_url, api_key="x", max_retries=0) as direct:
        answer = await direct.messages.create(
            model="claude-x", max_tokens=64, messages=PROMPT, tools=[ANTHROPIC_TOOL]
        )
    block = answer.content[0]
    assert block.type == "tool_use"
    assert block.input == json.loads(call.function.arguments)


# --- the anthropic SDK: pass-through to an Anthropic upstream --------------------------------------------

FIXED_STREAM = b"".join(
    [
        b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_fixed","type":"message",'
        b'"role":"assistant","content":[],"model":"fixed-model","stop_reason":null,"stop_sequence":null,'
        b'"usage":{"input_tokens":12,"output_tokens":1}}}\n\n',
        b'event: ping\ndata: {"type": "ping"}\n\n',
        b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
        b'"content_block":{"type":"text","text":""}}\n\n',
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
        b'"delta":{"type":"text_delta","text":"Bonjour "}}\n\n',
        b'event: vendor_extension\ndata: {"type":"vendor_extension","x":1}\n\n',
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
        b'"delta":{"type":"text_delta","text":"Paris \\u00e9t\xc3\xa9"}}\n\n',
        b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n',
        b'event: content_block_start\ndata: {"type":"content_block_start","index":1,'
        b'"content_block":{"type":"tool_use","id":"toolu_fixed","name":"get_weather","input":{}}}\n\n',
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":1,'
        b'"delta":{"type":"input_json_delta","partial_json":"{\\"city\\": \\"Par"}}\n\n',
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":1,'
        b'"delta":{"type":"input_json_delta","partial_json":"is\\", \\"days\\": 3}"}}\n\n',
        b'event: content_block_stop\ndata: {"type":"content_block_stop","index":1}\n\n',
        b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"tool_use",'
        b'"stop_sequence":null},"usage":{"output_tokens":9}}\n\n',
        b'event: message_stop\ndata: {"type":"message_stop"}\n\n',
    ]
)


def split_events(data: bytes) -> list[bytes]:
    decoder = SSEDecoder()
    events = [e.raw for e in decoder.feed(data)]
    assert decoder.close() == b""
    return events


def event_names(data: bytes) -> list[str | None]:
    decoder = SSEDecoder()
    return [e.event for e in decoder.feed(data)]


async def test_anthropic_stream_passes_through_byte_for_byte(
    proxy: Proxy, scripted: ScriptedUpstream, async_anthropic: MakeAnthropic
) -> None:
    # One event per upstream write, so the proxy sees them as separate reads.
    scripted.reply(Script(headers=SSE, events=split_events(FIXED_STREAM)))
    body = {"model": "fixed-model", "max_tokens": 32, "messages": PROMPT, "stream": True}
    raw = await read_raw(
        proxy.url + "/v1/messages", body, {"x-api-key": "sk-alpha", "anthropic-version": "2023-06-01"}
    )
    assert raw.status == 200
    assert raw.body == FIXED_STREAM
    assert scripted.paths[-1] == "/v1/messages" and scripted.bodies[-1] == body
    # The SDK reads the same stream into the same message.
    scripted.reply(Script(headers=SSE, events=split_events(FIXED_STREAM)))
    client = async_anthropic(proxy)
    async with client.messages.stream(model="fixed-model", max_tokens=32, messages=PROMPT) as stream:
        message = await stream.get_final_message()
    assert message.id == "msg_fixed" and message.stop_reason == "tool_use"
    assert message.content[0].type == "text" and message.content[0].text == "Bonjour Paris été"
    assert message.content[1].type == "tool_use" and message.content[1].input == {"city": "Paris", "days": 3}
    assert message.usage.output_tokens == 9


async def test_anthropic_sdk_passthrough_matches_the_upstream_and_keeps_event_names(
    proxy: Proxy, async_anthropic: MakeAnthropic, mock_url: str
) -> None:
    body = {"model": "claude-x", "max_tokens": 64, "messages": PROMPT, "stream": True}
    headers = {"x-api-key": "sk-alpha", "anthropic-version": "2023-06-01", "content-type": "application/json"}
    via_proxy = await read_raw(proxy.url + "/v1/messages", body, headers)
    direct = await read_raw(mock_url + "/v1/messages", body, headers)
    assert via_proxy.status == direct.status == 200
    names = event_names(via_proxy.body)
    assert names == event_names(direct.body)
    assert names[0] == "message_start" and names[-1] == "message_stop"
    # Byte for byte apart from the per-request message id.
    ids = [
        json.loads(SSEDecoder().feed(b)[0].data)["message"]["id"].encode()
        for b in (via_proxy.body, direct.body)
    ]
    assert via_proxy.body.replace(ids[0], b"ID") == direct.body.replace(ids[1], b"ID")

    client = async_anthropic(proxy)
    whole = await client.messages.create(model="claude-x", max_tokens=64, messages=PROMPT)
    async with client.messages.stream(model="claude-x", max_tokens=64, messages=PROMPT) as stream:
        streamed = await stream.get_final_message()
    assert whole.content[0].type == streamed.content[0].type == "text"
    assert whole.content[0].text == streamed.content[0].text
    assert whole.stop_reason == streamed.stop_reason == "end_turn"
    assert whole.usage.output_tokens == streamed.usage.output_tokens == OUTPUT_TOKENS
    tools_whole = await client.messages.create(
        model="claude-x", max_tokens=64, messages=PROMPT, tools=[ANTHROPIC_TOOL]
    )
    async with client.messages.stream(
        model="claude-x", max_tokens=64, messages=PROMPT, tools=[ANTHROPIC_TOOL]
    ) as stream:
        tools_streamed = await stream.get_final_message()
    for message in (tools_whole, tools_streamed):
        assert message.stop_reason == "tool_use"
        assert message.content[0].type == "tool_use" and message.content[0].name == "get_weather"
    assert tools_whole.content[0].input == tools_streamed.content[0].input  # type: ignore[union-attr]


# --- the anthropic SDK against an OpenAI-compatible upstream (translated) -------------------------------


async def test_anthropic_sdk_over_an_openai_upstream_text_streamed_and_whole(
    proxy: Proxy, async_anthropic: MakeAnthropic, async_openai: MakeOpenAI, mock_url: str
) -> None:
    client = async_anthropic(proxy)
    whole = await client.messages.create(model="gpt-x", max_tokens=64, messages=PROMPT, system="be brief")
    async with client.messages.stream(
        model="gpt-x", max_tokens=64, messages=PROMPT, system="be brief"
    ) as stream:
        streamed = await stream.get_final_message()
    assert whole.type == "message" and whole.role == "assistant" and whole.model == "gpt-x"
    assert whole.content[0].type == streamed.content[0].type == "text"
    assert whole.content[0].text == streamed.content[0].text
    assert whole.stop_reason == streamed.stop_reason == "end_turn"
    assert whole.usage.output_tokens == OUTPUT_TOKENS
    # What the OpenAI upstream answers directly to the same conversation.
    async with openai.AsyncOpenAI(base_url=mock_url + "/v1", api_key="x", max_retries=0) as direct:
        answer = await direct.chat.completions.create(
            model="gpt-x", max_tokens=64, messages=[{"role": "system", "content": "be brief"}, *PROMPT]
        )
    assert whole.content[0].text == answer.choices[0].message.content


async def test_anthropic_sdk_over_an_openai_upstream_with_tools(
    proxy: Proxy, async_anthropic: MakeAnthropic
) -> None:
    client = async_anthropic(proxy)
    whole = await client.messages.create(
        model="gpt-x", max_tokens=64, messages=PROMPT, tools=[ANTHROPIC_TOOL]
    )
    events: list[str] = []
    async with client.messages.stream(
        model="gpt-x", max_tokens=64, messages=PROMPT, tools=[ANTHROPIC_TOOL]
    ) as stream:
        async for event in stream:
            events.append(event.type)
        streamed = await stream.get_final_message()
    for message in (whole, streamed):
        assert message.stop_reason == "tool_use"
        assert len(message.content) == 1
        block = message.content[0]
        assert block.type == "tool_use" and block.name == "get_weather" and block.id
        assert set(block.input) == {"city", "days"}  # type: ignore[arg-type]
    assert whole.content[0].input == streamed.content[0].input  # type: ignore[union-attr]
    assert events[0] == "message_start" and events[-1] == "message_stop"
    assert "input_json" in events  # the arguments arrived as input_json_delta fragments

    # The tool result goes back through the same translation and the conversation continues.
    tool_use = whole.content[0]
    assert tool_use.type == "tool_use"
    follow = await client.messages.create(
        model="gpt-x",
        max_tokens=64,
        tools=[ANTHROPIC_TOOL],
        tool_choice={"type": "none"},
        messages=[
            *PROMPT,
            {"role": "assistant", "content": [tool_use.model_dump()]},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": tool_use.id, "content": "sunny"}],
            },
        ],
    )
    assert follow.stop_reason == "end_turn" and follow.content[0].type == "text"


# --- tenants and errors on both fronts -------------------------------------------------------------------


async def test_x_api_key_identifies_the_tenant_on_both_fronts(
    proxy: Proxy, async_anthropic: MakeAnthropic, mock_url: str
) -> None:
    async with aiohttp.ClientSession() as http:
        body = orjson.dumps({"model": "gpt-x", "messages": PROMPT})
        async with http.post(
            proxy.v1 + "/chat/completions", data=body, headers={"x-api-key": "sk-alpha"}
        ) as resp:
            assert resp.status == 200
            assert (await resp.json())["object"] == "chat.completion"
    message = await async_anthropic(proxy).messages.create(model="claude-x", max_tokens=16, messages=PROMPT)
    assert message.content[0].type == "text"
    # `Authorization: Bearer` works on the Anthropic front too (the SDK's auth_token).
    bearer = async_anthropic(proxy, key=None, auth_token="sk-alpha")
    assert (await bearer.messages.create(model="claude-x", max_tokens=16, messages=PROMPT)).content
    with pytest.raises(anthropic.AuthenticationError) as info:
        await async_anthropic(proxy, key="sk-wrong").messages.create(
            model="claude-x", max_tokens=16, messages=PROMPT
        )
    assert info.value.status_code == 401
    assert info.value.body == {
        "type": "error",
        "error": {"type": "authentication_error", "message": info.value.body["error"]["message"]},  # type: ignore[index]
        "request_id": info.value.response.headers["x-request-id"],
    }
    assert info.value.request_id == info.value.response.headers["x-request-id"]  # the SDK reads `request-id`
    assert "sk-wrong" not in info.value.response.text and UPSTREAM_KEY not in info.value.response.text


async def test_proxy_errors_on_the_anthropic_front_are_anthropic_shaped(
    proxy: Proxy, async_anthropic: MakeAnthropic
) -> None:
    client = async_anthropic(proxy)
    with pytest.raises(anthropic.NotFoundError) as missing:
        await client.messages.create(model="no-such-model", max_tokens=16, messages=PROMPT)
    body = missing.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"]["type"] == "not_found_error" and "no-such-model" in body["error"]["message"]
    # A proxy-made 400: count_tokens has no OpenAI equivalent to translate to.
    with pytest.raises(anthropic.BadRequestError) as untranslatable:
        await client.messages.count_tokens(model="gpt-x", messages=PROMPT)
    assert untranslatable.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert "count_tokens" in untranslatable.value.message
    # Body problems the SDK cannot send are checked with a raw client.
    async with aiohttp.ClientSession() as http:
        headers = {"x-api-key": "sk-alpha", "content-type": "application/json"}
        async with http.post(proxy.url + "/v1/messages", data=b"{not json", headers=headers) as resp:
            assert resp.status == 400
            error = await resp.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"


async def test_upstream_errors_reach_each_front_in_its_own_shape(
    proxy: Proxy, async_anthropic: MakeAnthropic, async_openai: MakeOpenAI
) -> None:
    # An OpenAI upstream's 429 on the Anthropic front.
    fault = {"x-mock-status": "429", "x-mock-retry-after": "3"}
    with pytest.raises(anthropic.RateLimitError) as limited:
        await async_anthropic(proxy).messages.create(
            model="gpt-x", max_tokens=16, messages=PROMPT, extra_headers=fault
        )
    assert limited.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    assert limited.value.response.headers["retry-after"] == "3"
    # An Anthropic upstream's overload (529) on the OpenAI front: OpenAI's shape, the Anthropic type as code.
    with pytest.raises(openai.InternalServerError) as overloaded:
        await async_openai(proxy).chat.completions.create(
            model="claude-x", messages=PROMPT, extra_headers={"x-mock-status": "529"}
        )
    assert overloaded.value.status_code == 529
    assert overloaded.value.code == "overloaded_error"
    assert overloaded.value.type == "server_error"
    # An Anthropic upstream's 400 on the OpenAI front, streamed request: still a plain error response.
    with pytest.raises(openai.BadRequestError) as bad:
        await async_openai(proxy).chat.completions.create(
            model="claude-x", messages=PROMPT, stream=True, extra_headers={"x-mock-status": "400"}
        )
    assert bad.value.code == "invalid_request_error"


async def test_count_tokens_passes_through_to_an_anthropic_upstream(
    proxy: Proxy, async_anthropic: MakeAnthropic, mock_url: str
) -> None:
    counted = await async_anthropic(proxy).messages.count_tokens(
        model="claude-x", messages=PROMPT, tools=[ANTHROPIC_TOOL], system="be brief"
    )
    async with anthropic.AsyncAnthropic(base_url=mock_url, api_key="x", max_retries=0) as direct:
        expected = await direct.messages.count_tokens(
            model="claude-x", messages=PROMPT, tools=[ANTHROPIC_TOOL], system="be brief"
        )
    assert counted.input_tokens == expected.input_tokens > 0


# --- OpenAI-compatible servers' quirks (vLLM, TGI) --------------------------------------------------------

VLLM_FLAT = (
    b'{"object":"error","message":"This model\'s maximum context length is 4096 tokens.",'
    b'"type":"BadRequestError","param":null,"code":400}'
)
TGI_FLAT = (
    b'{"error":"Input validation error: `inputs` tokens + `max_new_tokens` must be <= 4096",'
    b'"error_type":"validation"}'
)


@pytest.mark.parametrize(
    ("status", "raw", "sdk_error", "message", "code"),
    [
        (
            400,
            VLLM_FLAT,
            openai.BadRequestError,
            "This model's maximum context length is 4096 tokens.",
            "400",
        ),
        (
            422,
            TGI_FLAT,
            openai.UnprocessableEntityError,
            "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 4096",
            "validation",
        ),
    ],
    ids=["vllm-flat", "tgi"],
)
async def test_non_openai_error_bodies_are_normalised_for_the_openai_sdk(
    proxy: Proxy,
    scripted: ScriptedUpstream,
    async_openai: MakeOpenAI,
    async_anthropic: MakeAnthropic,
    status: int,
    raw: bytes,
    sdk_error: type[openai.APIStatusError],
    message: str,
    code: str,
) -> None:
    scripted.reply(
        Script(status=status, headers=JSON, body=raw), Script(status=status, headers=JSON, body=raw)
    )
    with pytest.raises(sdk_error) as info:
        await async_openai(proxy).chat.completions.create(model="compat-m", messages=PROMPT, stream=True)
    assert info.value.status_code == status
    assert info.value.body == {
        "message": message,
        "type": "invalid_request_error",
        "param": None,
        "code": code,
    }
    assert message in info.value.message
    # The same upstream behind the Anthropic front: Anthropic's shape, same status and message.
    with pytest.raises(anthropic.APIStatusError) as front:
        await async_anthropic(proxy).messages.create(model="compat-m", max_tokens=16, messages=PROMPT)
    assert front.value.status_code == status
    assert front.value.body == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": message},
    }


TGI_CHUNKS = [
    chat_chunk({"role": "assistant", "content": "Hel"}),
    b":\n\n",  # axum's KeepAlive: an empty comment
    chat_chunk({"content": "lo"}),
    b":\n\n",
    chat_chunk({"content": " there"}),
    chat_chunk({}, finish="stop"),
    b"data: [DONE]\n\n",
]


async def test_tgi_stream_with_keep_alive_comments(
    proxy: Proxy, scripted: ScriptedUpstream, async_openai: MakeOpenAI, async_anthropic: MakeAnthropic
) -> None:
    # TGI >= 2.2 ends /v1/chat/completions streams with [DONE] (text-generation-inference#2221) and sends an
    # empty `:` comment every 15 s. The comments are upstream keep-alives, not events: the relay drops them
    # (its own heartbeats cover silence) and passes every event through untouched.
    scripted.reply(Script(headers=SSE, events=TGI_CHUNKS, gap=0.02))
    raw = await read_raw(
        proxy.v1 + "/chat/completions", {"model": "compat-m", "stream": True}, {"x-api-key": "sk-alpha"}
    )
    assert raw.body == b"".join(c for c in TGI_CHUNKS if not c.startswith(b":"))
    scripted.reply(Script(headers=SSE, events=TGI_CHUNKS, gap=0.02))
    stream = await async_openai(proxy).chat.completions.create(model="compat-m", messages=PROMPT, stream=True)
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello there"
    # Translated for the Anthropic front, the keep-alives do not disturb the event sequence either.
    scripted.reply(Script(headers=SSE, events=TGI_CHUNKS, gap=0.02))
    async with async_anthropic(proxy).messages.stream(model="compat-m", max_tokens=16, messages=PROMPT) as s:
        message = await s.get_final_message()
    assert message.content[0].type == "text" and message.content[0].text == "Hello there"
    assert message.stop_reason == "end_turn"


async def test_tgi_error_event_inside_a_stream_raises_in_both_sdks(
    proxy: Proxy, scripted: ScriptedUpstream, async_openai: MakeOpenAI, async_anthropic: MakeAnthropic
) -> None:
    # TGI reports a failure after the 200 as a flat `data: {"error": "...", "error_type": ...}` event.
    failing = [
        chat_chunk({"role": "assistant", "content": "Hel"}),
        sse({"error": "Request failed during generation: CUDA out of memory", "error_type": "generation"}),
    ]
    scripted.reply(Script(headers=SSE, events=failing, gap=0.02))
    stream = await async_openai(proxy).chat.completions.create(model="compat-m", messages=PROMPT, stream=True)
    seen: list[Any] = []
    with pytest.raises(openai.APIError):
        async for chunk in stream:
            seen.append(chunk)
    assert len(seen) == 1
    scripted.reply(Script(headers=SSE, events=failing, gap=0.02))
    with pytest.raises(anthropic.APIStatusError) as info:
        async with async_anthropic(proxy).messages.stream(
            model="compat-m", max_tokens=16, messages=PROMPT
        ) as s:
            await s.get_final_message()
    assert "CUDA out of memory" in info.value.message


# --- how streams end without [DONE] -------------------------------------------------------------------------

NO_DONE = [
    chat_chunk({"role": "assistant", "content": "Hel"}),
    chat_chunk({"content": "lo"}),
    chat_chunk({}, finish="stop"),
]


async def test_stream_ending_on_its_finish_chunk_without_done_is_complete(
    proxy: Proxy, scripted: ScriptedUpstream, async_openai: MakeOpenAI, async_anthropic: MakeAnthropic
) -> None:
    # TGI before 2.2 and several llama.cpp-style servers end chat streams right after the finish chunk. That
    # is a whole answer: passed through as is (no error appended, no [DONE] invented), and closed properly
    # when translated for the Anthropic front.
    scripted.reply(Script(headers=SSE, events=NO_DONE))
    raw = await read_raw(
        proxy.v1 + "/chat/completions", {"model": "compat-m", "stream": True}, {"x-api-key": "sk-alpha"}
    )
    assert raw.body == b"".join(NO_DONE)
    scripted.reply(Script(headers=SSE, events=NO_DONE))
    stream = await async_openai(proxy).chat.completions.create(model="compat-m", messages=PROMPT, stream=True)
    assert "".join([c.choices[0].delta.content or "" async for c in stream]) == "Hello"
    scripted.reply(Script(headers=SSE, events=NO_DONE))
    async with async_anthropic(proxy).messages.stream(model="compat-m", max_tokens=16, messages=PROMPT) as s:
        message = await s.get_final_message()
    assert message.content[0].type == "text" and message.content[0].text == "Hello"
    assert message.stop_reason == "end_turn"
    # Without the finish chunk the same clean EOF is a truncation, on both fronts.
    scripted.reply(Script(headers=SSE, events=NO_DONE[:2]))
    stream = await async_openai(proxy).chat.completions.create(model="compat-m", messages=PROMPT, stream=True)
    with pytest.raises(openai.APIError, match="ended the stream early"):
        async for _ in stream:
            pass
    scripted.reply(Script(headers=SSE, events=NO_DONE[:2]))
    with pytest.raises(anthropic.APIStatusError, match="ended the stream early"):
        async with async_anthropic(proxy).messages.stream(
            model="compat-m", max_tokens=16, messages=PROMPT
        ) as s:
            await s.get_final_message()


RESPONSES_STREAM = [
    sse(
        {
            "type": "response.created",
            "sequence_number": 0,
            "response": {"id": "resp_1", "object": "response", "status": "in_progress", "output": []},
        },
        "response.created",
    ),
    sse(
        {
            "type": "response.output_text.delta",
            "sequence_number": 1,
            "item_id": "msg_1",
            "output_index": 0,
            "content_index": 0,
            "delta": "Hello",
        },
        "response.output_text.delta",
    ),
    sse(
        {
            "type": "response.completed",
            "sequence_number": 2,
            "response": {"id": "resp_1", "object": "response", "status": "completed", "output": []},
        },
        "response.completed",
    ),
]


async def test_responses_api_stream_passes_through_without_an_error_appended(
    proxy: Proxy, scripted: ScriptedUpstream, async_openai: MakeOpenAI
) -> None:
    # OpenAI's Responses API ends its streams with `response.completed` and sends no [DONE].
    scripted.reply(Script(headers=SSE, events=RESPONSES_STREAM))
    raw = await read_raw(
        proxy.v1 + "/responses",
        {"model": "compat-m", "input": "hi", "stream": True},
        {"x-api-key": "sk-alpha"},
    )
    assert raw.body == b"".join(RESPONSES_STREAM)
    assert scripted.paths[-1] == "/v1/responses"
    scripted.reply(Script(headers=SSE, events=RESPONSES_STREAM))
    stream = await async_openai(proxy).responses.create(model="compat-m", input="hi", stream=True)
    kinds = [event.type async for event in stream]
    assert kinds == ["response.created", "response.output_text.delta", "response.completed"]
