"""Clients for the resumable-stream tests: read a proxy's SSE response block by block, stop after a number
of events (closing the connection mid-stream, as a dropped network would), and resume with Last-Event-ID."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

KEYS = {"Authorization": "Bearer sk-alpha", "x-api-key": "sk-alpha", "anthropic-version": "2023-06-01"}


@dataclass
class Read:
    status: int
    stream_id: str | None
    blocks: list[bytes] = field(default_factory=list)
    """Every SSE block with a field line, as sent (heartbeat comments glued to a block are stripped)."""
    body: bytes = b""

    @property
    def ids(self) -> list[int]:
        return [event_id(block) for block in self.blocks]


def event_id(block: bytes) -> int:
    lines = [line for line in block.split(b"\n") if line.startswith(b"id:")]
    assert lines, f"no id in {block!r}"
    return int(lines[-1][3:].strip())


def data_of(block: bytes) -> Any:
    line = next(line for line in block.split(b"\n") if line.startswith(b"data:"))
    value = line.removeprefix(b"data:").strip()
    return value.decode() if value == b"[DONE]" else orjson.loads(value)


def fields_only(block: bytes) -> bytes:
    return b"\n".join(line for line in block.split(b"\n") if not line.startswith(b":"))


async def read_stream(
    method: str, url: str, *, body: Any = None, headers: dict[str, str] | None = None,
    stop_after: int | None = None, limit_s: float = 20.0,
) -> Read:
    """Send a request and read its SSE blocks; with `stop_after`, close the connection after that many."""
    async with aiohttp.ClientSession() as http, asyncio.timeout(limit_s):
        data = orjson.dumps(body) if body is not None else None
        async with http.request(method, url, data=data, headers={**KEYS, **(headers or {})}) as resp:
            got = Read(resp.status, resp.headers.get("x-signalbox-stream-id"))
            if resp.status != 200 or not resp.content_type.startswith("text/event-stream"):
                got.body = await resp.read()
                return got
            pending = b""
            async for chunk in resp.content.iter_any():
                got.body += chunk
                pending += chunk
                *done, pending = pending.split(b"\n\n")
                for block in done:
                    block = fields_only(block)
                    if block:
                        got.blocks.append(block)
                if stop_after is not None and len(got.blocks) >= stop_after:
                    got.blocks = got.blocks[:stop_after]
                    resp.close()  # the connection goes, mid-stream
                    return got
            return got


async def resume(url: str, stream_id: str, last: int, *, method: str = "POST", body: Any = None,
                 headers: dict[str, str] | None = None) -> Read:
    return await read_stream(method, url, body=body, headers={
        "x-signalbox-stream-id": stream_id, "Last-Event-ID": str(last), **(headers or {}),
    })


def text_of(blocks: list[bytes]) -> str:
    """The answer's text, from OpenAI chunks or Anthropic text deltas."""
    out = []
    for block in blocks:
        data = data_of(block)
        if not isinstance(data, dict):
            continue
        for choice in data.get("choices") or []:
            out.append((choice.get("delta") or {}).get("content") or "")
        delta = data.get("delta")
        if data.get("type") == "content_block_delta" and isinstance(delta, dict):
            out.append(delta.get("text") or "")
    return "".join(out)
