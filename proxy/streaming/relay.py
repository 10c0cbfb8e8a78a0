"""Moves an upstream response to the client: whole bodies (whole.py), or SSE streams event by event.

Stream rules: write only whole events (so an injected heartbeat never splits one), read the next
upstream chunk only after the previous write left the client's queue small (sink.py: a slow client
stops our reads and TCP pushes back on the upstream, so a stalled stream costs a bounded few tens of
KiB), close the upstream the moment the client goes, and end a broken stream with one error event in
the client's protocol. A single watchdog timer per stream does the timing (heartbeats, first-token and
idle limits, the deadline, a slow client) so the per-event path carries no timers.

Modules: pump.py (read, decode, translate, write), sink.py (bounded writes, heartbeat framing),
watchdog.py (the timer), queued.py (the waiting room), whole.py (non-streamed bodies).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from proxy.call import Call
from proxy.errors import ProxyError, SlowClient
from proxy.policy.plan import TimeoutSpec
from proxy.providers.exchange import StreamTranslator
from proxy.redact import EMPTY, Redactor
from proxy.streaming.failure import finish_with_error
from proxy.streaming.pump import pump
from proxy.streaming.queued import QueuedStream
from proxy.streaming.reclaim import RECLAIMER
from proxy.streaming.settings import StreamSettings, route_settings
from proxy.streaming.sink import Sink, Watch
from proxy.streaming.sse import SSEDecoder
from proxy.streaming.watchdog import Watchdog
from proxy.streaming.whole import BodyTransform, respond_whole
from proxy.tasks import spawn

__all__ = ["BodyTransform", "QueuedStream", "StreamSettings", "respond_stream", "respond_whole", "route_settings"]


async def respond_stream(
    request: web.Request,
    call: Call,
    upstream: aiohttp.ClientResponse,
    headers: CIMultiDict[str],
    timeouts: TimeoutSpec,
    settings: StreamSettings,
    deadline: float,
    translator: StreamTranslator | None = None,
    open_streams: set[Callable[[ProxyError], None]] | None = None,
    prepared: web.StreamResponse | None = None,
    redact: Redactor = EMPTY,
) -> web.StreamResponse:
    """Relay an SSE stream; returns the prepared response once the stream has ended, however it ended.

    With a `translator`, each upstream event is parsed and re-encoded in the client's protocol;
    without one, events pass through byte for byte. `prepared`: the 200 and SSE headers already went
    out while the request was queued (QueuedStream); the events follow them."""
    watch = Watch(time.monotonic())
    if prepared is not None:
        response = prepared
        sink = await Sink.open(request, response, watch, settings.write_buffer)
    else:
        headers["Content-Type"] = "text/event-stream; charset=utf-8"
        headers["Cache-Control"] = "no-cache"
        headers["X-Accel-Buffering"] = "no"
        response = web.StreamResponse(status=upstream.status, headers=headers)
        sink = Sink(response, await response.prepare(request), request.transport, watch, settings.write_buffer)
        if settings.heartbeat > 0:
            await sink.write(sink.heartbeat())
    sink.source = upstream.connection.transport if upstream.connection is not None else None
    # first_token counts from when the request was sent, so the wait for the headers counts too.
    sent_ago = call.attempts[-1].duration if call.attempts else 0.0
    dog = Watchdog(request, sink, upstream, timeouts, settings, deadline, sent_ago)
    decoder = SSEDecoder()

    def end(error: ProxyError) -> None:
        """Called by the drain at shutdown: end this stream with `error` at the next event boundary."""
        if watch.failure is None:
            watch.failure = error
        upstream.close()

    if open_streams is not None:
        open_streams.add(end)
    ended = False  # the upstream's stream ended and nothing failed: its connection may be reused
    try:
        await pump(sink, upstream, decoder, call, settings, translator, redact)
        ended = watch.failure is None
    except ConnectionResetError:
        call.client_gone = True
    finally:
        dog.stop()
        if isinstance(watch.failure, SlowClient):
            call.client_gone = True
            call.error = watch.failure.reason  # told apart from a client that simply left
        if not ended:
            upstream.close()  # a broken or abandoned stream: the upstream must stop generating now
        if open_streams is not None:
            open_streams.discard(end)
        RECLAIMER.stream_ended()
    try:
        if not call.client_gone:
            if watch.failure is not None:
                await finish_with_error(response, call, watch.failure)
            else:
                try:
                    await response.write_eof()
                except ConnectionResetError:
                    call.client_gone = True
    finally:
        if not ended or call.client_gone:
            upstream.close()
        elif upstream.content.at_eof():
            upstream.release()  # the whole body is read: the connection goes back to the pool
        else:
            try:
                await asyncio.sleep(0)  # one loop turn: the chunk terminator is usually in the socket already
            finally:
                if upstream.content.at_eof():
                    upstream.release()
                else:  # off the request's own time (access log, metrics)
                    spawn(_recycle(upstream), name="recycle")
    return response


_RECYCLE_WAIT = 0.1
"""How long a finished stream waits for the end of its upstream body after [DONE] (the chunk terminator
follows within microseconds) so that the connection goes back to the pool instead of being closed."""


async def _recycle(upstream: aiohttp.ClientResponse) -> None:
    """Return a finished stream's upstream connection to the pool once its body ends: a new connection
    per stream would cost a TCP (and, to a real vendor, TLS) handshake each time. Closed instead if the
    end does not come at once."""
    content = upstream.content
    complete = False
    try:
        async with asyncio.timeout(_RECYCLE_WAIT):
            while not content.at_eof() and await content.readany():
                pass  # anything after [DONE] is not for the client
        complete = True
    except (TimeoutError, aiohttp.ClientError):
        pass
    finally:
        if complete:
            upstream.release()
        else:
            upstream.close()
