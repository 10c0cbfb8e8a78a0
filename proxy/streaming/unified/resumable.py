"""Resumable unified streams: a unified request on a route with `stream.resumable` keeps its events in the
resumable-streams core's ring (proxy/streaming/resume/), so a client that lost its connection reads the rest
by the last `seq` it got, over SSE or a WebSocket (docs/apps/unified-stream.md#resuming-a-dropped-stream).

The ring holds the events as unified SSE blocks (`id:` is the `seq`), numbered by the generation's own
encoder from the request's next `seq` (any `queued` events before it went out directly). Heartbeats are
events with a `seq` too, so the generation writes them into the ring (every reader sees the same numbers)
instead of each reader writing its own. A WebSocket reader turns each block into its message (the request's
`id` added, and on the request's own socket `stream_id` in the first event it forwards).

Detaching (the client left: the generation goes on, holding its slot and reservation, stopped by the ttl)
is the core's (`entry.hold_detached`); a `cancel` stops the generation, whose last event is then `stream_complete`
with `cancelled`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import replace

from aiohttp import web

from proxy.call import Call
from proxy.errors import ProxyError
from proxy.streaming.pump import pump
from proxy.streaming.reclaim import RECLAIMER
from proxy.streaming.relay import Answer

# The core's detach (hold the request's slot, lease and reservation until the generation ends; the ttl and the
# detached cap) is exactly what a unified request needs.
from proxy.streaming.resume.entry import client_left, hold_detached
from proxy.streaming.resume.follow import StreamGap
from proxy.streaming.resume.hub import HUB, Hub, Source
from proxy.streaming.resume.produce import Stopped
from proxy.streaming.resume.ring import Dropped, Meta, Ring
from proxy.streaming.settings import StreamSettings
from proxy.streaming.sink import Sink, Watch
from proxy.streaming.sse import SSEDecoder
from proxy.streaming.unified.channel import Channel
from proxy.streaming.unified.events import (
    CANCELLED,
    ERROR,
    FAILED,
    HEARTBEAT,
    STREAM_COMPLETE,
    Encoder,
    error_payload,
)
from proxy.streaming.unified.translate import UnifiedTranslator, source_of
from proxy.streaming.watchdog import Watchdog

IDLE_READ = 30.0
"""How long one read of the ring waits before it starts again (heartbeats are events in the ring)."""
CANCEL_REASON = "cancelled"


class Cancelled(Stopped):
    """A generation its client cancelled (a `cancel` message, or DELETE on the stream): it ends with
    `stream_complete` `cancelled`, no `error`."""

    code = "cancelled"


class RingSink(Sink):
    """The generation's sink: each unified SSE block appended to the ring (waiting while an attached reader
    still needs the oldest event), heartbeats numbered like every event."""

    __slots__ = ("encoder", "hub", "ring")

    def __init__(self, hub: Hub, ring: Ring, watch: Watch, encoder: Encoder) -> None:
        super().__init__(web.StreamResponse(), None, None, watch)
        self.hub = hub
        self.ring = ring
        self.encoder = encoder

    def heartbeat(self) -> bytes:
        return self.encoder.encode(HEARTBEAT)

    async def write(self, data: bytes) -> None:
        start = 0
        while start < len(data):
            end = data.index(b"\n\n", start) + 2  # the encoder's blocks: LF-framed, no blank line inside
            block = data[start:end]
            start = end
            if self.ring.blocked(len(block)):
                await self.ring.room(len(block))
            self.hub.append(self.ring, block)
        self.watch.last_write = time.monotonic()


async def relay(
    channel: Channel,
    request: web.Request,
    call: Call,
    answer: Answer,
    settings: StreamSettings,
    open_streams: set[Callable[[ProxyError], None]] | None,
) -> None:
    """Start the generation into a new ring and follow it for this client; if the client leaves, hold the
    request (slot, lease, reservation) until the generation ends."""
    assert call.tenant is not None and call.route is not None and settings.resumable is not None
    hub = request.app[HUB]
    spec = settings.resumable
    stream_id = channel.stream_id or hub.new_id()
    channel.stream_id = stream_id
    meta = Meta(stream_id, call.tenant.name, call.protocol, call.path, call.route.name, spec.ttl)
    ring = hub.open(meta, spec)
    ring.first = channel.encoder.seq  # ids are seqs: queued events before this one went out directly
    encoder = Encoder("sse")
    encoder.seq = channel.encoder.seq
    producer = hub.tasks.spawn(_produce(request, call, hub, ring, encoder, answer, settings, open_streams),
                               name="resumable-unified-stream")
    try:
        sink = await channel.sink(Watch(time.monotonic()), settings.write_buffer)
        await follow(Source(meta, ring, None), channel, sink, ring.first - 1, hub, settings.slow_client)
        await channel.finish()
    except asyncio.CancelledError:
        client_left(call)
        await hold_detached(hub, ring, producer, call, absorbed=True)
        raise
    except (ConnectionResetError, TimeoutError) as gone:
        client_left(call)
        if isinstance(gone, TimeoutError) and request.transport is not None:
            request.transport.abort()  # took no write for slow_client: cut off, as on a plain stream
    finally:
        channel.encoder.seq = encoder.seq
    if await hold_detached(hub, ring, producer, call, absorbed=False):
        raise asyncio.CancelledError


async def _produce(
    request: web.Request,
    call: Call,
    hub: Hub,
    ring: Ring,
    encoder: Encoder,
    answer: Answer,
    settings: StreamSettings,
    open_streams: set[Callable[[ProxyError], None]] | None,
) -> None:
    """The upstream's events into the ring until the stream ends, fails or is stopped (cancel, ttl)."""
    upstream = answer.upstream
    assert call.exchange is not None
    watch = Watch(time.monotonic())
    sink = RingSink(hub, ring, watch, encoder)
    sent_ago = call.attempts[-1].duration if call.attempts else 0.0
    # The slow-client rule is each reader's: the ring waits only for an attached reader (backpressure).
    dog = Watchdog(request, sink, upstream, answer.timeouts, replace(settings, slow_client=1e9), answer.deadline,
                   sent_ago)
    translator = UnifiedTranslator(encoder, source_of(call.exchange, call.path), call.model, int(call.started_wall))

    def end(error: ProxyError) -> None:
        if watch.failure is None:
            watch.failure = error
        upstream.close()

    def stop(reason: str) -> None:
        hub.stopped(reason)
        end(Cancelled("the client cancelled the stream") if reason == CANCEL_REASON
            else Stopped(f"the stream was stopped ({reason})"))

    hub.stoppers[ring.meta.id] = stop
    if open_streams is not None:
        open_streams.add(end)
    ended = False
    try:
        await pump(sink, upstream, SSEDecoder(), call, settings, translator, answer.redact)
        ended = watch.failure is None
    finally:
        dog.stop()
        if open_streams is not None:
            open_streams.discard(end)
        _last_events(hub, ring, encoder, call, watch.failure)
        hub.end(ring)
        if ended and upstream.content.at_eof():
            upstream.release()
        else:
            upstream.close()
        RECLAIMER.stream_ended()


