"""Upstream stream events to unified events, pure: a `StreamTranslator` (proxy/providers/exchange.py) that
the relay's framing feeds like any other, so the SSE parsing, usage accounting and end detection stay the
relay's own.

The upstream's format decides the mapping, not the client's: OpenAI chat chunks map directly; Anthropic
Messages events go through the translation layer's own state machine (AnthropicToOpenAIStream: tool
numbering, empty arguments, finish reasons and usage handled once, there) and then the same chunk mapping;
Responses API events map on their own (the translation layer has no Responses stream model).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import orjson

from proxy.providers.anthropic.stream_from import DONE_FRAME, AnthropicToOpenAIStream
from proxy.providers.exchange import Exchange
from proxy.streaming.unified.events import (
    ERROR,
    FAILED,
    STREAM_COMPLETE,
    TEXT_DELTA,
    TOOL_CALL,
    USAGE,
    Encoder,
    upstream_error_payload,
)

Source = Literal["chat", "anthropic", "responses"]


def source_of(exchange: Exchange, path: str) -> Source:
    """Which event format the upstream streams for this exchange."""
    if exchange.kind == "openai_to_anthropic":
        return "anthropic"
    if exchange.kind == "anthropic_to_openai":
        return "chat"
    if exchange.front == "anthropic" or exchange.provider == "anthropic":
        return "anthropic"
    return "responses" if path.startswith("/v1/responses") else "chat"


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def unified_usage(usage: Mapping[str, Any]) -> dict[str, Any]:
    """OpenAI chat (prompt/completion) or Responses (input/output) usage as the `usage` event's fields."""
    given = usage.get("input_tokens", usage.get("prompt_tokens"))
    made = usage.get("output_tokens", usage.get("completion_tokens"))
    inp = given if isinstance(given, int) else 0
    out = made if isinstance(made, int) else 0
    total = usage.get("total_tokens")
    return {"input_tokens": inp, "output_tokens": out, "total_tokens": total if isinstance(total, int) else inp + out}


class UnifiedTranslator:
    """One request's upstream events → unified event frames (see `Encoder` for the framing)."""

    __slots__ = ("enc", "source", "_anthropic", "_tools", "_finish", "_usage", "_finished", "_by_output")

    def __init__(self, encoder: Encoder, source: Source, model: str = "", created: int = 0) -> None:
        self.enc = encoder
        self.source = source
        self._anthropic = (
            AnthropicToOpenAIStream(model=model, created=created, include_usage=True) if source == "anthropic" else None
        )
        self._tools: dict[int, tuple[str, str]] = {}  # tool index -> (call id, name)
        self._by_output: dict[int, int] = {}  # Responses output_index -> tool index
        self._finish: str | None = None
        self._usage: dict[str, Any] | None = None
        self._finished = False

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def usage(self) -> dict[str, Any] | None:
        return self._usage

    def feed(self, event: str | None, data: Mapping[str, Any]) -> list[bytes]:
        if self._finished:
            return []
        if self._anthropic is not None:
            out: list[bytes] = []
            for frame in self._anthropic.feed(event, data):
                out.extend(self.done() if frame == DONE_FRAME else self._chunk(orjson.loads(frame[6:-2])))
            return out
        if self.source == "responses":
            return self._response_event(event or data.get("type"), data)
        return self._chunk(data)

    def done(self) -> list[bytes]:
        """The upstream's end marker: usage (if any came), then stream_complete."""
        if self._finished:
            return []
        self._finished = True
        out = [self.enc.encode(USAGE, unified_usage(self._usage))] if self._usage else []
        out.append(self.enc.encode(STREAM_COMPLETE, {"finish_reason": self._finish or "stop"}))
        return out

    def eof(self) -> list[bytes]:
        # An OpenAI-compatible server without [DONE] ends right after its finish chunk; anything else is cut.
        return self.done() if self._finish is not None and self.source == "chat" else []

    def _fail(self, payload: Mapping[str, Any]) -> list[bytes]:
        self._finished = True
        return [self.enc.encode(ERROR, payload), self.enc.encode(STREAM_COMPLETE, {"finish_reason": FAILED})]

    def _chunk(self, data: Mapping[str, Any]) -> list[bytes]:
        if isinstance(data.get("error"), Mapping):
            return self._fail(upstream_error_payload(0, data))
        usage = data.get("usage")
        if isinstance(usage, Mapping):
            self._usage = dict(usage)
        out: list[bytes] = []
        for choice in data.get("choices") or ():
            if not isinstance(choice, Mapping) or choice.get("index", 0) != 0:
                continue
            delta = _mapping(choice.get("delta"))
            for text in (delta.get("content"), delta.get("refusal")):
                if isinstance(text, str) and text:
                    out.append(self.enc.encode(TEXT_DELTA, {"text": text}))
            for call in delta.get("tool_calls") or ():
                if isinstance(call, Mapping):
                    out.append(self._tool(call))
            reason = choice.get("finish_reason")
            if isinstance(reason, str):
                self._finish = reason
        return out

    def _tool(self, call: Mapping[str, Any]) -> bytes:
        index = call.get("index")
        if not isinstance(index, int):  # some servers omit it: a new id means a new call
            index = len(self._tools) if call.get("id") or not self._tools else len(self._tools) - 1
        function = _mapping(call.get("function"))
        known = self._tools.get(index)
        call_id = call.get("id") if isinstance(call.get("id"), str) else None
        name = function.get("name") if isinstance(function.get("name"), str) else None
        if known is None:
            known = self._tools[index] = (call_id or f"call_{index}", name or "")
        arguments = function.get("arguments")
        payload = {
            "index": index,
            "call_id": known[0],
            "name": known[1],
            "arguments_delta": arguments if isinstance(arguments, str) else "",
        }
        return self.enc.encode(TOOL_CALL, payload)

    def _response_event(self, kind: object, data: Mapping[str, Any]) -> list[bytes]:
        if kind == "response.output_text.delta":
            text = data.get("delta")
            return [self.enc.encode(TEXT_DELTA, {"text": text})] if isinstance(text, str) and text else []
        if kind == "response.output_item.added":
            item = _mapping(data.get("item"))
            output = data.get("output_index")
            if item.get("type") != "function_call" or not isinstance(output, int):
                return []
            index = self._by_output[output] = len(self._tools)
            fragment = item.get("arguments")
            call = {"index": index, "id": item.get("call_id"), "function": {"name": item.get("name"),
                                                                             "arguments": fragment or ""}}
            return [self._tool(call)]
        if kind == "response.function_call_arguments.delta":
            output = data.get("output_index")
            known = self._by_output.get(output) if isinstance(output, int) else None
            fragment = data.get("delta")
            if known is None or not isinstance(fragment, str) or not fragment:
                return []
            return [self._tool({"index": known, "function": {"arguments": fragment}})]
        if kind in ("response.completed", "response.incomplete"):
            response = _mapping(data.get("response"))
            usage = response.get("usage")
            if isinstance(usage, Mapping):
                self._usage = dict(usage)
            self._finish = "stop" if kind == "response.completed" else _incomplete(response)
            if kind == "response.completed" and self._tools:
                self._finish = "tool_calls"
            return self.done()
        if kind in ("response.failed", "error"):
            inner = _mapping(data.get("response")).get("error") if kind == "response.failed" else data
            return self._fail(upstream_error_payload(0, {"error": inner}))
        return []


def _incomplete(response: Mapping[str, Any]) -> str:
    reason = _mapping(response.get("incomplete_details")).get("reason")
    return "length" if reason == "max_output_tokens" else "content_filter" if reason == "content_filter" else "stop"
