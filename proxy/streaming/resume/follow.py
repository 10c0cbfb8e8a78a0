"""The SSE reader of a resumable stream: writes a stream's events after an id to one client, then the live
tail, with heartbeats during silence and the slow-client limit, and ends as the stream ended.

Writes go through the relay's Sink (bounded transport queue, heartbeat framing by whether an `id:` went out).
A client that falls so far behind that its next event left the buffer gets one error event and the end.
"""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from proxy.errors import Protocol, ProxyError, stream_error_frame
from proxy.streaming.resume.hub import Hub, Source
from proxy.streaming.resume.ring import Batch, Dropped
from proxy.streaming.settings import StreamSettings
from proxy.streaming.sink import Sink, Watch

IDLE_READ = 30.0
"""How long one read waits for an event when heartbeats are off (the read just starts again)."""


class StreamGap(ProxyError):
    """A resume from an id whose next events are no longer buffered."""

    status = 409
    type = "invalid_request_error"
    code = "stream_events_dropped"
    outcome = "rejected"


class StreamNotFound(ProxyError):
    """No resumable stream by that id for this tenant (never existed, expired, or another tenant's)."""

    status = 404
    type = "invalid_request_error"
    code = "stream_not_found"
    outcome = "rejected"


async def follow(
    source: Source,
    sink: Sink,
    after: int,
    settings: StreamSettings,
    hub: Hub,
    *,
    protocol: Protocol,
    request_id: str,
    first: Batch | None = None,
) -> int:
    """Write events after id `after` until the stream ends; returns the last id written. A client that does
    not take a write within `slow_client` raises TimeoutError (treated as gone)."""
    ring = source.ring
    wait = settings.heartbeat if settings.heartbeat > 0 else IDLE_READ
    token = ring.attach(after) if ring is not None else 0
    try:
        batch = first
        while True:
            if batch is None:
                try:
                    batch = await source.read(after, wait)
                except Dropped as gap:
                    hub.failed(gap.reason)
                    error = StreamGap(f"{gap}: this reader fell behind the stream's buffer (resumable.buffer)")
                    await sink.write(stream_error_frame(error, protocol, request_id))
                    return after
            if batch.events:
                async with asyncio.timeout(settings.slow_client):
                    await sink.write(batch.events[0] if len(batch.events) == 1 else b"".join(batch.events))
                after = batch.first + len(batch.events) - 1
                if ring is not None:
                    ring.advance(token, after)
            elif batch.ended:
                return after
            elif settings.heartbeat > 0:
                async with asyncio.timeout(settings.slow_client):
                    await sink.write(sink.heartbeat())
            batch = None
    finally:
        if ring is not None:
            ring.leave(token, hub.clock())


def sse_headers(stream_id: str) -> dict[str, str]:
    return {
        "Content-Type": "text/event-stream; charset=utf-8",
        "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no",
        "x-signalbox-stream-id": stream_id,
    }


async def open_sink(request: web.Request, response: web.StreamResponse, settings: StreamSettings) -> Sink:
    return Sink(response, await response.prepare(request), request.transport, Watch(time.monotonic()),
                settings.write_buffer)
