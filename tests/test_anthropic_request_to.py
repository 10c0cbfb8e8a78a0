"""OpenAI front, Anthropic upstream: the request (proxy/providers/anthropic/request_to.py).

Checked with the official SDKs' own SSE decoders, pydantic models and stream accumulators, and end to end
through the SDK clients over an in-memory httpx2 transport (no sockets)."""

from __future__ import annotations

from typing import Any

import pytest
from anthropic_translation import (
    valid_anthropic_request,
)

from proxy.providers.anthropic.request_to import (
    OPENAI_REQUEST_FIELDS,
    TranslationError,
    include_usage_requested,
    openai_chat_to_anthropic,
)

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
