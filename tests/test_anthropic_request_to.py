"""OpenAI ⇄ Anthropic translation (proxy/providers): requests, responses, streams and errors.

Emitted frames are checked with the official SDKs' own SSE decoders, pydantic models and stream
accumulators, and end to end through the SDK clients over an in-memory httpx transport (no sockets)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import anthropic
import httpx2
import openai
import orjson
import pytest
from anthropic._streaming import SSEDecoder as AnthropicSSEDecoder
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import Message, RawMessageStreamEvent
from anthropic.types import message_create_params as anthropic_params
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai._streaming import SSEDecoder as OpenAISSEDecoder
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessageFunctionToolCall
from openai.types.chat import completion_create_params as openai_params
from pydantic import TypeAdapter

from proxy.providers.anthropic.front_request import ANTHROPIC_REQUEST_FIELDS, anthropic_to_openai_chat
from proxy.providers.anthropic.front_response import openai_chat_to_anthropic_message
from proxy.providers.anthropic.front_stream import OpenAIToAnthropicStream, anthropic_error_frame
from proxy.providers.anthropic.request_to import (
    OPENAI_REQUEST_FIELDS,
    TranslationError,
    include_usage_requested,
    openai_chat_to_anthropic,
)
from proxy.providers.anthropic.response_from import anthropic_message_to_openai
from proxy.providers.anthropic.stream_from import DONE_FRAME, AnthropicToOpenAIStream, error_frame
from proxy.providers.errors_map import (
    anthropic_error_to_openai,
    normalise_openai_compatible_error,
    normalise_stream_error,
    openai_error_to_anthropic,
)

CREATED = 1_700_000_000
EVENT_ADAPTER: TypeAdapter[Any] = TypeAdapter(RawMessageStreamEvent)
ANTHROPIC_REQUEST: TypeAdapter[Any] = TypeAdapter(anthropic_params.MessageCreateParamsNonStreaming)
OPENAI_REQUEST: TypeAdapter[Any] = TypeAdapter(openai_params.CompletionCreateParamsNonStreaming)

# ---------------------------------------------------------------------------------------------- helpers


def _force(value: Any) -> Any:
    """Materialise pydantic's lazy Iterable validators so every nested item is really validated."""
    if isinstance(value, dict):
        return {k: _force(v) for k, v in value.items()}
    if isinstance(value, list | tuple) or type(value).__name__ == "ValidatorIterator":
        return [_force(v) for v in value]
    return value


def valid_anthropic_request(body: dict[str, Any]) -> None:
    _force(ANTHROPIC_REQUEST.validate_python({k: v for k, v in body.items() if k != "stream"}))


def valid_openai_request(body: dict[str, Any]) -> None:
    rest = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    _force(OPENAI_REQUEST.validate_python(rest))


def openai_events(frames: list[bytes]) -> list[Any]:
    """Frames → data payloads via the OpenAI SDK's own SSE decoder; "[DONE]" stays a string."""
    out: list[Any] = []
    for sse in OpenAISSEDecoder().iter_bytes(iter(frames)):
        assert sse.event is None  # OpenAI streams never name their events
        out.append(sse.data if sse.data.startswith("[DONE]") else sse.json())
    return out


def openai_chunks(frames: list[bytes]) -> list[ChatCompletionChunk]:
    events = openai_events(frames)
    assert events[-1] == "[DONE]"
    return [ChatCompletionChunk.model_validate(e) for e in events[:-1]]


def anthropic_events(frames: list[bytes]) -> list[tuple[str | None, dict[str, Any]]]:
    """Frames → (event name, data) via the Anthropic SDK's decoder, checking name and `type` agree."""
    out = []
    for sse in AnthropicSSEDecoder().iter_bytes(iter(frames)):
        data = sse.json()
        assert sse.event == data["type"]
        out.append((sse.event, data))
    return out


def anthropic_final(frames: list[bytes]) -> Any:
    """The Message the Anthropic SDK's own stream accumulator builds from our frames."""
    snapshot = None
    json_bufs: dict[int, bytes] = {}  # the accumulator's partial tool-input buffers, kept across events
    for _, data in anthropic_events(frames):
        event = EVENT_ADAPTER.validate_python(data)
        snapshot = accumulate_event(event=event, current_snapshot=snapshot, json_bufs=json_bufs)
    return snapshot


def openai_final(frames: list[bytes]) -> Any:
    """The ChatCompletion the OpenAI SDK's own stream accumulator builds from our frames."""
    state: ChatCompletionStreamState[Any] = ChatCompletionStreamState()
    for chunk in openai_chunks(frames):
        state.handle_chunk(chunk)
    return state.current_completion_snapshot  # get_final_completion raises on finish_reason "length"


def _transport(status: int, body: bytes, content_type: str) -> httpx2.Client:
    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(status, headers={"content-type": content_type}, content=body)

    return httpx2.Client(transport=httpx2.MockTransport(handler))


def openai_client(body: bytes, status: int = 200, content_type: str = "text/event-stream") -> openai.OpenAI:
    http = _transport(status, body, content_type)
    return openai.OpenAI(api_key="sk-test", base_url="http://127.0.0.1:9/v1", max_retries=0, http_client=http)


def anthropic_client(
    body: bytes, status: int = 200, content_type: str = "text/event-stream"
) -> anthropic.Anthropic:
    http = _transport(status, body, content_type)
    return anthropic.Anthropic(
        api_key="sk-test", base_url="http://127.0.0.1:9", max_retries=0, http_client=http
    )


def run_a2o(events: list[tuple[str | None, dict[str, Any]]], *, include_usage: bool = True) -> list[bytes]:
    stream = AnthropicToOpenAIStream(model="gpt-alias", created=CREATED, include_usage=include_usage)
    return [frame for event, data in events for frame in stream.feed(event, data)]


def run_o2a(chunks: list[dict[str, Any]], *, done: bool = True) -> list[bytes]:
    stream = OpenAIToAnthropicStream(model="claude-alias")
    frames = [frame for chunk in chunks for frame in stream.feed(chunk)]
    return frames + (stream.done() if done else [])


# ---------------------------------------------------------------------- Anthropic event fixtures (docs)