def _last_events(hub: Hub, ring: Ring, encoder: Encoder, call: Call, failure: ProxyError | None) -> None:
    """However the generation ended, the ring ends with `stream_complete` (after an `error` on a failure)."""
    if failure is None:
        return  # the translator sent usage and stream_complete
    call.error = failure.reason
    call.failure = failure
    if isinstance(failure, Cancelled):
        hub.append(ring, encoder.encode(STREAM_COMPLETE, {"finish_reason": CANCELLED}))
        return
    hub.append(ring, encoder.encode(ERROR, error_payload(failure)))
    hub.append(ring, encoder.encode(STREAM_COMPLETE, {"finish_reason": FAILED}))


async def follow(source: Source, channel: Channel, sink: Sink, after: int, hub: Hub, slow_client: float) -> int:
    """Write the stream's events after `after` to this client until the stream ends; returns the last seq
    written. A client whose next event left the buffer gets `error` (stream_events_dropped) and the end."""
    ring = source.ring
    token = ring.attach(after) if ring is not None else 0
    try:
        while True:
            try:
                batch = await source.read(after, IDLE_READ)
            except Dropped as gap:
                hub.failed(gap.reason)
                error = StreamGap(f"{gap}: this reader fell behind the stream's buffer (resumable.buffer)")
                enc = channel.encoder
                enc.seq = after + 1
                complete = enc.encode(STREAM_COMPLETE, {"finish_reason": FAILED})
                await channel.send(enc.encode(ERROR, error_payload(error)) + complete)
                return after
            if batch.events:
                async with asyncio.timeout(slow_client):
                    await sink.write(channel.from_ring(batch.events))
                after = batch.first + len(batch.events) - 1
                if ring is not None:
                    ring.advance(token, after)
            elif batch.ended:
                return after
    finally:
        if ring is not None:
            ring.leave(token, hub.clock())
