"""Helpers of the OpenAI ⇄ Anthropic translation tests: SDK decoders and validators, in-memory SDK clients,
and Anthropic stream events as its documentation shows them."""

from __future__ import annotations

from typing import Any

import anthropic
import httpx2
import openai
from anthropic._streaming import SSEDecoder as AnthropicSSEDecoder
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import RawMessageStreamEvent
from anthropic.types import message_create_params as anthropic_params
from openai._streaming import SSEDecoder as OpenAISSEDecoder
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletionChunk
from openai.types.chat import completion_create_params as openai_params
from pydantic import TypeAdapter

from proxy.providers.anthropic.front_stream import OpenAIToAnthropicStream
from proxy.providers.anthropic.stream_from import AnthropicToOpenAIStream

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
