"""Anthropic front, OpenAI upstream: the request (proxy/providers/anthropic/front_request.py).

Checked with the official SDKs' own SSE decoders, pydantic models and stream accumulators, and end to end
through the SDK clients over an in-memory httpx2 transport (no sockets)."""

from __future__ import annotations

from typing import Any

import pytest
from anthropic_translation import (
    valid_openai_request,
)

from proxy.providers.anthropic.front_request import ANTHROPIC_REQUEST_FIELDS, anthropic_to_openai_chat
from proxy.providers.anthropic.request_to import (
    TranslationError,
)

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


def test_output_config_schema_becomes_a_strict_response_format() -> None:
    """Anthropic enforces the schema; OpenAI does only with strict, whose form requires every property."""
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    body = {
        "model": "m",
        "max_tokens": 5,
        "messages": [{"role": "user", "content": "x"}],
        "output_config": {"format": {"type": "json_schema", "schema": schema}, "effort": "high"},
    }
    out = anthropic_to_openai_chat(body)
    strict = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"],
              "additionalProperties": False}
    assert out["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "output", "schema": strict, "strict": True},
    }
    assert schema == {"type": "object", "properties": {"a": {"type": "string"}}}  # the client's, untouched
    valid_openai_request(out)


def test_a_schema_strict_mode_cannot_express_goes_without_strict() -> None:
    schema = {"type": "object", "properties": {"site": {"type": "string", "format": "uri"}}, "required": ["site"]}
    body = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}],
            "output_config": {"format": {"type": "json_schema", "schema": schema}}}
    out = anthropic_to_openai_chat(body)
    assert out["response_format"] == {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}
    valid_openai_request(out)


def test_a_strict_tool_becomes_a_strict_function() -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
              "additionalProperties": False}
    tools = [{"name": "weather", "input_schema": schema, "strict": True},
             {"name": "loose", "input_schema": {"type": "object"}}]
    body = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "tools": tools}
    functions = [t["function"] for t in anthropic_to_openai_chat(body)["tools"]]
    assert functions == [{"name": "weather", "parameters": schema, "strict": True},
                         {"name": "loose", "parameters": {"type": "object"}}]
