"""Anthropic front, OpenAI upstream: the whole response (proxy/providers/anthropic/front_response.py).

Checked with the official SDKs' own SSE decoders, pydantic models and stream accumulators, and end to end
through the SDK clients over an in-memory httpx2 transport (no sockets)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from anthropic.types import Message
from anthropic_translation import (
    CREATED,
    anthropic_client,
)

from proxy.providers.anthropic.front_response import openai_chat_to_anthropic_message

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


def test_a_refusal_stops_with_anthropics_refusal() -> None:
    """OpenAI's strict mode refuses in `message.refusal` and finishes with "stop"; Anthropic says `refusal`, so a
    client of structured output knows the text will not match its schema."""
    out = openai_chat_to_anthropic_message(_completion({"content": None, "refusal": "I can't help."}), model="m")
    assert out["stop_reason"] == "refusal" and out["content"] == [{"type": "text", "text": "I can't help."}]


def test_translated_completion_through_the_anthropic_sdk() -> None:
    payload = orjson.dumps(
        openai_chat_to_anthropic_message(_completion({"content": "Hello"}), model="claude-alias")
    )
    with anthropic_client(payload, content_type="application/json") as client:
        message = client.messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert message.content[0].type == "text" and message.content[0].text == "Hello"
    assert message.stop_reason == "end_turn"
