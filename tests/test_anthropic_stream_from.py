"""OpenAI front, Anthropic upstream: the stream (proxy/providers/anthropic/stream_from.py).

Checked with the official SDKs' own SSE decoders, pydantic models and stream accumulators, and end to end
through the SDK clients over an in-memory httpx2 transport (no sockets)."""

from __future__ import annotations

from typing import Any

import openai
import orjson
import pytest
from anthropic_translation import (
    CREATED,
    MESSAGE_STOP,
    PING,
    STOP_REASONS,
    block_start,
    block_stop,
    json_delta,
    message_delta,
    message_start,
    openai_chunks,
    openai_client,
    openai_events,
    openai_final,
    run_a2o,
    text_and_two_tools_events,
    text_events,
)

from proxy.providers.anthropic.stream_from import DONE_FRAME, AnthropicToOpenAIStream, error_frame

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
