"""An Anthropic upstream's stream (Messages events) → the OpenAI chat.completion.chunk frames the client
reads, as a small state machine fed one parsed event at a time. Pure code: it returns SSE frame bytes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from proxy.providers.anthropic.fields import (
    anthropic_usage_to_openai,
    openai_finish_reason,
    openai_id,
    tool_arguments,
)
from proxy.providers.errors_map import anthropic_stream_error_to_openai

DONE_FRAME = b"data: [DONE]\n\n"


def openai_frame(payload: Mapping[str, Any]) -> bytes:
    """An OpenAI SSE frame: data only, no `event:` line (the OpenAI SDK would still parse it, but vLLM
    and OpenAI never send one)."""
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def error_frame(message: str, type: str, code: str | None = None) -> bytes:
    """The OpenAI in-stream error frame; the SDK raises APIError on it (and does not retry)."""
    return openai_frame({"error": {"message": message, "type": type, "param": None, "code": code}})


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


class AnthropicToOpenAIStream:
    """Anthropic stream events → OpenAI chunk frames, ending with `data: [DONE]` on message_stop.

    Tool calls are numbered among tool_use blocks only, as OpenAI's `tool_calls[].index` expects.
    Thinking, citations and server-tool blocks have no chunk field and are dropped, as are pings."""

    __slots__ = (
        "_model",
        "_created",
        "_include_usage",
        "_id",
        "_kinds",
        "_tool_index",
        "_tools",
        "_no_arguments",
        "_usage",
        "_finish_sent",
        "_finished",
    )

    def __init__(self, *, model: str, created: int, include_usage: bool) -> None:
        self._model = model
        self._created = created
        self._include_usage = include_usage
        self._id = openai_id(None)
        self._kinds: dict[int, str] = {}  # Anthropic block index -> "text" | "tool" | "other"
        self._tool_index: dict[int, int] = {}  # Anthropic block index -> OpenAI tool_calls index
        self._tools = 0
        # Tool blocks whose arguments are still empty: OpenAI always sends a JSON text ("{}" for none), and
        # the SDK's stream helpers json-parse what they accumulated.
        self._no_arguments: set[int] = set()
        self._usage: dict[str, Any] = {}  # Anthropic-shaped, cumulative
        self._finish_sent = False
        self._finished = False

    @property
    def usage(self) -> dict[str, Any] | None:
        """OpenAI-shaped usage so far (None before message_start), for token accounting."""
        return anthropic_usage_to_openai(self._usage) if self._usage else None

    @property
    def finished(self) -> bool:
        return self._finished

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        payload: dict[str, Any] = {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model,
            "choices": [choice],
        }
        if self._include_usage:  # OpenAI sends usage: null on every chunk but the last when asked for usage
            payload["usage"] = None
        return openai_frame(payload)

    def _merge_usage(self, usage: object) -> None:
        # message_delta usage is cumulative: later values replace earlier ones, absent ones are kept.
        for key, value in _mapping(usage).items():
            if value is not None:
                self._usage[key] = value

    def feed(self, event: str | None, data: Mapping[str, Any]) -> list[bytes]:
        if self._finished:
            return []
        kind = event or data.get("type")
        if kind == "message_start":
            message = _mapping(data.get("message"))
            self._id = openai_id(message.get("id"))
            self._merge_usage(message.get("usage"))
            return [self._chunk({"role": "assistant", "content": ""})]
        if kind == "content_block_start":
            return self._block_start(data)
        if kind == "content_block_delta":
            return self._block_delta(data)
        if kind == "content_block_stop":
            index = data.get("index")
            return self._empty_arguments(index) if isinstance(index, int) else []
        if kind == "message_delta":
            self._merge_usage(data.get("usage"))
            stop_reason = _mapping(data.get("delta")).get("stop_reason")
            if stop_reason is None or self._finish_sent:
                return []
            self._finish_sent = True
            return [*self._empty_arguments(), self._chunk({}, openai_finish_reason(stop_reason))]
        if kind == "message_stop":
            return self._stop()
        if kind == "error":
            self._finished = True
            return [openai_frame(anthropic_stream_error_to_openai(data))]
        return []  # ping, and event types added after this was written

    def _empty_arguments(self, index: int | None = None) -> list[bytes]:
        """`"{}"` for a finished tool block (`index`, or every open one) that got no argument text."""
        if index is None:
            indices = sorted(self._no_arguments)
        elif index in self._no_arguments:
            indices = [index]
        else:
            return []
        out = []
        for block in indices:
            self._no_arguments.discard(block)
            call = {"index": self._tool_index[block], "function": {"arguments": "{}"}}
            out.append(self._chunk({"tool_calls": [call]}))
        return out

    def _block_start(self, data: Mapping[str, Any]) -> list[bytes]:
        index = data.get("index")
        block = _mapping(data.get("content_block"))
        if not isinstance(index, int):
            return []
        if block.get("type") == "text":
            self._kinds[index] = "text"
            text = block.get("text")
            return [self._chunk({"content": text})] if isinstance(text, str) and text else []
        if block.get("type") != "tool_use":
            self._kinds[index] = "other"
            return []
        self._kinds[index] = "tool"
        self._tool_index[index] = tool_index = self._tools
        self._tools += 1
        given = block.get("input")
        if not given:
            self._no_arguments.add(index)
        function = {"name": block.get("name"), "arguments": tool_arguments(given) if given else ""}
        call = {"index": tool_index, "id": block.get("id"), "type": "function", "function": function}
        return [self._chunk({"tool_calls": [call]})]

    def _block_delta(self, data: Mapping[str, Any]) -> list[bytes]:
        index = data.get("index")
        delta = _mapping(data.get("delta"))
        kind = self._kinds.get(index) if isinstance(index, int) else None
        if kind == "text" and delta.get("type") == "text_delta":
            text = delta.get("text")
            return [self._chunk({"content": text})] if isinstance(text, str) and text else []
        if kind == "tool" and delta.get("type") == "input_json_delta" and isinstance(index, int):
            fragment = delta.get("partial_json")
            if not isinstance(fragment, str) or not fragment:
                return []
            self._no_arguments.discard(index)
            call = {"index": self._tool_index[index], "function": {"arguments": fragment}}
            return [self._chunk({"tool_calls": [call]})]
        return []  # thinking, signature and citations deltas

    def _stop(self) -> list[bytes]:
        out = [] if self._finish_sent else [*self._empty_arguments(), self._chunk({}, "stop")]
        self._finish_sent = True
        if self._include_usage:
            usage = self.usage or anthropic_usage_to_openai({})
            payload = {
                "id": self._id,
                "object": "chat.completion.chunk",
                "created": self._created,
                "model": self._model,
                "choices": [],
                "usage": usage,
            }
            out.append(openai_frame(payload))
        out.append(DONE_FRAME)
        self._finished = True
        return out
