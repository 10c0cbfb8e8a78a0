"""What a trace says about a generative-AI call, in the OpenTelemetry GenAI semantic conventions' names
(pure): the operation and provider, and from the answer its model, token usage and finish reasons. Never
content: only those fields are read from an answer or a stream event.

OpenAI chat/completions and Responses answers and chunks, and Anthropic messages and their stream events
(message_start, message_delta) are understood; anything else leaves the facts as they were.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

OPERATION_NAME = "gen_ai.operation.name"
PROVIDER_NAME = "gen_ai.provider.name"
REQUEST_MODEL = "gen_ai.request.model"
REQUEST_STREAM = "gen_ai.request.stream"
RESPONSE_MODEL = "gen_ai.response.model"
RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"

_OPERATIONS = {
    "/v1/chat/completions": "chat",
    "/v1/messages": "chat",
    "/v1/responses": "chat",
    "/v1/completions": "text_completion",
    "/v1/embeddings": "embeddings",
}
_PROVIDERS = {"openai": "openai", "anthropic": "anthropic", "mock": "signalbox.mock"}

# A stream event is parsed only when its bytes may hold a fact still useful: the model (until one is
# known), a finish reason, or usage. Most chunks of a long answer hold none.
_FACT_MARKERS = (b'reason":"', b'reason": "', b'"usage":{', b'"usage": {', b'"status":"', b'"status": "')


def operation(path: str) -> str | None:
    """gen_ai.operation.name for a front path (None: not a generative-AI operation the conventions name)."""
    return _OPERATIONS.get(path)


def provider(kind: str) -> str | None:
    """gen_ai.provider.name for an upstream's `provider` (the built-in mock is not a vendor); None for an
    upstream that is not a model provider."""
    return _PROVIDERS.get(kind)


@dataclass(slots=True)
class Facts:
    """What the answer said about itself, gathered from a whole body or from stream events."""

    model: str | None = None
    finish_reasons: list[str] = field(default_factory=list)
    input_tokens: int | None = None
    output_tokens: int | None = None

    def attributes(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.model:
            out[RESPONSE_MODEL] = self.model
        if self.finish_reasons:
            out[RESPONSE_FINISH_REASONS] = list(self.finish_reasons)
        if self.input_tokens is not None:
            out[USAGE_INPUT_TOKENS] = self.input_tokens
        if self.output_tokens is not None:
            out[USAGE_OUTPUT_TOKENS] = self.output_tokens
        return out


def note_answer(facts: Facts, body: bytes) -> None:
    """A whole JSON answer's model, usage and finish reasons."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return
    if isinstance(parsed, dict):
        _note(facts, parsed)


def note_event(facts: Facts, name: str | None, data: bytes) -> None:
    """One stream event's facts, parsed only when its bytes may hold one."""
    if facts.model is not None and not _may_hold_a_fact(data):
        return
    if not data.startswith(b"{"):
        return  # [DONE], or not JSON
    try:
        parsed = orjson.loads(data)
    except orjson.JSONDecodeError:
        return
    if isinstance(parsed, dict):
        _note(facts, parsed)


def _may_hold_a_fact(data: bytes) -> bool:
    # Plain substring tests: several times cheaper than one regex alternation over the event.
    for marker in _FACT_MARKERS:
        if marker in data:
            return True
    return False


def _note(facts: Facts, data: Mapping[str, Any]) -> None:
    # Anthropic's message_start carries the message; the Responses API's events carry the response.
    inner = data.get("message") or data.get("response")
    holder = inner if isinstance(inner, dict) else data
    model = holder.get("model")
    if isinstance(model, str) and model:
        facts.model = model
    _note_reasons(facts, holder, data)
    usage = holder.get("usage")
    if not isinstance(usage, dict):
        usage = data.get("usage")
    if isinstance(usage, dict):
        _note_usage(facts, usage)


def _note_reasons(facts: Facts, holder: Mapping[str, Any], data: Mapping[str, Any]) -> None:
    choices = holder.get("choices")
    if isinstance(choices, list):
        for choice in choices:
            reason = choice.get("finish_reason") if isinstance(choice, dict) else None
            if isinstance(reason, str) and reason:
                facts.finish_reasons.append(reason)
    delta = data.get("delta")
    for source in (holder, delta if isinstance(delta, dict) else None):
        reason = source.get("stop_reason") if source is not None else None
        if isinstance(reason, str) and reason:
            facts.finish_reasons.append(reason)
    status = holder.get("status") if holder is not data else None  # a Responses API response's end state
    if isinstance(status, str) and status in ("completed", "incomplete", "failed"):
        facts.finish_reasons.append(status)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _note_usage(facts: Facts, usage: Mapping[str, Any]) -> None:
    """OpenAI names them prompt/completion tokens (input/output in the Responses API); Anthropic reports
    input tokens in message_start (cache reads and writes apart) and the output total in message_delta."""
    prompt = _int(usage.get("prompt_tokens"))
    if prompt is None:
        prompt = _int(usage.get("input_tokens"))
        if prompt is not None:
            prompt += sum(_int(usage.get(k)) or 0 for k in ("cache_read_input_tokens", "cache_creation_input_tokens"))
    if prompt is not None:
        facts.input_tokens = prompt
    completion = _int(usage.get("completion_tokens"))
    if completion is None:
        completion = _int(usage.get("output_tokens"))
    if completion is not None:
        facts.output_tokens = completion
