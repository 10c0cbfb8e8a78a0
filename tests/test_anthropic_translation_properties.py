"""Properties across the translation modules (hypothesis): round trips, streams that match the whole
response, self-delimiting frames.

Checked with the official SDKs' own SSE decoders, pydantic models and stream accumulators, and end to end
through the SDK clients over an in-memory httpx2 transport (no sockets)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest
from anthropic._streaming import SSEDecoder as AnthropicSSEDecoder
from anthropic.types import Message
from anthropic_translation import (
    CREATED,
    MESSAGE_STOP,
    STOP_REASONS,
    anthropic_final,
    block_start,
    block_stop,
    chunk,
    json_delta,
    message_delta,
    message_start,
    openai_final,
    openai_tool_stream,
    run_a2o,
    run_o2a,
    text_and_two_tools_events,
    text_delta,
    tool_delta,
    valid_anthropic_request,
    valid_openai_request,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai._streaming import SSEDecoder as OpenAISSEDecoder
from openai.types.chat import ChatCompletion, ChatCompletionMessageFunctionToolCall

from proxy.providers.anthropic.front_request import anthropic_to_openai_chat
from proxy.providers.anthropic.front_response import openai_chat_to_anthropic_message
from proxy.providers.anthropic.request_to import (
    openai_chat_to_anthropic,
)
from proxy.providers.anthropic.response_from import anthropic_message_to_openai

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