def message_start(usage: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    message: dict[str, Any] = {
        "id": "msg_014p7gG3wDgGV9EUtLvnow3U",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": usage or {"input_tokens": 472, "output_tokens": 2},
    }
    return "message_start", {"type": "message_start", "message": message}


def block_start(index: int, block: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return "content_block_start", {"type": "content_block_start", "index": index, "content_block": block}


def text_delta(index: int, text: str) -> tuple[str, dict[str, Any]]:
    delta = {"type": "text_delta", "text": text}
    return "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}


def json_delta(index: int, partial: str) -> tuple[str, dict[str, Any]]:
    delta = {"type": "input_json_delta", "partial_json": partial}
    return "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}


def block_stop(index: int) -> tuple[str, dict[str, Any]]:
    return "content_block_stop", {"type": "content_block_stop", "index": index}


def message_delta(stop_reason: str, usage: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    delta = {"stop_reason": stop_reason, "stop_sequence": None}
    return "message_delta", {"type": "message_delta", "delta": delta, "usage": usage or {"output_tokens": 15}}


PING = ("ping", {"type": "ping"})
MESSAGE_STOP = ("message_stop", {"type": "message_stop"})


def text_events(stop_reason: str = "end_turn") -> list[tuple[str | None, dict[str, Any]]]:
    return [
        message_start(),
        block_start(0, {"type": "text", "text": ""}),
        PING,
        text_delta(0, "Hello"),
        text_delta(0, "!"),
        block_stop(0),
        message_delta(stop_reason),
        MESSAGE_STOP,
    ]


def text_and_two_tools_events() -> list[tuple[str | None, dict[str, Any]]]:
    """The documented tool-use stream: text, then tool_use blocks whose input arrives as JSON fragments."""
    return [
        message_start(),
        block_start(0, {"type": "text", "text": ""}),
        text_delta(0, "Okay, let's check the weather"),
        text_delta(0, " and the time."),
        block_stop(0),
        block_start(1, {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {}}),
        json_delta(1, ""),
        json_delta(1, '{"location":'),
        json_delta(1, ' "San Fra'),
        json_delta(1, 'ncisco, CA", "unit": "°F"}'),
        block_stop(1),
        PING,
        block_start(2, {"type": "tool_use", "id": "toolu_02", "name": "get_time", "input": {}}),
        json_delta(2, '{"tz": '),
        json_delta(2, '"PST"}'),
        block_stop(2),
        message_delta("tool_use", {"output_tokens": 89}),
        MESSAGE_STOP,
    ]


# ========================================================== 1. OpenAI front → Anthropic upstream: request


def test_system_and_developer_messages_become_top_level_system() -> None:
    out = openai_chat_to_anthropic(
        {
            "model": "claude",
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        },
        default_max_tokens=1024,
    )
    assert out["system"] == "Be brief."
    assert out["messages"] == [{"role": "user", "content": "Hi"}]
    valid_anthropic_request(out)

    out = openai_chat_to_anthropic(
        {
            "model": "claude",
            "messages": [
                {"role": "developer", "content": [{"type": "text", "text": "Rule one."}]},
                {"role": "user", "content": "Hi"},
                {"role": "system", "content": "Late rule."},  # hoisted: Anthropic has no mid-turn system
                {"role": "user", "content": "Again"},
            ],
        },
        default_max_tokens=1024,
    )
    assert out["system"] == [{"type": "text", "text": "Rule one."}, {"type": "text", "text": "Late rule."}]
    assert out["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "Again"}]}
    ]
    valid_anthropic_request(out)


def test_same_role_runs_are_merged_and_empty_assistant_turns_dropped() -> None:
    out = openai_chat_to_anthropic(
        {
            "model": "claude",
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": ""},
                {"role": "user", "content": "b"},
                {"role": "assistant", "content": "c"},
                {"role": "assistant", "content": [{"type": "text", "text": "d"}]},
            ],
        },
        default_max_tokens=10,
    )
    roles = [m["role"] for m in out["messages"]]
    assert roles == ["user", "assistant"]
    assert [b["text"] for b in out["messages"][0]["content"]] == ["a", "b"]
    assert [b["text"] for b in out["messages"][1]["content"]] == ["c", "d"]


def test_image_parts() -> None:
    parts = [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg", "detail": "high"}},
    ]
    out = openai_chat_to_anthropic(
        {"model": "c", "messages": [{"role": "user", "content": parts}]}, default_max_tokens=10
    )
    assert out["messages"][0]["content"] == [
        {"type": "text", "text": "What is this?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
    ]
    valid_anthropic_request(out)


@pytest.mark.parametrize(
    "url", ["data:image/png,rawbytes", "data:;base64,AAAA", "ftp://example.com/x.png", "file:///etc/passwd"]
)
def test_unusable_image_urls_are_rejected(url: str) -> None:
    message = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}
    with pytest.raises(TranslationError) as info:
        openai_chat_to_anthropic({"model": "c", "messages": [message]}, default_max_tokens=10)
    assert info.value.param == "messages[0].content[0].image_url.url"


def _tool_conversation() -> list[dict[str, Any]]:
    return [
        {"role": "user", "content": "Weather and time in SF?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"SF"}'},
                },
                {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": ""}},
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18°C"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "09:00"}]},
        {"role": "user", "content": "Thanks. Anything else?"},
    ]


def test_tool_calls_and_tool_results() -> None:
    out = openai_chat_to_anthropic({"model": "c", "messages": _tool_conversation()}, default_max_tokens=10)
    assert out["messages"] == [
        {"role": "user", "content": "Weather and time in SF?"},
        {
            "role": "assistant",
            "content": [
                {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "SF"}},
                {"type": "tool_use", "id": "call_2", "name": "get_time", "input": {}},
            ],
        },
        {
            "role": "user",  # consecutive tool results share one user message, results first
            "content": [
                {"type": "tool_result", "tool_use_id": "call_1", "content": "18°C"},
                {
                    "type": "tool_result",
                    "tool_use_id": "call_2",
                    "content": [{"type": "text", "text": "09:00"}],
                },
                {"type": "text", "text": "Thanks. Anything else?"},
            ],
        },
    ]
    valid_anthropic_request(out)


@pytest.mark.parametrize("arguments", ['{"city": "SF"', "not json", "[1, 2]", '"a string"'])
def test_tool_call_arguments_must_be_a_json_object(arguments: str) -> None:
    messages = _tool_conversation()
    messages[1]["tool_calls"][1]["function"]["arguments"] = arguments
    with pytest.raises(TranslationError) as info:
        openai_chat_to_anthropic({"model": "c", "messages": messages}, default_max_tokens=10)
    assert info.value.param == "messages[1].tool_calls[1].function.arguments"


def test_tools_and_tool_choice_mapping() -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather now",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
                "strict": True,
            },
        },
        {"type": "function", "function": {"name": "ping"}},
    ]
    out = openai_chat_to_anthropic(
        {"model": "c", "messages": [{"role": "user", "content": "x"}], "tools": tools}, default_max_tokens=10
    )
    assert out["tools"] == [
        {
            "name": "get_weather",
            "description": "Weather now",
            "input_schema": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
        {"name": "ping", "input_schema": {"type": "object", "properties": {}}},
    ]
    assert "tool_choice" not in out
    valid_anthropic_request(out)


@pytest.mark.parametrize(
    ("tool_choice", "parallel", "expected"),
    [
        ("auto", None, {"type": "auto"}),
        ("none", None, {"type": "none"}),
        ("required", None, {"type": "any"}),
        ({"type": "function", "function": {"name": "f"}}, None, {"type": "tool", "name": "f"}),
        (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
        ("required", False, {"type": "any", "disable_parallel_tool_use": True}),
        (
            {"type": "function", "function": {"name": "f"}},
            False,
            {"type": "tool", "name": "f", "disable_parallel_tool_use": True},
        ),
        ("none", False, {"type": "none"}),  # nothing to parallelise
        ("auto", True, {"type": "auto"}),
        (None, None, None),
    ],
)
def test_tool_choice_table(tool_choice: Any, parallel: bool | None, expected: dict[str, Any] | None) -> None:
    body: dict[str, Any] = {
        "model": "c",
        "messages": [{"role": "user", "content": "x"}],
        "tools": [{"type": "function", "function": {"name": "f"}}],
    }
    if tool_choice is not None:
        body["tool_choice"] = tool_choice
    if parallel is not None:
        body["parallel_tool_calls"] = parallel
    assert openai_chat_to_anthropic(body, default_max_tokens=10).get("tool_choice") == expected


@pytest.mark.parametrize(
    ("field", "value", "param"),
    [
        ("tools", [{"type": "custom", "custom": {"name": "x"}}], "tools[0]"),
        ("tool_choice", {"type": "allowed_tools", "allowed_tools": {}}, "tool_choice"),
    ],
)
def test_unsupported_tool_shapes_are_rejected(field: str, value: Any, param: str) -> None:
    body: dict[str, Any] = {
        "model": "c",
        "messages": [{"role": "user", "content": "x"}],
        "tools": [{"type": "function", "function": {"name": "f"}}],
        field: value,
    }
    with pytest.raises(TranslationError) as info:
        openai_chat_to_anthropic(body, default_max_tokens=10)
    assert info.value.param == param


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({}, {"max_tokens": 4096}),
        ({"max_tokens": 50}, {"max_tokens": 50}),
        ({"max_tokens": 50, "max_completion_tokens": 70}, {"max_tokens": 70}),
        ({"stop": "END"}, {"stop_sequences": ["END"]}),
        ({"stop": ["a", "b"]}, {"stop_sequences": ["a", "b"]}),
        ({"temperature": 1.7}, {"temperature": 1}),  # OpenAI allows 2, Anthropic 1: clamped
        ({"temperature": 0.3, "top_p": 0.9}, {"temperature": 0.3, "top_p": 0.9}),
        ({"user": "user-42"}, {"metadata": {"user_id": "user-42"}}),
        ({"safety_identifier": "hash-1"}, {"metadata": {"user_id": "hash-1"}}),
        ({"stream": True}, {"stream": True}),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "object"}},
                }
            },
            {"output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}}},
        ),
    ],
)
def test_scalar_field_table(extra: dict[str, Any], expected: dict[str, Any]) -> None:
    body = {"model": "claude-x", "messages": [{"role": "user", "content": "x"}], **extra}
    out = openai_chat_to_anthropic(body, default_max_tokens=4096)
    base = {"model": "claude-x", "max_tokens": 4096, "messages": [{"role": "user", "content": "x"}]}
    assert out == {**base, **expected}


