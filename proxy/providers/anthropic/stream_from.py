"""Streaming translation between Anthropic Messages events and OpenAI chat.completion.chunk frames, both
ways, as small state machines fed one parsed event at a time. Pure code: they return SSE frame bytes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from proxy.providers.anthropic_response import (
    anthropic_id,
    anthropic_stop,
    anthropic_usage_to_openai,
    openai_finish_reason,
    openai_id,
    openai_usage_to_anthropic,
    tool_arguments,
)
from proxy.providers.errors_map import anthropic_stream_error_to_openai, openai_stream_error_to_anthropic

DONE_FRAME = b"data: [DONE]\n\n"


def openai_frame(payload: Mapping[str, Any]) -> bytes:
    """An OpenAI SSE frame: data only, no `event:` line (the OpenAI SDK would still parse it, but vLLM
    and OpenAI never send one)."""
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def anthropic_frame(event: str, payload: Mapping[str, Any]) -> bytes:
    """An Anthropic SSE frame: the SDK dispatches on the `event:` name, and the data repeats it as `type`."""
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


def error_frame(message: str, type: str, code: str | None = None) -> bytes:
    """The OpenAI in-stream error frame; the SDK raises APIError on it (and does not retry)."""
    return openai_frame({"error": {"message": message, "type": type, "param": None, "code": code}})


def anthropic_error_frame(message: str, type: str) -> bytes:
    """The Anthropic in-stream `error` event, e.g. type "overloaded_error" or "api_error"."""
    return anthropic_frame("error", {"type": "error", "error": {"type": type, "message": message}})


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


class OpenAIToAnthropicStream:
    """OpenAI chunks → Anthropic events: message_start, one content block per run of text or per tool call
    (a new block index whenever the kind changes), message_delta with stop reason and usage, message_stop.

    Feed every parsed chunk to `feed`, and call `done` on `[DONE]` (or at a clean end of stream).
    Only choice 0 is read; `reasoning_content` (vLLM, DeepSeek) has no Anthropic block here and is dropped."""

    __slots__ = (
        "_model",
        "_id",
        "_started",
        "_finished",
        "_open",
        "_index",
        "_tool_blocks",
        "_finish_reason",
        "_matched_stop",
        "_usage",
    )

    def __init__(self, *, model: str) -> None:
        self._model = model
        self._id = anthropic_id(None)
        self._started = False
        self._finished = False
        self._open: tuple[str, int] | None = None  # ("text", 0) or ("tool", OpenAI tool index)
        self._index = -1  # the Anthropic index of the newest block
        self._tool_blocks: dict[int, int] = {}  # OpenAI tool index -> Anthropic block index
        self._finish_reason: object = None
        self._matched_stop: object = None
        self._usage: dict[str, Any] | None = None

    @property
    def usage(self) -> dict[str, Any] | None:
        """The upstream's OpenAI-shaped usage, if it sent any, for token accounting."""
        return self._usage

    @property
    def finished(self) -> bool:
        return self._finished

    def _start(self, data: Mapping[str, Any]) -> list[bytes]:
        self._started = True
        self._id = anthropic_id(data.get("id"))
        message: dict[str, Any] = {
            "id": self._id,
            "type": "message",
            "role": "assistant",
            "model": self._model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            # OpenAI reports usage at the end; the totals go in message_delta, which clients let override.
            "usage": openai_usage_to_anthropic(self._usage),
        }
        return [anthropic_frame("message_start", {"type": "message_start", "message": message})]

    def _close_block(self) -> list[bytes]:
        if self._open is None:
            return []
        self._open = None
        return [anthropic_frame("content_block_stop", {"type": "content_block_stop", "index": self._index})]

    def _open_block(self, key: tuple[str, int], block: dict[str, Any]) -> list[bytes]:
        out = self._close_block()
        self._index += 1
        self._open = key
        payload = {"type": "content_block_start", "index": self._index, "content_block": block}
        out.append(anthropic_frame("content_block_start", payload))
        return out

    def _delta(self, index: int, delta: dict[str, Any]) -> bytes:
        return anthropic_frame(
            "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}
        )

    def _text(self, text: str) -> list[bytes]:
        out = [] if self._open == ("text", 0) else self._open_block(("text", 0), {"type": "text", "text": ""})
        out.append(self._delta(self._index, {"type": "text_delta", "text": text}))
        return out

    def _tool(self, call: Mapping[str, Any]) -> list[bytes]:
        index = call.get("index")
        if not isinstance(index, int):  # some servers omit it: a new id means a new call
            known = max(self._tool_blocks, default=-1)
            index = known + 1 if call.get("id") or known < 0 else known
        function = _mapping(call.get("function"))
        out: list[bytes] = []
        if index not in self._tool_blocks:
            block_id = call.get("id") or f"toolu_{self._id.removeprefix('msg_')}_{index}"
            block: dict[str, Any] = {
                "type": "tool_use",
                "id": block_id,
                "name": function.get("name") or "",
                "input": {},
            }
            out = self._open_block(("tool", index), block)
            self._tool_blocks[index] = self._index
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            # Arguments for an earlier call after a later one began (servers interleaving parallel calls)
            # go to that call's own index; the SDK accumulates by index.
            out.append(
                self._delta(self._tool_blocks[index], {"type": "input_json_delta", "partial_json": arguments})
            )
        return out

    def feed(self, data: Mapping[str, Any]) -> list[bytes]:
        if self._finished:
            return []
        error = openai_stream_error_to_anthropic(data)
        if error is not None:
            self._finished = True
            return [anthropic_frame("error", error)]
        usage = data.get("usage")
        if isinstance(usage, Mapping):
            self._usage = dict(usage)
        out = [] if self._started else self._start(data)
        for choice in data.get("choices") or ():
            if not isinstance(choice, Mapping) or choice.get("index", 0) != 0:
                continue  # the request never asks for n > 1
            delta = _mapping(choice.get("delta"))
            for text in (delta.get("content"), delta.get("refusal")):
                if isinstance(text, str) and text:
                    out.extend(self._text(text))
            for call in delta.get("tool_calls") or ():
                if isinstance(call, Mapping):
                    out.extend(self._tool(call))
            if choice.get("finish_reason") is not None:
                self._finish_reason = choice["finish_reason"]
                self._matched_stop = choice.get("stop_reason")  # vLLM: the stop string that matched
        return out

    def done(self) -> list[bytes]:
        if self._finished:
            return []
        out = [] if self._started else self._start({})
        out.extend(self._close_block())
        stop_reason, stop_sequence = anthropic_stop(self._finish_reason, self._matched_stop)
        payload = {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
            "usage": openai_usage_to_anthropic(self._usage),
        }
        out.append(anthropic_frame("message_delta", payload))
        out.append(anthropic_frame("message_stop", {"type": "message_stop"}))
        self._finished = True
        return out
