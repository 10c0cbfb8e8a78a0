"""The relay, ingress's one call for an upstream's answer: `respond` moves it to the client, whatever it is:
an SSE stream event by event, a whole body, or either after a queued stream's 200 already went out.

Stream rules: write only whole events (so an injected heartbeat never splits one), read the next
upstream chunk only after the previous write left the client's queue small (sink.py: a slow client
stops our reads and TCP pushes back on the upstream, so a stalled stream costs a bounded few tens of
KiB), close the upstream the moment the client goes, and end a broken stream with one error event in
the client's protocol. A single watchdog timer per stream does the timing (heartbeats, first-token and
idle limits, the deadline, a slow client) so the per-event path carries no timers.

Modules: pump.py (read and write), framing.py (pure: what each chunk becomes, how the stream ended),
sink.py (bounded writes, heartbeat framing), watchdog.py (the timer), queued.py (the waiting room),
whole.py (non-streamed bodies).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from proxy.call import Call
from proxy.errors import ProxyError, SlowClient
from proxy.policy.plan import TimeoutSpec
from proxy.policy.redact import EMPTY, Redactor
from proxy.providers import exchange as exchanges
from proxy.providers.exchange import StreamTranslator
from proxy.streaming.failure import finish_with_error
from proxy.streaming.pump import pump
from proxy.streaming.queued import QueuedStream
from proxy.streaming.reclaim import RECLAIMER
from proxy.streaming.resume import entry as resume
from proxy.streaming.resume.produce import Generation
from proxy.streaming.settings import StreamSettings, route_settings
from proxy.streaming.sink import Sink, Watch
from proxy.streaming.sse import SSEDecoder
from proxy.streaming.watchdog import Watchdog
from proxy.streaming.whole import BodyTransform, pass_through, respond_whole
from proxy.tasks import Deadline, spawn
from proxy.upstream.body import Whole

__all__ = ["Answer", "QueuedStream", "StreamSettings", "respond", "route_settings", "waiting_room"]


@dataclass(slots=True)
class Answer:
    """An upstream's answer as dispatch handed it over, with what relaying it needs."""

    upstream: aiohttp.ClientResponse
    headers: CIMultiDict[str]
    """The client's response headers, already built from the upstream's."""
    timeouts: TimeoutSpec
    """The timeouts of the route that answered (a fallback's may differ from the call's own)."""
    deadline: float
    """The call's `timeouts.total`, as a `time.monotonic()` time."""
    redact: Redactor = EMPTY
    whole: Whole | None = None
    """What dispatch already read of a non-streamed answer."""


def waiting_room(request: web.Request, call: Call, process: StreamSettings) -> QueuedStream | None:
    """Streams on a queue with heartbeat_while_queued get their headers early if they must wait."""
    route = call.route
    queue = route.queue if route is not None else None
    if not call.stream or queue is None or not queue.heartbeat:
        return None
    assert route is not None
    return QueuedStream(request, call, route_settings(process, route.stream).heartbeat)