# A value for each field of the coverage table that exercises its documented handling.
_SAMPLES: dict[str, Any] = {
    "model": "other-model",
    "messages": [{"role": "user", "content": "different"}],
    "max_completion_tokens": 7,
    "max_tokens": 9,
    "temperature": 0.5,
    "top_p": 0.5,
    "top_k": 5,
    "stop": ["x"],
    "stream": True,
    "stream_options": {"include_usage": True},
    "tools": [{"type": "function", "function": {"name": "f"}}],
    "tool_choice": "auto",
    "parallel_tool_calls": False,
    "user": "u",
    "safety_identifier": "s",
    "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "object"}}},
    "n": 2,
    "logprobs": True,
    "top_logprobs": 3,
    "logit_bias": {"50256": -100},
    "audio": {"voice": "alloy", "format": "mp3"},
    "modalities": ["text", "audio"],
    "web_search_options": {},
    "functions": [{"name": "f"}],
    "function_call": "auto",
    "frequency_penalty": 0.5,
    "presence_penalty": 0.5,
    "seed": 7,
    "reasoning_effort": "high",
    "verbosity": "low",
    "service_tier": "flex",
    "store": True,
    "metadata": {"k": "v"},
    "prediction": {"type": "content", "content": "x"},
    "prompt_cache_key": "k",
}
_NEEDS_TOOLS = {"tool_choice", "parallel_tool_calls"}


@pytest.mark.parametrize("rule", OPENAI_REQUEST_FIELDS, ids=lambda r: r.field)
def test_openai_field_table_matches_behaviour(rule: Any) -> None:
    base: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    if rule.field in _NEEDS_TOOLS:
        base["tools"] = [{"type": "function", "function": {"name": "f"}}]
    before = openai_chat_to_anthropic(base, default_max_tokens=100)
    body = {**base, rule.field: _SAMPLES[rule.field]}
    if rule.action == "rejected":
        with pytest.raises(TranslationError) as info:
            openai_chat_to_anthropic(body, default_max_tokens=100)
        assert info.value.param == rule.field
    elif rule.action == "dropped":
        assert openai_chat_to_anthropic(body, default_max_tokens=100) == before
    else:
        after = openai_chat_to_anthropic(body, default_max_tokens=100)
        assert after != before
        valid_anthropic_request(after)


def test_harmless_values_of_rejected_fields_pass_and_unknown_fields_are_dropped() -> None:
    base = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    expected = openai_chat_to_anthropic(base, default_max_tokens=10)
    harmless = {"n": 1, "logprobs": False, "logit_bias": {}, "modalities": ["text"], "x_vendor_field": 1}
    assert openai_chat_to_anthropic({**base, **harmless}, default_max_tokens=10) == expected
    with pytest.raises(TranslationError, match="n > 1"):
        openai_chat_to_anthropic({**base, "n": 3}, default_max_tokens=10)


def test_include_usage_requested() -> None:
    assert include_usage_requested({"stream_options": {"include_usage": True}})
    assert not include_usage_requested({"stream_options": {"include_usage": False}})
    assert not include_usage_requested({"stream": True})


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ("hello", "messages"),
        ([{"role": "function", "name": "f", "content": "x"}], "messages[0].role"),
        ([{"role": "tool", "content": "x"}], "messages[0].tool_call_id"),
        (
            [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}],
            "messages[0].content[0].type",
        ),
        (
            [{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "https://x"}}]}],
            "messages[0].content[0].type",
        ),
    ],
)
def test_untranslatable_messages_name_the_field(messages: Any, param: str) -> None:
    with pytest.raises(TranslationError) as info:
        openai_chat_to_anthropic({"model": "m", "messages": messages}, default_max_tokens=10)
    assert info.value.param == param


# ========================================================= 1. OpenAI front → Anthropic upstream: response


def _anthropic_message(
    content: list[dict[str, Any]], stop_reason: str = "end_turn", **usage: int
) -> dict[str, Any]:
    return {
        "id": "msg_01",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5",
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": {"input_tokens": 10, "output_tokens": 5, **usage},
    }


def test_anthropic_message_to_openai_text_tools_and_thinking() -> None:
    body = _anthropic_message(
        [
            {"type": "thinking", "thinking": "hmm", "signature": "sig"},
            {"type": "text", "text": "Let me "},
            {"type": "text", "text": "check."},
            {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {"q": "x y", "n": [1, 2]}},
        ],
        "tool_use",
        cache_creation_input_tokens=100,
        cache_read_input_tokens=1000,
    )
    out = anthropic_message_to_openai(body, model="alias", created=CREATED)
    completion = ChatCompletion.model_validate(out)
    assert completion.id == "chatcmpl-msg_01"
    assert completion.created == CREATED and completion.model == "alias"
    choice = completion.choices[0]
    assert choice.message.content == "Let me check."
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert isinstance(call, ChatCompletionMessageFunctionToolCall)
    assert (call.id, call.function.name, call.function.arguments) == (
        "toolu_1",
        "lookup",
        '{"q":"x y","n":[1,2]}',
    )
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 1110
    assert completion.usage.completion_tokens == 5 and completion.usage.total_tokens == 1115
    assert completion.usage.prompt_tokens_details is not None
    assert completion.usage.prompt_tokens_details.cached_tokens == 1000


