"""Helpers for the stream and translation end-to-end tests: a scripted SSE upstream that records how far
each response got and when the proxy let go of it, raw stream readers that keep arrival times, a client
that stops reading after the headers, and bounded polling."""

from __future__ import annotations

import asyncio
import itertools
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from kit import Loopback, until

SSE = [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")]
JSON = [("Content-Type", "application/json")]


def sse(payload: Any, event: str | None = None) -> bytes:
    """One SSE block: an optional `event:` line and one `data:` line (JSON unless bytes are given)."""
    data = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    return (b"event: " + event.encode() + b"\n" if event else b"") + b"data: " + data + b"\n\n"


def chat_chunk(delta: dict[str, Any], finish: str | None = None, cid: str = "chatcmpl-1") -> bytes:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return sse(
        {"id": cid, "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [choice]}
    )


# --- a scripted upstream ------------------------------------------------------------------------------


@dataclass
class Script:
    """One response. `events` (any iterable, may be endless) makes it a stream written one event per write."""

    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=lambda: list(JSON))
    body: bytes = b"{}"
    events: Iterable[bytes] | None = None
    ttft: float = 0.0
    """Silence after the headers, before the first event."""
    gap: float = 0.0
    """Pause between events."""
    hold: float = 0.0
    """After the last event, keep the connection open this long (a stalled upstream) before ending it."""
    cut: bool = False
    """Close the TCP connection after the last event instead of ending the response cleanly."""


@dataclass
class Outcome:
    """What became of one response, as the upstream saw it."""

    started: float
    written: int = 0
    """Bytes whose write() returned (handed to the kernel or aiohttp's small buffer)."""
    events: int = 0
    gone_at: float | None = None
    """Monotonic time at which the proxy's side went away (a write failed or the handler was cancelled)."""
    completed: bool = False


class ScriptedUpstream:
    """A loopback server answering every request with the next `Script` (or `default`)."""

    def __init__(self) -> None:
        self.url = ""
        self.script: list[Script] = []
        self.default = Script()
        self.bodies: list[Any] = []
        self.paths: list[str] = []
        self.peers: list[tuple[str, int]] = []
        """The client address of each request: the same one twice means a reused connection."""
        self.outcomes: list[Outcome] = []

    def reply(self, *scripts: Script) -> None:
        self.script.extend(scripts)

    @property
    def last(self) -> Outcome:
        assert self.outcomes, "the scripted upstream received nothing"
        return self.outcomes[-1]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        self.bodies.append(orjson.loads(raw) if raw else None)
        self.paths.append(request.path)
        assert request.transport is not None
        self.peers.append(request.transport.get_extra_info("peername"))
        script = self.script.pop(0) if self.script else self.default
        outcome = Outcome(started=time.monotonic())
        self.outcomes.append(outcome)
        if script.events is None:
            return web.Response(status=script.status, body=script.body, headers=script.headers)
        response = web.StreamResponse(status=script.status, headers=script.headers)
        try:
            await response.prepare(request)
            if script.ttft:
                await asyncio.sleep(script.ttft)
            for i, event in enumerate(script.events):
                if i and script.gap:
                    await asyncio.sleep(script.gap)
                await response.write(event)
                outcome.written += len(event)
                outcome.events += 1
            if script.hold:
                await asyncio.sleep(script.hold)
            if script.cut:
                assert request.transport is not None
                request.transport.close()
                return response
            await response.write_eof()
            outcome.completed = True
        except (asyncio.CancelledError, ConnectionResetError):
            outcome.gone_at = time.monotonic()
            raise
        return response


class Servers(Loopback):
    """Loopback servers started by a test, cleaned up at teardown; the scripted upstream among them."""

    async def scripted(self) -> ScriptedUpstream:
        upstream = ScriptedUpstream()
        app = web.Application(client_max_size=64 * 1024**2)
        app.router.add_route("*", "/{tail:.*}", upstream.handle)
        upstream.url = await self.serve(app, handler_cancellation=True)
        return upstream


# --- clients ------------------------------------------------------------------------------------------


@dataclass
class RawStream:
    status: int
    headers: Any
    chunks: list[tuple[float, bytes]]
    """(seconds since the request was sent, bytes) per read."""

    @property
    def body(self) -> bytes:
        return b"".join(chunk for _, chunk in self.chunks)


async def read_raw(
    url: str, body: Any, headers: dict[str, str], *, limit_s: float = 10.0, stop_after: int | None = None
) -> RawStream:
    """POST and read the response as it arrives; with `stop_after`, close after that many bytes."""
    started = time.monotonic()
    chunks: list[tuple[float, bytes]] = []
    async with aiohttp.ClientSession() as http:
        async with asyncio.timeout(limit_s):
            async with http.post(url, data=orjson.dumps(body), headers=headers) as resp:
                got = 0
                async for chunk in resp.content.iter_any():
                    chunks.append((time.monotonic() - started, chunk))
                    got += len(chunk)
                    if stop_after is not None and got >= stop_after:
                        break
                return RawStream(resp.status, resp.headers, chunks)


class PausedClient:
    """A raw-socket client that sends one request, reads the response head and then stops reading.

    A small receive buffer keeps what the kernel absorbs on our side small, so the test measures the proxy.
    """

    def __init__(self) -> None:
        self.head = b""
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def open(self, url: str, path: str, body: Any, headers: dict[str, str]) -> bytes:
        host, port = url.removeprefix("http://").split(":")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
        reader, writer = await asyncio.open_connection(sock=sock, limit=2**16)
        self._reader, self._writer = reader, writer
        payload = orjson.dumps(body)
        lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", f"Content-Length: {len(payload)}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + payload)
        await writer.drain()
        async with asyncio.timeout(10):
            self.head = await reader.readuntil(b"\r\n\r\n")
        # From here on nobody reads `reader`: past its 64 KiB limit asyncio stops reading the socket.
        return self.head

    async def read_to_end(self, limit_s: float) -> int:
        """Resume reading until the server ends the connection (EOF or reset); returns the bytes read."""
        assert self._reader is not None
        got = 0
        async with asyncio.timeout(limit_s):
            try:
                while chunk := await self._reader.read(2**16):
                    got += len(chunk)
            except ConnectionResetError:
                pass
        return got

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except (ConnectionError, OSError):
                pass
            self._writer = None


async def wait_for(predicate: Callable[[], bool], limit_s: float, step: float = 0.01) -> None:
    """Poll until `predicate()` holds (kit.until); fails the test after `limit_s`."""
    await until(predicate, within=limit_s, step=step)


async def mock_stats(mock_url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.get(mock_url + "/mock/stats") as resp:
            stats: dict[str, Any] = await resp.json()
            return stats


async def poll_mock(
    mock_url: str, predicate: Callable[[dict[str, Any]], bool], limit_s: float
) -> dict[str, Any]:
    """Poll the mock's /mock/stats until `predicate(stats)` (kit.until); those stats."""
    seen: list[dict[str, Any]] = []

    async def matching() -> dict[str, Any] | None:
        seen.append(stats := await mock_stats(mock_url))
        return stats if predicate(stats) else None

    try:
        found: dict[str, Any] = await until(matching, within=limit_s)
    except AssertionError as failed:
        raise AssertionError(f"{failed}; last stats: {seen[-1] if seen else None}") from None
    return found


def endless(event: bytes) -> Iterable[bytes]:
    return itertools.repeat(event)


async def collect(aiter: AsyncIterator[Any]) -> list[Any]:
    return [item async for item in aiter]


Factory = Callable[..., Awaitable[Any]]
