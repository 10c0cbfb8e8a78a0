"""An OpenAI-compatible upstream's stream (chat.completion.chunk frames) → the Anthropic Messages events a
client speaking Anthropic reads, as a small state machine fed one parsed chunk at a time. Pure code: it
returns SSE frame bytes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from proxy.providers.anthropic.fields import anthropic_id, anthropic_stop, openai_usage_to_anthropic
from proxy.providers.errors_map import openai_stream_error_to_anthropic


def anthropic_frame(event: str, payload: Mapping[str, Any]) -> bytes:
    """An Anthropic SSE frame: the SDK dispatches on the `event:` name, and the data repeats it as `type`."""
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


def anthropic_error_frame(message: str, type: str) -> bytes:
    """The Anthropic in-stream `error` event, e.g. type "overloaded_error" or "api_error"."""
    return anthropic_frame("error", {"type": "error", "error": {"type": type, "message": message}})


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


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
        "_refused",
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
        self._refused = False  # a `refusal` delta came: the stop reason is Anthropic's "refusal"

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
            if isinstance(delta.get("refusal"), str) and delta["refusal"]:
                self._refused = True
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
        if self._refused and stop_reason == "end_turn":
            stop_reason = "refusal"
        payload = {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
            "usage": openai_usage_to_anthropic(self._usage),
        }
        out.append(anthropic_frame("message_delta", payload))
        out.append(anthropic_frame("message_stop", {"type": "message_stop"}))
        self._finished = True
        return out
