"""An Anthropic upstream's whole answer (a Message) → the OpenAI chat.completion the client asked for.
Pure code over parsed JSON."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from proxy.providers.anthropic.fields import anthropic_usage_to_openai, openai_finish_reason, openai_id, tool_arguments


def anthropic_message_to_openai(body: Mapping[str, Any], *, model: str, created: int) -> dict[str, Any]:
    """An Anthropic Message → an OpenAI chat.completion. Text blocks are joined; thinking, redacted
    thinking and server-tool blocks have no OpenAI field and are dropped."""
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in body.get("content") or ():
        if not isinstance(block, Mapping):
            continue
        if block.get("type") == "text":
            texts.append(str(block.get("text", "")))
        elif block.get("type") == "tool_use":
            function = {"name": block.get("name"), "arguments": tool_arguments(block.get("input"))}
            calls.append({"id": block.get("id"), "type": "function", "function": function})
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts or not calls else None}
    message["refusal"] = None
    if calls:
        message["tool_calls"] = calls
    choice = {
        "index": 0,
        "message": message,
        "finish_reason": openai_finish_reason(body.get("stop_reason")),
        "logprobs": None,
    }
    usage = body.get("usage")
    return {
        "id": openai_id(body.get("id")),
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": anthropic_usage_to_openai(usage if isinstance(usage, Mapping) else {}),
    }
