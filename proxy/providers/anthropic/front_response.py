"""An OpenAI-compatible upstream's whole answer (a chat.completion) → the Anthropic Message a client
speaking Anthropic asked for. Pure code over parsed JSON."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from proxy.providers.anthropic.fields import anthropic_id, anthropic_stop, openai_usage_to_anthropic, tool_input


def openai_chat_to_anthropic_message(body: Mapping[str, Any], *, model: str) -> dict[str, Any]:
    """An OpenAI chat.completion → an Anthropic Message; only the first choice (we never ask for n>1)."""
    choices = body.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], Mapping) else {}
    message = choice.get("message")
    message = message if isinstance(message, Mapping) else {}
    content: list[dict[str, Any]] = []
    for text in (message.get("content"), message.get("refusal")):
        if isinstance(text, str) and text:
            content.append({"type": "text", "text": text})
    for call in message.get("tool_calls") or ():
        function = call.get("function") if isinstance(call, Mapping) else None
        if isinstance(call, Mapping) and isinstance(function, Mapping):
            block = {
                "id": call.get("id"),
                "name": function.get("name"),
                "input": tool_input(function.get("arguments")),
            }
            content.append({"type": "tool_use", **block})
    stop_reason, stop_sequence = anthropic_stop(choice.get("finish_reason"), choice.get("stop_reason"))
    refusal = message.get("refusal")
    if stop_reason == "end_turn" and isinstance(refusal, str) and refusal:
        stop_reason = "refusal"  # OpenAI's strict-mode refusal ends with "stop"; Anthropic says "refusal"
    usage = body.get("usage")
    return {
        "id": anthropic_id(body.get("id")),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": openai_usage_to_anthropic(usage if isinstance(usage, Mapping) else None),
    }