def test_tool_only_message_has_null_content() -> None:
    body = _anthropic_message([{"type": "tool_use", "id": "t", "name": "f", "input": {}}], "tool_use")
    message = anthropic_message_to_openai(body, model="m", created=CREATED)["choices"][0]["message"]
    assert message["content"] is None and message["tool_calls"][0]["function"]["arguments"] == "{}"


STOP_REASONS = [
    ("end_turn", "stop"),
    ("stop_sequence", "stop"),
    ("pause_turn", "stop"),
    ("max_tokens", "length"),
    ("tool_use", "tool_calls"),
    ("refusal", "content_filter"),
    ("model_context_window_exceeded", "length"),
    ("a_reason_from_the_future", "stop"),
]


@pytest.mark.parametrize(("stop_reason", "finish_reason"), STOP_REASONS)
def test_every_stop_reason_non_streaming(stop_reason: str, finish_reason: str) -> None:
    out = anthropic_message_to_openai(
        _anthropic_message([{"type": "text", "text": "x"}], stop_reason), model="m", created=1
    )
    assert out["choices"][0]["finish_reason"] == finish_reason


def test_translated_message_through_the_openai_sdk() -> None:
    body = _anthropic_message([{"type": "text", "text": "Hi there"}])
    payload = orjson.dumps(anthropic_message_to_openai(body, model="m", created=CREATED))
    with openai_client(payload, content_type="application/json") as client:
        completion = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert completion.choices[0].message.content == "Hi there"
    assert completion.usage is not None and completion.usage.prompt_tokens == 10


# =========================================================== 1. OpenAI front → Anthropic upstream: stream


def test_text_stream_golden() -> None:
    frames = run_a2o(text_events(), include_usage=False)
    assert frames[0] == (
        b'data: {"id":"chatcmpl-msg_014p7gG3wDgGV9EUtLvnow3U","object":"chat.completion.chunk",'
        b'"created":1700000000,"model":"gpt-alias","choices":[{"index":0,'
        b'"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}\n\n'
    )
    assert frames[-1] == DONE_FRAME
    chunks = openai_chunks(frames)
    assert [c.choices[0].delta.content for c in chunks] == ["", "Hello", "!", None]
    assert [c.choices[0].finish_reason for c in chunks] == [None, None, None, "stop"]
    assert {c.id for c in chunks} == {"chatcmpl-msg_014p7gG3wDgGV9EUtLvnow3U"}
    assert all(b"usage" not in f for f in frames)  # not asked for: no usage key, no usage chunk


def test_text_and_two_tool_calls_stream_through_the_sdk_accumulator() -> None:
    frames = run_a2o(text_and_two_tools_events())
    final = openai_final(frames)
    message = final.choices[0].message
    assert message.content == "Okay, let's check the weather and the time."
    assert final.choices[0].finish_reason == "tool_calls"
    calls = [(c.id, c.function.name, orjson.loads(c.function.arguments)) for c in message.tool_calls]
    assert calls == [
        ("toolu_01", "get_weather", {"location": "San Francisco, CA", "unit": "°F"}),
        ("toolu_02", "get_time", {"tz": "PST"}),
    ]
    # tool indexes count tool blocks only (the text block is Anthropic index 0)
    indexes = [
        tc.index for c in openai_chunks(frames) if c.choices for tc in c.choices[0].delta.tool_calls or ()
    ]
    assert sorted(set(indexes)) == [0, 1]


def test_stream_end_to_end_with_the_openai_client() -> None:
    body = b"".join(run_a2o(text_and_two_tools_events()))
    with openai_client(body) as client:
        stream = client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "x"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 89


def test_usage_with_cache_tokens_is_cumulative() -> None:
    usage = {
        "input_tokens": 20,
        "output_tokens": 1,
        "cache_creation_input_tokens": 300,
        "cache_read_input_tokens": 4000,
    }
    events = text_events()
    events[0] = message_start(usage)
    events[-2] = message_delta("end_turn", {"output_tokens": 42})  # cumulative: replaces 1, not added
    stream = AnthropicToOpenAIStream(model="m", created=CREATED, include_usage=True)
    frames = [f for e, d in events for f in stream.feed(e, d)]
    chunks = openai_chunks(frames)
    assert all(c.usage is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (
        4320,
        42,
        4362,
    )
    assert (
        last.usage.prompt_tokens_details is not None
        and last.usage.prompt_tokens_details.cached_tokens == 4000
    )
    assert stream.usage == last.usage.model_dump(exclude_none=True)
    assert stream.finished


def test_usage_property_before_and_during_stream() -> None:
    stream = AnthropicToOpenAIStream(model="m", created=CREATED, include_usage=False)
    assert stream.usage is None
    stream.feed(*message_start({"input_tokens": 7, "output_tokens": 1}))
    assert stream.usage is not None and stream.usage["prompt_tokens"] == 7


@pytest.mark.parametrize(("stop_reason", "finish_reason"), STOP_REASONS)
def test_every_stop_reason_streaming(stop_reason: str, finish_reason: str) -> None:
    chunks = openai_chunks(run_a2o(text_events(stop_reason)))
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [finish_reason]


def test_message_stop_without_message_delta_still_finishes() -> None:
    events = [e for e in text_events() if e[0] != "message_delta"]
    chunks = openai_chunks(run_a2o(events, include_usage=False))
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_error_mid_stream_ends_the_stream_with_an_openai_error_frame() -> None:
    error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    events = text_events()[:4] + [("error", error)] + text_events()[4:]
    stream = AnthropicToOpenAIStream(model="m", created=CREATED, include_usage=True)
    frames = [f for e, d in events for f in stream.feed(e, d)]
    assert stream.finished
    assert frames[-1].startswith(b"data: {") and DONE_FRAME not in frames
    payloads = openai_events(frames)
    assert payloads[-1] == {
        "error": {"message": "Overloaded", "type": "server_error", "param": None, "code": "overloaded_error"}
    }
    with openai_client(b"".join(frames)) as client:
        received: list[str] = []
        with pytest.raises(openai.APIError, match="Overloaded"):
            for chunk in client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "x"}], stream=True
            ):
                received.append(chunk.choices[0].delta.content or "")
    assert "".join(received) == "Hello"


def test_pings_unknown_events_and_thinking_blocks_are_dropped() -> None:
    events: list[tuple[str | None, dict[str, Any]]] = [
        message_start(),
        PING,
        ("brand_new_event", {"type": "brand_new_event"}),
        block_start(0, {"type": "thinking", "thinking": "", "signature": ""}),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "thinking_delta", "thinking": "secret"},
            },
        ),
        block_stop(0),
        block_start(1, {"type": "tool_use", "id": "toolu_9", "name": "f", "input": {}}),
        json_delta(1, "{}"),
        block_stop(1),
        PING,
        message_delta("tool_use"),
        MESSAGE_STOP,
    ]
    frames = run_a2o(events, include_usage=False)
    assert b"secret" not in b"".join(frames)
    assert len(frames) == 5  # role, tool start, tool args, finish, [DONE]
    call = openai_final(frames).choices[0].message.tool_calls[0]
    assert (call.id, call.function.arguments) == ("toolu_9", "{}")


def test_event_name_may_come_from_the_data_type() -> None:
    frames = run_a2o([(None, data) for _, data in text_events()], include_usage=False)
    assert openai_final(frames).choices[0].message.content == "Hello!"


