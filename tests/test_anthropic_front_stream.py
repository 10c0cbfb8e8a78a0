"""Anthropic front, OpenAI upstream: the stream (proxy/providers/anthropic/front_stream.py).

Checked with the official SDKs' own SSE decoders, pydantic models and stream accumulators, and end to end
through the SDK clients over an in-memory httpx2 transport (no sockets)."""

from __future__ import annotations

import anthropic
import pytest
from anthropic_translation import (
    EVENT_ADAPTER,
    anthropic_client,
    anthropic_events,
    anthropic_final,
    chunk,
    openai_tool_stream,
    run_o2a,
    tool_delta,
)

from proxy.providers.anthropic.front_stream import OpenAIToAnthropicStream, anthropic_error_frame

# ============================================================== 2. Anthropic front → OpenAI upstream: stream


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


def test_a_streamed_refusal_stops_with_anthropics_refusal() -> None:
    final = anthropic_final(run_o2a([chunk({"refusal": "I can't"}), chunk({"refusal": " help."}), chunk({}, "stop")]))
    assert final.stop_reason == "refusal"
    assert [b.model_dump(exclude_none=True) for b in final.content] == [{"type": "text", "text": "I can't help."}]


def test_anthropic_error_frame_helper_is_an_sdk_error() -> None:
    with anthropic_client(anthropic_error_frame("Overloaded", "overloaded_error")) as client:
        with pytest.raises(anthropic.APIStatusError, match="Overloaded"):
            with client.messages.stream(
                model="m", max_tokens=5, messages=[{"role": "user", "content": "x"}]
            ) as s:
                s.get_final_message()
