"""The unified stream's wire shapes, pure: one JSON object per event, framed as an SSE block (`id:` the
event's `seq`, `event:` its type) or as one WebSocket text message (the same object plus the request's
client-chosen `id`). docs/apps/unified-stream.md is the contract; change both together."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import orjson

from proxy.errors import ProxyError

Framing = Literal["sse", "ws"]

TEXT_DELTA = "text_delta"
TOOL_CALL = "tool_call"
USAGE = "usage"
STREAM_COMPLETE = "stream_complete"
ERROR = "error"
HEARTBEAT = "heartbeat"
QUEUED = "queued"
EVENT_TYPES = (TEXT_DELTA, TOOL_CALL, USAGE, STREAM_COMPLETE, ERROR, HEARTBEAT, QUEUED)

CANCELLED = "cancelled"
"""`stream_complete.finish_reason` of a request the client cancelled (or whose socket closed)."""
FAILED = "error"
"""`stream_complete.finish_reason` after an `error` event."""


class Encoder:
    """Numbers one request's events (`seq`, from 0) and frames them for its transport.

    SSE: `id: <seq>\\nevent: <type>\\ndata: <json>\\n\\n`. WebSocket: `<json>\\n` with the request's `id`
    in the object; the socket's writer sends each line as one text message (orjson never writes a raw
    newline inside a value, so a line is exactly one event)."""

    __slots__ = ("framing", "request", "seq", "prefix")

    def __init__(self, framing: Framing, request: str = "") -> None:
        self.framing = framing
        self.request = request
        self.seq = 0
        self.prefix = orjson.dumps(request) if framing == "ws" else b""
        """The request's id as JSON (WebSocket framing)."""

    def encode(self, kind: str, payload: Mapping[str, Any] | None = None) -> bytes:
        seq = self.seq
        self.seq = seq + 1
        body = orjson.dumps(payload) if payload else b"{}"
        head = b'{"type":"' + kind.encode() + b'","seq":' + str(seq).encode()
        if self.framing == "ws":
            head += b',"id":' + self.prefix
        obj = head + (b"," + body[1:] if len(body) > 2 else b"}")
        if self.framing == "ws":
            return obj + b"\n"
        return b"id: " + str(seq).encode() + b"\nevent: " + kind.encode() + b"\ndata: " + obj + b"\n\n"


def error_payload(error: ProxyError) -> dict[str, Any]:
    """An `error` event for a proxy-made error: the status the HTTP answer would have had, and when to retry."""
    return {
        "error": {
            "status": error.status,
            "type": error.type,
            "code": error.code,
            "message": error.message,
            "param": error.param,
            "retry_after": error.retry_after,
        }
    }


def upstream_error_payload(status: int, body: object) -> dict[str, Any]:
    """An `error` event for an upstream's error (OpenAI or Anthropic shape, whole or in-stream)."""
    inner = body.get("error") if isinstance(body, Mapping) else None
    detail: Mapping[str, Any] = inner if isinstance(inner, Mapping) else {}
    message = detail.get("message")
    if not isinstance(message, str):
        message = f"the upstream answered {status}" if status else "the upstream reported an error mid-stream"
    code = detail.get("code")
    return {
        "error": {
            "status": status or 502,
            "type": str(detail.get("type") or "upstream_error"),
            "code": code if isinstance(code, str) else None,
            "message": message,
            "param": None,
            "retry_after": None,
        }
    }


def queued_payload(status: str) -> dict[str, Any]:
    """A `queued` event from the flow's waiting status (proxy/flow/enter.py `_status`, upstream.py
    `_waiting_for`): `queued position=3 eta=2s`, or a sentence naming the limit waited for."""
    position: int | None = None
    eta: int | None = None
    for word in status.split():
        key, _, value = word.partition("=")
        if key == "position" and value.isdigit():
            position = int(value)
        elif key == "eta" and value.endswith("s") and value[:-1].isdigit():
            eta = int(value[:-1])
    waiting_for = "queue" if status.startswith("queued") else "upstream"
    return {"position": position, "eta_s": eta, "waiting_for": waiting_for, "detail": status}