def test_error_frame_helper_is_an_sdk_error() -> None:
    frame = error_frame("upstream went away", "server_error", "upstream_disconnected")
    with openai_client(frame) as client, pytest.raises(openai.APIError, match="upstream went away") as info:
        list(
            client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "x"}], stream=True
            )
        )
    assert info.value.code == "upstream_disconnected"


# ============================================================= 2. Anthropic front → OpenAI upstream: request


def test_anthropic_request_to_openai() -> None:
    body = {
        "model": "llama",
        "max_tokens": 256,
        "system": [{"type": "text", "text": "Be kind.", "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {"role": "user", "content": "Weather in SF?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "...", "signature": "s"},
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "SF"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_1",
                        "content": [{"type": "text", "text": "18°C"}],
                    },
                    {"type": "text", "text": "And tomorrow?"},
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"},
                    },
                ],
            },
        ],
        "tools": [{"name": "get_weather", "description": "Weather", "input_schema": {"type": "object"}}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "stop_sequences": ["END"],
        "temperature": 0.2,
        "top_k": 40,
        "metadata": {"user_id": "u-1"},
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "stream": True,
    }
    out = anthropic_to_openai_chat(body)
    assert out == {
        "model": "llama",
        "max_tokens": 256,
        "messages": [
            {"role": "system", "content": "Be kind."},
            {"role": "user", "content": "Weather in SF?"},
            {
                "role": "assistant",
                "content": "Checking.",
                "tool_calls": [
                    {
                        "id": "toolu_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"SF"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "toolu_1", "content": "18°C"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "And tomorrow?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                ],
            },
        ],
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "Weather",
                    "parameters": {"type": "object"},
                },
            }
        ],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "stop": ["END"],
        "temperature": 0.2,
        "user": "u-1",
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    valid_openai_request(out)


def test_tool_result_images_follow_the_tool_message() -> None:
    image = {"type": "image", "source": {"type": "url", "url": "https://x/shot.png"}}
    body = {
        "model": "m",
        "max_tokens": 5,
        "messages": [
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "shot", "input": {}}]},
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "t1", "content": [image], "is_error": True}
                ],
            },
        ],
    }
    messages = anthropic_to_openai_chat(body)["messages"]
    assert messages[0] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": "t1", "type": "function", "function": {"name": "shot", "arguments": "{}"}}],
    }
    assert messages[1:] == [
        {"role": "tool", "tool_call_id": "t1", "content": ""},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/shot.png"}}]},
    ]


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"type": "auto"}, {"tool_choice": "auto"}),
        ({"type": "none"}, {"tool_choice": "none"}),
        ({"type": "any"}, {"tool_choice": "required"}),
        ({"type": "tool", "name": "f"}, {"tool_choice": {"type": "function", "function": {"name": "f"}}}),
        (
            {"type": "auto", "disable_parallel_tool_use": True},
            {"tool_choice": "auto", "parallel_tool_calls": False},
        ),
    ],
)
def test_anthropic_tool_choice_table(choice: dict[str, Any], expected: dict[str, Any]) -> None:
    body = {
        "model": "m",
        "max_tokens": 5,
        "messages": [{"role": "user", "content": "x"}],
        "tools": [{"name": "f", "input_schema": {"type": "object"}}],
        "tool_choice": choice,
    }
    out = anthropic_to_openai_chat(body)
    assert {k: out[k] for k in expected} == expected
    assert "parallel_tool_calls" in out or "parallel_tool_calls" not in expected


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0]"),
        ({"mcp_servers": [{"type": "url", "url": "https://x", "name": "x"}]}, "mcp_servers"),
        ({"messages": [{"role": "system", "content": "x"}]}, "messages[0].role"),
        (
            {"messages": [{"role": "user", "content": [{"type": "search_result"}]}]},
            "messages[0].content[0].type",
        ),
        (
            {"messages": [{"role": "assistant", "content": [{"type": "server_tool_use"}]}]},
            "messages[0].content[0]",
        ),
    ],
)
def test_untranslatable_anthropic_requests_name_the_field(patch: dict[str, Any], param: str) -> None:
    body = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}], **patch}
    with pytest.raises(TranslationError) as info:
        anthropic_to_openai_chat(body)
    assert info.value.param == param


def test_anthropic_field_table_is_consistent() -> None:
    base = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}
    before = anthropic_to_openai_chat(base)
    for rule in ANTHROPIC_REQUEST_FIELDS:
        if rule.action == "dropped":
            assert anthropic_to_openai_chat({**base, rule.field: {"any": "value"}}) == before, rule.field
        elif rule.action == "rejected":
            with pytest.raises(TranslationError):
                anthropic_to_openai_chat({**base, rule.field: {"any": "value"}})


def test_output_config_schema_becomes_response_format() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    body = {
        "model": "m",
        "max_tokens": 5,
        "messages": [{"role": "user", "content": "x"}],
        "output_config": {"format": {"type": "json_schema", "schema": schema}, "effort": "high"},
    }
    out = anthropic_to_openai_chat(body)
    assert out["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "output", "schema": schema},
    }
    valid_openai_request(out)


# ============================================================ 2. Anthropic front → OpenAI upstream: response


def _completion(message: dict[str, Any], finish_reason: str | None = "stop", **extra: Any) -> dict[str, Any]:
    choice = {
        "index": 0,
        "message": {"role": "assistant", **message},
        "finish_reason": finish_reason,
        "logprobs": None,
    }
    return {
        "id": "chatcmpl-abc",
        "object": "chat.completion",
        "created": CREATED,
        "model": "llama",
        "choices": [{**choice, **extra}],
        "usage": {
            "prompt_tokens": 100,
            "completion_tokens": 20,
            "total_tokens": 120,
            "prompt_tokens_details": {"cached_tokens": 60},
        },
    }


def test_openai_completion_to_anthropic_message() -> None:
    body = _completion(
        {
            "content": "Checking.",
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}},
                {
                    "id": "call_2",
                    "type": "function",
                    "function": {"name": "g", "arguments": '{"b": '},
                },  # cut short
            ],
        },
        "tool_calls",
    )
    message = Message.model_validate(openai_chat_to_anthropic_message(body, model="claude-alias"))
    assert message.id == "msg_abc" and message.model == "claude-alias"
    assert message.stop_reason == "tool_use"
    assert [b.model_dump(exclude_none=True) for b in message.content] == [
        {"type": "text", "text": "Checking."},
        {"type": "tool_use", "id": "call_1", "name": "f", "input": {"a": 1}},
        {"type": "tool_use", "id": "call_2", "name": "g", "input": {}},
    ]
    assert (
        message.usage.input_tokens,
        message.usage.output_tokens,
        message.usage.cache_read_input_tokens,
    ) == (40, 20, 60)


@pytest.mark.parametrize(
    ("finish", "extra", "expected"),
    [
        ("stop", {}, ("end_turn", None)),
        ("stop", {"stop_reason": "###"}, ("stop_sequence", "###")),  # vLLM names the matched stop string
        ("stop", {"stop_reason": 128009}, ("end_turn", None)),  # ...or the stop token id
        ("length", {}, ("max_tokens", None)),
        ("tool_calls", {}, ("tool_use", None)),
        ("function_call", {}, ("tool_use", None)),
        ("content_filter", {}, ("refusal", None)),
        (None, {}, ("end_turn", None)),
        ("something_new", {}, ("end_turn", None)),
    ],
)
def test_finish_reasons_openai_to_anthropic(
    finish: str | None, extra: dict[str, Any], expected: tuple[str, str | None]
) -> None:
    out = openai_chat_to_anthropic_message(_completion({"content": "x"}, finish, **extra), model="m")
    assert (out["stop_reason"], out["stop_sequence"]) == expected


