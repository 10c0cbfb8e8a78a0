"""Writes a stream to its client: whole events, in bounded pieces, over a small transport buffer, with
heartbeats framed for whoever reads them.

Why not `StreamResponse.write` alone: it hands the whole chunk to the transport and waits for the client
only once 64 KiB have been written since its last wait, so one large write to a client that stopped
reading sits in the transport whole (the 0.5 MiB reads of a fast upstream did, 1,000 times over). Here a
write goes out in pieces of at most PIECE bytes and, after any piece that leaves more than the stream's
`write_buffer` (StreamSettings) queued, waits until the client has taken them: per stalled client the
transport holds at most write_buffer + PIECE bytes. While it waits, reading from the upstream's socket is
paused too: the relay reads the upstream only between writes, but aiohttp's reader resumes the socket as
soon as it is drained below its low-water mark, and the next socket read (up to 256 KiB on uvloop) would
land in it whole. The kernel's buffers then fill and the upstream's writes block (TCP backpressure).

What the transport queues is the relayed chunk itself, not a copy: see `_no_joined_copy` below.
"""

from __future__ import annotations

import asyncio
import sys
import time

from aiohttp import http_writer, web
from aiohttp.abc import AbstractStreamWriter

from proxy.errors import ProxyError
from proxy.streaming.sse import encode_comment, has_id_line

PIECE = 16 * 1024
"""Largest single write to the transport."""
WRITE_HIGH = 8 * 1024
"""Default bytes queued in the transport above which a write waits for the client (StreamSettings.write_buffer;
aiohttp's default: 64 KiB)."""


def _no_joined_copy() -> None:
    """Let aiohttp hand a chunked-encoding frame to the transport as (size line, data, CRLF).

    aiohttp joins the three into one new bytes object on every Python before 3.12.9, to avoid a bug of the
    zero-copy `writelines` CPython 3.12.0-3.12.8 and 3.13.0-3.13.1 gave asyncio's selector transport. On
    3.11 that bug does not exist (asyncio's `writelines` joins once itself; uvloop's is vectored and keeps
    a reference to the data), so the join only made a second copy of every event: while a client does not
    read, the transport held the joined copy and the relay the original. Left as aiohttp sets it on the
    affected versions."""
    if sys.version_info < (3, 12):
        http_writer.SKIP_WRITELINES = False


_no_joined_copy()

_STANDALONE = encode_comment("ping", end_block=True)
_GLUED = encode_comment("ping")


class Watch:
    """Shared state between a stream's writes and its watchdog."""

    __slots__ = ("last_write", "last_event", "first_event", "writing", "write_started", "failure")

    def __init__(self, now: float) -> None:
        self.last_write = now
        self.last_event = now
        self.first_event = False
        self.writing = 0  # writes in progress: the relay's and a heartbeat's may overlap
        self.write_started = now
        self.failure: ProxyError | None = None


class Sink:
    """One client's end of a stream. `id_sent`: an `id:` line has gone to this client, which changes how a
    heartbeat must be framed (see `encode_comment`)."""

    __slots__ = ("response", "transport", "writer", "watch", "id_sent", "source", "high")

    def __init__(
        self,
        response: web.StreamResponse,
        writer: AbstractStreamWriter | None,
        transport: asyncio.Transport | None,
        watch: Watch,
        high: int = WRITE_HIGH,
    ) -> None:
        self.response = response
        self.writer = writer
        self.transport = transport
        self.watch = watch
        self.id_sent = False
        self.high = high
        """Bytes queued for this client above which the relay waits (and stops reading the upstream)."""
        self.source: asyncio.Transport | None = None
        """The upstream connection's transport, paused while this client's queue is full."""
        if transport is not None and not transport.is_closing():
            # drain() returns once the queue is down to a quarter: the client took most of it.
            transport.set_write_buffer_limits(high=high, low=high // 4)

    @classmethod
    async def open(
        cls, request: web.Request, response: web.StreamResponse, watch: Watch, high: int = WRITE_HIGH
    ) -> Sink:
        """For a response already prepared (prepare() then only returns its writer)."""
        return cls(response, await response.prepare(request), request.transport, watch, high)

    def heartbeat(self) -> bytes:
        return _GLUED if self.id_sent else _STANDALONE

    async def room(self) -> None:
        """Wait while the transport holds more than `high` bytes for this client."""
        transport, writer = self.transport, self.writer
        if transport is None or writer is None or transport.get_write_buffer_size() <= self.high:
            return
        source = self.source
        # Only a socket the reader left running is ours to pause and resume (the reader pauses it itself
        # past its high-water mark, and nothing reaches the reader while we hold it).
        if source is None or source.is_closing() or not source.is_reading():
            await writer.drain()
            return
        source.pause_reading()
        try:
            await writer.drain()
        finally:
            if not source.is_closing():
                source.resume_reading()

    async def write(self, data: bytes) -> None:
        """Whole events (or a heartbeat at a boundary); returns once the client has room for more."""
        watch = self.watch
        if not self.id_sent and b"id:" in data:
            self.id_sent = has_id_line(data)
        if not watch.writing:
            watch.write_started = time.monotonic()  # the oldest write still blocked is what a slow client is judged by
        watch.writing += 1
        try:
            if len(data) <= PIECE:  # the per-event path: no coroutine for room() unless the queue is full
                await self.response.write(data)
                transport = self.transport
                if transport is not None and transport.get_write_buffer_size() > self.high:
                    await self.room()
                return
            for start in range(0, len(data), PIECE):
                await self.response.write(data[start : start + PIECE])
                await self.room()
                watch.write_started = time.monotonic()  # the client took a piece: it is reading
        finally:
            watch.writing -= 1
            watch.last_write = time.monotonic()

    async def beat(self) -> None:
        """A heartbeat, unless a write is under way: it may be between two pieces of one event."""
        if not self.watch.writing:
            await self.write(self.heartbeat())