async def respond(
    request: web.Request,
    call: Call,
    answer: Answer,
    process: StreamSettings,
    open_streams: set[Callable[[ProxyError], None]] | None = None,
    clock: Deadline | None = None,
) -> web.StreamResponse:
    """Relay `answer` to the client and return the response once it has ended, however it ended.

    An SSE answer to a stream request is relayed event by event (translated when the client speaks another
    protocol than the upstream) with the route's stream settings over `process`; `clock`, the call's total
    deadline, is stopped there, as the stream's watchdog owns every time limit past the headers. Anything
    else is a whole body, translated or normalised unless it passes through. A stream whose 200 went out
    while it was queued (`call.waiting`) gets its events, or its error as an event, after that 200."""
    upstream = answer.upstream
    exchange = call.exchange
    assert exchange is not None and call.route is not None
    waiting = call.waiting if isinstance(call.waiting, QueuedStream) else None
    prepared = waiting.response if waiting is not None else None  # out while queued, in the flow or dispatch
    if call.stream and upstream.status == 200 and upstream.content_type == "text/event-stream":
        if clock is not None:
            clock.cancel()
        translator = exchanges.stream_translator(exchange, call.body or {}, call.model, int(call.started_wall))
        settings = route_settings(process, call.route.stream)
        if settings.resumable is not None and prepared is None:  # the one check plain streams pay
            return await _resumable(request, call, answer, settings, translator, open_streams)
        return await _stream(request, call, answer, settings, translator, open_streams, prepared)
    transform: BodyTransform | None = None
    if exchange.kind != "pass" or upstream.status >= 400:
        transform = partial(exchanges.response_body, exchange, model=call.model, created=int(call.started_wall),
                            redact=answer.redact)
    # A stream request answered with a whole body (an error, or a server that ignores `stream`) has no
    # socket read timeout (streams are timed by the relay's watchdog): first_token bounds that read.
    read_timeout = answer.timeouts.first_token if call.stream else None
    if waiting is not None and prepared is not None:
        return await waiting.relay_whole(upstream, transform, read_timeout, answer.whole)
    if answer.whole is None and transform is None and call.route.tool_prefix is not None:
        return await pass_through(request, call, upstream, answer.headers)  # a tool's chunked answer, as it comes
    return await respond_whole(
        call, upstream, answer.headers, transform, read_timeout, request=request, whole=answer.whole
    )


async def _resumable(
    request: web.Request,
    call: Call,
    answer: Answer,
    settings: StreamSettings,
    translator: StreamTranslator | None,
    open_streams: set[Callable[[ProxyError], None]] | None,
) -> web.StreamResponse:
    """A stream on a route with `stream.resumable`: proxy/streaming/resume/entry.py."""
    sent_ago = call.attempts[-1].duration if call.attempts else 0.0
    gen = Generation(answer.upstream, answer.timeouts, answer.deadline, answer.redact, translator, settings, sent_ago)
    return await resume.relay(request, call, gen, answer.headers, open_streams)


async def _stream(
    request: web.Request,
    call: Call,
    answer: Answer,
    settings: StreamSettings,
    translator: StreamTranslator | None,
    open_streams: set[Callable[[ProxyError], None]] | None,
    prepared: web.StreamResponse | None,
) -> web.StreamResponse:
    """Relay an SSE stream; returns the prepared response once the stream has ended, however it ended.

    With a `translator`, each upstream event is parsed and re-encoded in the client's protocol;
    without one, events pass through byte for byte. `prepared`: the 200 and SSE headers already went
    out while the request was queued (QueuedStream); the events follow them."""
    upstream, headers = answer.upstream, answer.headers
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
    dog = Watchdog(request, sink, upstream, answer.timeouts, settings, answer.deadline, sent_ago)
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
        await pump(sink, upstream, decoder, call, settings, translator, answer.redact)
        ended = watch.failure is None
    except ConnectionResetError:
        call.client_gone = True
    finally:
        dog.stop()
        if isinstance(watch.failure, SlowClient):
            call.client_gone = True
            call.error = watch.failure.reason  # told apart from a client that simply left
            call.failure = watch.failure
        if not ended:
            upstream.close()  # a broken or abandoned stream: the upstream must stop generating now
        if open_streams is not None:
            open_streams.discard(end)
        RECLAIMER.stream_ended()
    try:
        if not call.client_gone:
            await _close(response, call, watch.failure)
    finally:
        await _give_back(upstream, reuse=ended and not call.client_gone)
    return response


async def _close(response: web.StreamResponse, call: Call, failure: ProxyError | None) -> None:
    """End the client's stream: with one error event if it failed, else cleanly."""
    if failure is not None:
        await finish_with_error(response, call, failure)
        return
    try:
        await response.write_eof()
    except ConnectionResetError:
        call.client_gone = True


async def _give_back(upstream: aiohttp.ClientResponse, *, reuse: bool) -> None:
    """The upstream connection of an ended stream: back to the pool once its body is read, else closed."""
    if not reuse:
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