def test_translated_completion_through_the_anthropic_sdk() -> None:
    payload = orjson.dumps(
        openai_chat_to_anthropic_message(_completion({"content": "Hello"}), model="claude-alias")
    )
    with anthropic_client(payload, content_type="application/json") as client:
        message = client.messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert message.content[0].type == "text" and message.content[0].text == "Hello"
    assert message.stop_reason == "end_turn"


# ============================================================== 2. Anthropic front → OpenAI upstream: stream


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any) -> dict[str, Any]:
    choices = (
        [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
    )
    return {
        "id": "chatcmpl-xyz",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": "llama",
        "choices": choices,
        **extra,
    }


def tool_delta(
    index: int, *, id: str | None = None, name: str | None = None, args: str | None = None
) -> dict[str, Any]:
    call: dict[str, Any] = {"index": index, "function": {}}
    if id:
        call.update(id=id, type="function")
        call["function"]["name"] = name
    if args is not None:
        call["function"]["arguments"] = args
    return {"tool_calls": [call]}


def openai_tool_stream() -> list[dict[str, Any]]:
    """OpenAI's documented shape: role chunk, text, then per-call chunks (id+name first, arguments after)."""
    return [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Let me"}),
        chunk({"content": " look."}),
        chunk(tool_delta(0, id="call_a", name="get_weather", args="")),
        chunk(tool_delta(0, args='{"city":')),
        chunk(tool_delta(0, args=' "Paris"}')),
        chunk(tool_delta(1, id="call_b", name="get_time", args='{"tz":"CET"}')),
        chunk({}, "tool_calls"),
        chunk(
            None,
            usage={
                "prompt_tokens": 50,
                "completion_tokens": 30,
                "total_tokens": 80,
                "prompt_tokens_details": {"cached_tokens": 20},
            },
        ),
    ]


def test_openai_stream_to_anthropic_event_sequence() -> None:
    frames = run_o2a(openai_tool_stream())
    events = anthropic_events(frames)
    for _, data in events:
        EVENT_ADAPTER.validate_python(data)  # every event is a valid RawMessageStreamEvent
    names = [name for name, _ in events]
    assert names == [
        "message_start",
        "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_stop",
        "message_delta",
        "message_stop",
    ]  # fmt: skip
    starts = [d for n, d in events if n == "content_block_start"]
    assert [(s["index"], s["content_block"]["type"]) for s in starts] == [
        (0, "text"),
        (1, "tool_use"),
        (2, "tool_use"),
    ]
    final = anthropic_final(frames)
    assert final.id == "msg_xyz" and final.model == "claude-alias"
    assert [b.model_dump(exclude_none=True) for b in final.content] == [
        {"type": "text", "text": "Let me look."},
        {"type": "tool_use", "id": "call_a", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "call_b", "name": "get_time", "input": {"tz": "CET"}},
    ]
    assert final.stop_reason == "tool_use"
    assert (final.usage.input_tokens, final.usage.output_tokens, final.usage.cache_read_input_tokens) == (
        30,
        30,
        20,
    )


def test_openai_stream_end_to_end_with_the_anthropic_client() -> None:
    body = b"".join(run_o2a(openai_tool_stream()))
    with anthropic_client(body) as client:
        with client.messages.stream(
            model="m", max_tokens=5, messages=[{"role": "user", "content": "x"}]
        ) as stream:
            text = "".join(stream.text_stream)
            message = stream.get_final_message()
    assert text == "Let me look."
    assert [b.type for b in message.content] == ["text", "tool_use", "tool_use"]


def test_text_after_a_tool_call_opens_a_new_block() -> None:
    chunks = [
        chunk({"content": "a"}),
        chunk(tool_delta(0, id="c1", name="f", args="{}")),
        chunk({"content": "b"}),
        chunk({}, "stop"),
    ]
    final = anthropic_final(run_o2a(chunks))
    assert [b.type for b in final.content] == ["text", "tool_use", "text"]
    assert final.content[2].text == "b"


def test_openai_stream_without_tool_index_and_with_repeated_ids() -> None:
    # Some servers omit `index`, others repeat the id on every fragment: neither may duplicate a call.
    chunks = [
        chunk(
            {"tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x"'}}]}
        ),
        chunk({"tool_calls": [{"function": {"arguments": ": 1}"}}]}),
        chunk(
            {
                "tool_calls": [
                    {"index": 1, "id": "c2", "type": "function", "function": {"name": "g", "arguments": "{"}}
                ]
            }
        ),
        chunk({"tool_calls": [{"index": 1, "id": "c2", "function": {"arguments": "}"}}]}),
        chunk({}, "tool_calls"),
    ]
    final = anthropic_final(run_o2a(chunks))
    assert [(b.id, b.name, b.input) for b in final.content] == [("c1", "f", {"x": 1}), ("c2", "g", {})]


def test_openai_in_stream_error_becomes_an_anthropic_error_event() -> None:
    chunks = [
        chunk({"content": "partial"}),
        {"error": {"message": "engine died", "type": "InternalServerError", "code": 500}},
    ]
    stream = OpenAIToAnthropicStream(model="m")
    frames = [f for c in chunks for f in stream.feed(c)]
    assert stream.finished and stream.done() == [] and stream.feed(chunk({"content": "more"})) == []
    assert anthropic_events(frames)[-1] == (
        "error",
        {"type": "error", "error": {"type": "api_error", "message": "engine died"}},
    )
    with anthropic_client(b"".join(frames)) as client:
        with pytest.raises(anthropic.APIStatusError, match="engine died"):
            with client.messages.stream(
                model="m", max_tokens=5, messages=[{"role": "user", "content": "x"}]
            ) as s:
                s.get_final_message()


def test_tgi_string_error_in_stream() -> None:
    frames = run_o2a([{"error": "Input validation error: too long", "error_type": "validation"}])
    assert anthropic_events(frames) == [
        (
            "error",
            {"type": "error", "error": {"type": "api_error", "message": "Input validation error: too long"}},
        )
    ]


def test_empty_openai_stream_still_produces_a_valid_message() -> None:
    final = anthropic_final(run_o2a([]))
    assert final.content == [] and final.stop_reason == "end_turn"


def test_o2a_usage_property_and_vllm_stop_string() -> None:
    stream = OpenAIToAnthropicStream(model="m")
    assert stream.usage is None
    frames = stream.feed(chunk({"content": "x"}))
    frames += stream.feed(
        {
            **chunk({}, "stop"),
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop", "stop_reason": "</s>"}],
        }
    )
    frames += stream.feed(chunk(None, usage={"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}))
    frames += stream.done()
    assert stream.usage == {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
    final = anthropic_final(frames)
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", "</s>")


def test_anthropic_error_frame_helper_is_an_sdk_error() -> None:
    with anthropic_client(anthropic_error_frame("Overloaded", "overloaded_error")) as client:
        with pytest.raises(anthropic.APIStatusError, match="Overloaded"):
            with client.messages.stream(
                model="m", max_tokens=5, messages=[{"role": "user", "content": "x"}]
            ) as s:
                s.get_final_message()


# ======================================================================================== 3. error mapping


@pytest.mark.parametrize(
    ("status", "anthropic_type", "openai_type", "sdk_error"),
    [
        (400, "invalid_request_error", "invalid_request_error", openai.BadRequestError),
        (401, "authentication_error", "authentication_error", openai.AuthenticationError),
        (403, "permission_error", "permission_error", openai.PermissionDeniedError),
        (404, "not_found_error", "not_found_error", openai.NotFoundError),
        (413, "request_too_large", "request_too_large", openai.APIStatusError),
        (429, "rate_limit_error", "rate_limit_error", openai.RateLimitError),
        (500, "api_error", "server_error", openai.InternalServerError),
        (529, "overloaded_error", "server_error", openai.InternalServerError),
    ],
)
def test_anthropic_errors_to_openai(
    status: int, anthropic_type: str, openai_type: str, sdk_error: type[Exception]
) -> None:
    body = {"type": "error", "error": {"type": anthropic_type, "message": "boom"}, "request_id": "req_1"}
    out_status, out = anthropic_error_to_openai(status, body)
    assert out_status == status  # 529 included: the SDK retries >= 500 and raises InternalServerError
    assert out == {"error": {"message": "boom", "type": openai_type, "param": None, "code": anthropic_type}}
    with openai_client(orjson.dumps(out), status, "application/json") as client:
        with pytest.raises(sdk_error) as info:
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert getattr(info.value, "code", None) == anthropic_type
    assert getattr(info.value, "status_code", None) == status


def test_anthropic_error_with_a_non_json_body() -> None:
    status, out = anthropic_error_to_openai(413, "<html>413 Request Entity Too Large</html>")
    assert (status, out["error"]["type"], out["error"]["code"]) == (
        413,
        "request_too_large",
        "request_too_large",
    )
    assert "413 Request Entity Too Large" in out["error"]["message"]
    _, out = anthropic_error_to_openai(502, "")
    assert out["error"] == {
        "message": "upstream returned HTTP 502",
        "type": "server_error",
        "param": None,
        "code": "api_error",
    }


def _oai(message: str, type_: str, code: str | None = None) -> dict[str, Any]:
    return {"message": message, "type": type_, "param": None, "code": code}


_TGI_TOO_LONG = "Input validation error: `inputs` must have less than 4096 tokens"
_HTML = "<html><body>Bad Gateway</body></html>"


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        # newer vLLM: wrapped, CamelCase type, int code
        (
            400,
            {"error": {"message": "too big", "type": "BadRequestError", "param": None, "code": 400}},
            _oai("too big", "invalid_request_error", "400"),
        ),
        # older vLLM: flat
        (
            404,
            {"object": "error", "message": "no model", "type": "NotFoundError", "param": None, "code": 404},
            _oai("no model", "not_found_error", "404"),
        ),
        # TGI: the error is a string, the kind is in error_type
        (
            422,
            {"error": _TGI_TOO_LONG, "error_type": "validation"},
            _oai(_TGI_TOO_LONG, "invalid_request_error", "validation"),
        ),
        (
            429,
            {"error": "Model is overloaded", "error_type": "overloaded"},
            _oai("Model is overloaded", "rate_limit_error", "overloaded"),
        ),
        # OpenAI itself: unchanged
        (
            429,
            {
                "error": {
                    "message": "Slow down",
                    "type": "requests",
                    "param": None,
                    "code": "rate_limit_exceeded",
                }
            },
            _oai("Slow down", "requests", "rate_limit_exceeded"),
        ),
        # FastAPI defaults
        (404, {"detail": "Not Found"}, _oai("Not Found", "not_found_error")),
        (
            422,
            {"detail": [{"loc": ["body", "model"], "msg": "field required"}]},
            _oai('[{"loc":["body","model"],"msg":"field required"}]', "invalid_request_error"),
        ),
        # not JSON at all, or nothing useful
        (502, _HTML, _oai(_HTML, "server_error")),
        (503, b"upstream connect error", _oai("upstream connect error", "server_error")),
        (500, None, _oai("upstream returned HTTP 500", "server_error")),
        (500, [1, 2], _oai("upstream returned HTTP 500", "server_error")),
        (
            400,
            {"error": {"message": "", "code": True}},
            _oai("upstream returned HTTP 400", "invalid_request_error"),
        ),
    ],
)
def test_normalise_openai_compatible_errors(status: int, body: object, expected: dict[str, Any]) -> None:
    assert normalise_openai_compatible_error(status, body) == {"error": expected}


def test_long_error_pages_are_truncated() -> None:
    message = normalise_openai_compatible_error(502, "x" * 10_000)["error"]["message"]
    assert 2000 <= len(message) <= 2001


def test_normalise_stream_error() -> None:
    assert normalise_stream_error(chunk({"content": "fine"})) is None
    assert normalise_stream_error({"error": None, "choices": []}) is None
    flat = {"object": "error", "message": "oops", "type": "BadRequestError", "param": None, "code": 400}
    assert normalise_stream_error(flat) == {
        "error": {"message": "oops", "type": "server_error", "param": None, "code": "400"}
    }


@pytest.mark.parametrize(
    ("status", "body", "anthropic_type", "sdk_error"),
    [
        (400, {"error": {"message": "bad", "type": "x"}}, "invalid_request_error", anthropic.BadRequestError),
        (
            401,
            {"error": {"message": "bad", "code": "invalid_api_key"}},
            "authentication_error",
            anthropic.AuthenticationError,
        ),
        (404, {"object": "error", "message": "bad", "code": 404}, "not_found_error", anthropic.NotFoundError),
        (
            422,
            {"error": "bad", "error_type": "validation"},
            "invalid_request_error",
            anthropic.UnprocessableEntityError,
        ),
        (429, {"error": {"message": "bad", "type": "tokens"}}, "rate_limit_error", anthropic.RateLimitError),
        (500, "bad", "api_error", anthropic.InternalServerError),
        (503, {"error": {"message": "bad"}}, "api_error", anthropic.InternalServerError),
        (504, "bad", "timeout_error", anthropic.InternalServerError),
    ],
)
def test_openai_errors_to_anthropic(
    status: int, body: object, anthropic_type: str, sdk_error: type[Exception]
) -> None:
    out_status, out = openai_error_to_anthropic(status, body)
    assert out_status == status
    assert out == {"type": "error", "error": {"type": anthropic_type, "message": "bad"}}
    with anthropic_client(orjson.dumps(out), status, "application/json") as client:
        with pytest.raises(sdk_error) as info:
            client.messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert getattr(info.value, "status_code", None) == status
    assert getattr(info.value, "body", {})["error"]["type"] == anthropic_type


# ================================================================================ properties (hypothesis)

_text = st.text(st.characters(codec="utf-8"), min_size=1, max_size=20)
_json_value = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | _text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=6,
)
_args = st.dictionaries(st.from_regex(r"[a-z_]{1,8}", fullmatch=True), _json_value, max_size=3)
_name = st.from_regex(r"[a-zA-Z_][a-zA-Z0-9_]{0,15}", fullmatch=True)


@st.composite
def openai_conversations(draw: st.DrawFn) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": draw(_text)})
    counter = 0
    for _ in range(draw(st.integers(1, 4))):
        messages.append({"role": "user", "content": draw(_text)})
        calls = []
        for _ in range(draw(st.integers(0, 2))):
            counter += 1
            arguments = orjson.dumps(draw(_args)).decode()
            calls.append(
                {
                    "id": f"call_{counter}",
                    "type": "function",
                    "function": {"name": draw(_name), "arguments": arguments},
                }
            )
        assistant: dict[str, Any] = {
            "role": "assistant",
            "content": draw(st.none() | _text) if calls else draw(_text),
        }
        if calls:
            assistant["tool_calls"] = calls
        messages.append(assistant)
        for call in calls:
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": draw(_text)})
    return messages


def _flatten(messages: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """A conversation as a flat list of facts, independent of how turns are merged or split."""
    facts: list[tuple[Any, ...]] = []
    for m in messages:
        content = m.get("content")
        texts = (
            [content]
            if isinstance(content, str)
            else [p["text"] for p in content or () if p.get("type") == "text"]
        )
        if m["role"] == "tool":
            facts.append(("result", m["tool_call_id"], content))
            continue
        facts.extend((m["role"], t) for t in texts if t)
        for call in m.get("tool_calls") or ():
            facts.append(
                ("call", call["id"], call["function"]["name"], orjson.loads(call["function"]["arguments"]))
            )
    return facts


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(openai_conversations())
def test_property_request_round_trip_keeps_text_and_tool_calls(messages: list[dict[str, Any]]) -> None:
    anthropic_body = openai_chat_to_anthropic({"model": "m", "messages": messages}, default_max_tokens=64)
    valid_anthropic_request(anthropic_body)
    back = anthropic_to_openai_chat(anthropic_body)
    valid_openai_request(back)
    assert _flatten(back["messages"]) == _flatten(messages)


@st.composite
def anthropic_messages(draw: st.DrawFn) -> dict[str, Any]:
    blocks: list[dict[str, Any]] = []
    for i in range(draw(st.integers(0, 4))):
        if draw(st.booleans()):
            blocks.append({"type": "text", "text": draw(_text)})
        else:
            blocks.append({"type": "tool_use", "id": f"toolu_{i}", "name": draw(_name), "input": draw(_args)})
    stop = draw(st.sampled_from([r for r, _ in STOP_REASONS[:-1]]))
    counts = st.integers(0, 10**6)
    usage = {
        "input_tokens": draw(counts),
        "output_tokens": draw(counts),
        "cache_creation_input_tokens": draw(counts),
        "cache_read_input_tokens": draw(counts),
    }
    message = {"id": "msg_p", "type": "message", "role": "assistant", "model": "c", "content": blocks}
    return {**message, "stop_reason": stop, "stop_sequence": None, "usage": usage}


def _pieces(draw: Callable[[st.SearchStrategy[Any]], Any], text: str) -> Iterator[str]:
    """Split a string at arbitrary points (an upstream may fragment anywhere)."""
    cuts = sorted(set(draw(st.lists(st.integers(1, max(len(text) - 1, 1)), max_size=4))))
    bounds = [0, *[c for c in cuts if c < len(text)], len(text)]
    return (text[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if b > a)


@settings(max_examples=100, deadline=None)
@given(anthropic_messages(), st.data())
def test_property_anthropic_stream_matches_the_complete_response(
    message: dict[str, Any], data: st.DataObject
) -> None:
    """Streaming a Message event by event yields what translating the whole Message yields."""
    events: list[tuple[str | None, dict[str, Any]]] = [
        message_start({**message["usage"], "output_tokens": 1})
    ]
    for i, block in enumerate(message["content"]):
        if block["type"] == "text":
            events.append(block_start(i, {"type": "text", "text": ""}))
            events.extend(text_delta(i, p) for p in _pieces(data.draw, block["text"]))
        else:
            events.append(block_start(i, {**block, "input": {}}))
            events.extend(json_delta(i, p) for p in _pieces(data.draw, orjson.dumps(block["input"]).decode()))
        events.append(block_stop(i))
    events += [
        message_delta(message["stop_reason"], {"output_tokens": message["usage"]["output_tokens"]}),
        MESSAGE_STOP,
    ]
    streamed = openai_final(run_a2o(events))
    whole = ChatCompletion.model_validate(
        anthropic_message_to_openai(message, model="gpt-alias", created=CREATED)
    )
    # a stream's role chunk carries content "" before it knows whether text follows: "" and null agree
    assert (streamed.choices[0].message.content or None) == (whole.choices[0].message.content or None)
    streamed_calls = [
        (c.id, c.function.name, orjson.loads(c.function.arguments))
        for c in streamed.choices[0].message.tool_calls or ()
    ]
    whole_calls = [
        (c.id, c.function.name, orjson.loads(c.function.arguments))
        for c in whole.choices[0].message.tool_calls or ()
        if isinstance(c, ChatCompletionMessageFunctionToolCall)
    ]
    assert streamed_calls == whole_calls
    assert streamed.choices[0].finish_reason == whole.choices[0].finish_reason
    assert streamed.usage == whole.usage


@settings(max_examples=100, deadline=None)
@given(anthropic_messages(), st.data())
def test_property_openai_stream_matches_the_complete_response(
    message: dict[str, Any], data: st.DataObject
) -> None:
    """An OpenAI completion streamed in fragments and translated equals the translated completion."""
    completion = anthropic_message_to_openai(message, model="llama", created=CREATED)
    completion["id"] = "chatcmpl-p"
    reply = completion["choices"][0]["message"]
    chunks = [chunk({"role": "assistant", "content": ""})]
    chunks += [chunk({"content": p}) for p in _pieces(data.draw, reply["content"] or "")]
    for k, call in enumerate(reply.get("tool_calls") or ()):
        chunks.append(chunk(tool_delta(k, id=call["id"], name=call["function"]["name"], args="")))
        chunks += [chunk(tool_delta(k, args=p)) for p in _pieces(data.draw, call["function"]["arguments"])]
    chunks.append(chunk({}, completion["choices"][0]["finish_reason"]))
    chunks.append(chunk(None, usage=completion["usage"]))
    for c in chunks:
        c["id"] = "chatcmpl-p"
    streamed = anthropic_final(run_o2a(chunks))
    whole = Message.model_validate(openai_chat_to_anthropic_message(completion, model="claude-alias"))
    # OpenAI puts all text before the tool calls, so block order is text first in both
    assert [b.model_dump(exclude_none=True) for b in streamed.content] == [
        b.model_dump(exclude_none=True) for b in whole.content
    ]
    assert (streamed.stop_reason, streamed.usage.input_tokens, streamed.usage.output_tokens) == (
        whole.stop_reason,
        whole.usage.input_tokens,
        whole.usage.output_tokens,
    )


def _sdk_decoders_agree(frames: list[bytes]) -> None:
    """Both SDK decoders split our byte stream into the same events, whatever the frame boundaries."""
    joined = b"".join(frames)
    as_one = [(e.event, e.data) for e in OpenAISSEDecoder().iter_bytes(iter([joined]))]
    per_byte = [(e.event, e.data) for e in AnthropicSSEDecoder().iter_bytes(iter(bytes([b]) for b in joined))]
    assert as_one == per_byte and len(as_one) == len(frames)


@pytest.mark.parametrize(
    "make", [lambda: run_a2o(text_and_two_tools_events()), lambda: run_o2a(openai_tool_stream())]
)
def test_frames_are_self_delimiting(make: Callable[[], list[bytes]]) -> None:
    _sdk_decoders_agree(make())
