"""OpenAI front, Anthropic upstream: the whole response (proxy/providers/anthropic/response_from.py).

Checked with the official SDKs' own SSE decoders, pydantic models and stream accumulators, and end to end
through the SDK clients over an in-memory httpx2 transport (no sockets)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from anthropic_translation import (
    CREATED,
    STOP_REASONS,
    openai_client,
)
from openai.types.chat import ChatCompletion, ChatCompletionMessageFunctionToolCall

from proxy.providers.anthropic.response_from import anthropic_message_to_openai

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
