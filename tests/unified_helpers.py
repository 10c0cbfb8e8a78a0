"""Clients of the unified stream as an app would write them: an aiohttp WebSocket that multiplexes requests
by id, and a hand-written SSE reader that splits the body on blank lines."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

STREAM = "/signalbox/v1/stream"


def chat(model: str = "gpt-4o", prompt: str = "signal boxes on old railways", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": prompt}], **extra}


@dataclass
class Received:
    """Everything a socket got, by request id, in order."""

    events: dict[str | None, list[dict[str, Any]]] = field(default_factory=dict)

    def of(self, rid: str | None) -> list[dict[str, Any]]:
        return self.events.get(rid, [])

    def text(self, rid: str | None) -> str:
        return "".join(e["text"] for e in self.of(rid) if e["type"] == "text_delta")

    def complete(self, rid: str | None) -> dict[str, Any] | None:
        done = [e for e in self.of(rid) if e["type"] == "stream_complete"]
        return done[-1] if done else None


async def read_until(ws: aiohttp.ClientWebSocketResponse, got: Received, done: Any, within: float = 10.0) -> None:
    """Read messages into `got` until `done(got)` holds (a failure deadline, not a measurement)."""
    async with asyncio.timeout(within):
        while not done(got):
            message = await ws.receive()
            assert message.type == aiohttp.WSMsgType.TEXT, message
            event = orjson.loads(message.data)
            got.events.setdefault(event.get("id"), []).append(event)


def request(rid: str, body: dict[str, Any], path: str = "/v1/chat/completions", **headers: str) -> dict[str, Any]:
    message: dict[str, Any] = {"type": "request", "id": rid, "path": path, "body": body}
    if headers:
        message["headers"] = {"x-mock-" + k.replace("_", "-"): v for k, v in headers.items()}
    return message


def split_sse(raw: bytes) -> list[dict[str, Any]]:
    """A naive SSE parser: blocks split on blank lines, `id:`, `event:` and `data:` lines read by prefix."""
    events = []
    for block in raw.decode().split("\n\n"):
        if not block.strip():
            continue
        fields = dict(line.split(": ", 1) for line in block.split("\n") if not line.startswith(":"))
        data = orjson.loads(fields["data"])
        assert data["type"] == fields["event"] and str(data["seq"]) == fields["id"], block
        events.append(data)
    return events


async def post_sse(url: str, message: dict[str, Any], headers: dict[str, str]) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as http, http.post(url + STREAM, json=message, headers=headers) as resp:
        return resp.status, await resp.read()


def without_ids(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in e.items() if k != "id"} for e in events]
