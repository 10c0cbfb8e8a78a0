"""What a trace reads from an answer (proxy/telemetry/genai.py): the model, token usage and finish reasons of
whole answers and of stream events in each protocol the proxy relays, and nothing else."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from proxy.telemetry import genai


def facts_of_events(*events: tuple[str | None, dict[str, Any] | bytes]) -> dict[str, Any]:
    facts = genai.Facts()
    for name, data in events:
        genai.note_event(facts, name, data if isinstance(data, bytes) else orjson.dumps(data))
    return facts.attributes()


def test_an_openai_chat_answer() -> None:
    facts = genai.Facts()
    genai.note_answer(facts, orjson.dumps({
        "model": "gpt-4o-2024-08-06", "choices": [{"index": 0, "finish_reason": "tool_calls"},
                                                   {"index": 1, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42},
    }))
    assert facts.attributes() == {
        "gen_ai.response.model": "gpt-4o-2024-08-06", "gen_ai.response.finish_reasons": ["tool_calls", "stop"],
        "gen_ai.usage.input_tokens": 12, "gen_ai.usage.output_tokens": 30,
    }


def test_an_anthropic_message_counts_cached_input() -> None:
    facts = genai.Facts()
    genai.note_answer(facts, orjson.dumps({
        "type": "message", "model": "claude-sonnet-4-5", "stop_reason": "end_turn",
        "usage": {"input_tokens": 10, "cache_read_input_tokens": 100, "cache_creation_input_tokens": 5,
                  "output_tokens": 7},
    }))
    assert facts.attributes() == {
        "gen_ai.response.model": "claude-sonnet-4-5", "gen_ai.response.finish_reasons": ["end_turn"],
        "gen_ai.usage.input_tokens": 115, "gen_ai.usage.output_tokens": 7,
    }


def test_an_anthropic_stream() -> None:
    assert facts_of_events(
        ("message_start", {"type": "message_start", "message": {
            "model": "claude-haiku-4-5", "usage": {"input_tokens": 25, "output_tokens": 1}}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "text_delta", "text": "private words"}}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "max_tokens"},
                           "usage": {"output_tokens": 64}}),
        ("message_stop", {"type": "message_stop"}),
    ) == {"gen_ai.response.model": "claude-haiku-4-5", "gen_ai.response.finish_reasons": ["max_tokens"],
          "gen_ai.usage.input_tokens": 25, "gen_ai.usage.output_tokens": 64}


def test_an_openai_responses_stream_ends_with_its_status() -> None:
    assert facts_of_events(
        ("response.created", {"type": "response.created", "response": {"model": "gpt-5", "status": "in_progress"}}),
        ("response.output_item.done", {"type": "response.output_item.done", "item": {"status": "completed"}}),
        ("response.completed", {"type": "response.completed", "response": {
            "model": "gpt-5", "status": "completed", "usage": {"input_tokens": 9, "output_tokens": 3}}}),
    ) == {"gen_ai.response.model": "gpt-5", "gen_ai.response.finish_reasons": ["completed"],
          "gen_ai.usage.input_tokens": 9, "gen_ai.usage.output_tokens": 3}


@pytest.mark.parametrize("data", [b"[DONE]", b"not json", b'"a string"', b"{broken"])
def test_what_is_not_an_answer_changes_nothing(data: bytes) -> None:
    assert facts_of_events((None, data)) == {}


def test_nothing_but_those_fields_is_kept() -> None:
    facts = genai.Facts()
    genai.note_answer(facts, orjson.dumps({"model": "m", "choices": [{"message": {"content": "secret"}}],
                                           "system_fingerprint": "fp", "id": "chatcmpl-9"}))
    assert facts.attributes() == {"gen_ai.response.model": "m"}


@pytest.mark.parametrize(
    ("path", "operation"),
    [("/v1/chat/completions", "chat"), ("/v1/messages", "chat"), ("/v1/responses", "chat"),
     ("/v1/completions", "text_completion"), ("/v1/embeddings", "embeddings"), ("/v1/files", None)],
)
def test_operation_names(path: str, operation: str | None) -> None:
    assert genai.operation(path) == operation


@pytest.mark.parametrize(
    ("kind", "name"), [("openai", "openai"), ("anthropic", "anthropic"), ("mock", "signalbox.mock"), ("http", None)]
)
def test_provider_names(kind: str, name: str | None) -> None:
    """An upstream that is not a model provider (a tool API) gets no gen_ai.provider.name."""
    assert genai.provider(kind) == name
