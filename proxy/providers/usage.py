"""Where an answer says what it cost: the `usage` object of a whole JSON answer or of one stream event, in
every protocol the proxy relays (pure). Token limits settle with it; the batcher apportions it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson


def usage_in(data: Mapping[str, Any]) -> dict[str, Any] | None:
    """The `usage` a parsed answer or event carries: at the top (OpenAI, an Anthropic message,
    message_delta), in Anthropic's message_start `message`, or in the Responses API's `response`."""
    usage = data.get("usage")
    if not isinstance(usage, dict):
        holder = data.get("message") or data.get("response")
        usage = holder.get("usage") if isinstance(holder, dict) else None
    return usage if isinstance(usage, dict) else None


def usage_of(body: bytes) -> dict[str, Any] | None:
    """The `usage` of a whole JSON answer, if it has one."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return usage_in(parsed) if isinstance(parsed, dict) else None
