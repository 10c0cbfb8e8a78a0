"""What both directions of the Anthropic ⇄ OpenAI translation share: finish and stop reasons, usage, ids and
tool-call arguments. Pure code over parsed JSON."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

# Anthropic stop_reason -> OpenAI finish_reason; anything unknown becomes "stop" (new reasons may appear).
A_TO_O_FINISH: Mapping[str, str] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

# OpenAI finish_reason -> Anthropic stop_reason; anything unknown (or null) becomes "end_turn".
O_TO_A_STOP: Mapping[str, str] = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


def openai_finish_reason(stop_reason: object) -> str:
    return A_TO_O_FINISH.get(stop_reason, "stop") if isinstance(stop_reason, str) else "stop"


def anthropic_stop(finish_reason: object, matched_stop: object = None) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence). vLLM reports the matched stop string as the choice's `stop_reason`,
    which lets "stop" become Anthropic's more precise "stop_sequence"."""
    if finish_reason == "stop" and isinstance(matched_stop, str):
        return "stop_sequence", matched_stop
    reason = O_TO_A_STOP.get(finish_reason, "end_turn") if isinstance(finish_reason, str) else "end_turn"
    return reason, None


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def anthropic_usage_to_openai(usage: Mapping[str, Any]) -> dict[str, Any]:
    """Anthropic counts cached input (read from and written to the cache) apart from `input_tokens`;
    OpenAI's prompt_tokens includes both, detailed as cached_tokens and cache_write_tokens."""
    cache_read = _int(usage.get("cache_read_input_tokens"))
    cache_write = _int(usage.get("cache_creation_input_tokens"))
    prompt = _int(usage.get("input_tokens")) + cache_write + cache_read
    completion = _int(usage.get("output_tokens"))
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cache_read, "cache_write_tokens": cache_write},
    }


def openai_usage_to_anthropic(usage: Mapping[str, Any] | None) -> dict[str, Any]:
    usage = usage or {}
    details = usage.get("prompt_tokens_details")
    cached = _int(details.get("cached_tokens")) if isinstance(details, Mapping) else 0
    written = _int(details.get("cache_write_tokens")) if isinstance(details, Mapping) else 0
    return {
        "input_tokens": max(_int(usage.get("prompt_tokens")) - cached - written, 0),
        "output_tokens": _int(usage.get("completion_tokens")),
        "cache_creation_input_tokens": written,
        "cache_read_input_tokens": cached,
    }


def openai_id(anthropic_id: object) -> str:
    return (
        f"chatcmpl-{anthropic_id}" if isinstance(anthropic_id, str) and anthropic_id else "chatcmpl-unknown"
    )


def anthropic_id(openai_id: object) -> str:
    if not isinstance(openai_id, str) or not openai_id:
        return "msg_unknown"
    return "msg_" + openai_id.removeprefix("chatcmpl-")


def tool_arguments(tool_input: object) -> str:
    """A tool_use input object as OpenAI's compact JSON `arguments` string."""
    return orjson.dumps(tool_input if tool_input is not None else {}).decode()


def tool_input(arguments: object) -> dict[str, Any]:
    """OpenAI `arguments` → Anthropic tool_use input. Output cut short by max tokens is not valid JSON;
    like Anthropic's own truncated tool_use, it becomes an empty object rather than failing the reply."""
    if not isinstance(arguments, str | bytes) or not arguments:
        return {}
    try:
        parsed = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        return {}
    return parsed if isinstance(parsed, dict) else {}
