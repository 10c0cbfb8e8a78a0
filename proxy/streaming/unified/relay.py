"""An upstream's answer to a unified request, as unified events: the relay's own pump, framing and watchdog
(heartbeats, first-token and idle limits, the deadline, the slow-client rule) with `UnifiedTranslator` in
place of a protocol translator and a channel's sink in place of the SSE response. An answer that is not a
stream (an upstream error, usually) becomes one `error` event (or, on SSE before anything went out, the
HTTP status it had)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import aiohttp
import orjson
from aiohttp import web

from proxy.call import Call
from proxy.errors import ProxyError, SlowClient, UpstreamBadResponse
from proxy.streaming.failure import read_failure
from proxy.streaming.pump import pump
from proxy.streaming.reclaim import RECLAIMER
from proxy.streaming.relay import Answer
from proxy.streaming.settings import StreamSettings, route_settings
from proxy.streaming.sink import Watch
from proxy.streaming.sse import SSEDecoder
from proxy.streaming.unified import resumable
from proxy.streaming.unified.channel import Channel, SSEChannel
from proxy.streaming.unified.events import ERROR, FAILED, STREAM_COMPLETE, upstream_error_payload
from proxy.streaming.unified.translate import UnifiedTranslator, source_of
from proxy.streaming.watchdog import Watchdog
from proxy.streaming.whole import read_body, too_large
from proxy.tasks import Deadline


async def respond(
    channel: Channel,
    request: web.Request,
    call: Call,
    answer: Answer,
    process: StreamSettings,
    open_streams: set[Callable[[ProxyError], None]] | None = None,
    clock: Deadline | None = None,
) -> web.StreamResponse:
    """`proxy.ingress.handler.forward`'s last step for a unified request (same signature as relay.respond,
    with the channel bound first)."""
    upstream = answer.upstream
    assert call.exchange is not None and call.route is not None
    if upstream.status == 200 and upstream.content_type == "text/event-stream":
        if clock is not None:
            clock.cancel()  # the watchdog owns every time limit from here
        settings = route_settings(process, call.route.stream)
        if settings.resumable is not None:  # the route keeps its streams for a resume
            await resumable.relay(channel, request, call, answer, settings, open_streams)
        else:
            await _stream(channel, request, call, answer, settings, open_streams)
    else:
        await _not_a_stream(channel, call, answer)
    return _response_of(channel, request)


def _response_of(channel: Channel, request: web.Request) -> web.StreamResponse:
    if isinstance(channel, SSEChannel):
        return channel.response if channel.response is not None else web.Response(status=204)
    ws = getattr(channel, "ws", None)
    assert isinstance(ws, web.StreamResponse)
    return ws


async def _stream(
    channel: Channel,
    request: web.Request,
    call: Call,
    answer: Answer,
    settings: StreamSettings,
    open_streams: set[Callable[[ProxyError], None]] | None,
) -> None:
    upstream = answer.upstream
    assert call.exchange is not None
    watch = Watch(time.monotonic())
    sink = await channel.sink(watch, settings.write_buffer)
    sink.source = upstream.connection.transport if upstream.connection is not None else None
    sent_ago = call.attempts[-1].duration if call.attempts else 0.0
    dog = Watchdog(request, sink, upstream, answer.timeouts, settings, answer.deadline, sent_ago)
    translator = UnifiedTranslator(channel.encoder, source_of(call.exchange, call.path), call.model,
                                   int(call.started_wall))

    def end(error: ProxyError) -> None:
        if watch.failure is None:
            watch.failure = error
        upstream.close()

    if open_streams is not None:
        open_streams.add(end)
    ended = False
    try:
        await pump(sink, upstream, SSEDecoder(), call, settings, translator, answer.redact)
        ended = watch.failure is None
    except ConnectionResetError:
        call.client_gone = True
    finally:
        dog.stop()
        if isinstance(watch.failure, SlowClient):
            call.client_gone = True
            call.error = watch.failure.reason
            call.failure = watch.failure
        if not ended:
            upstream.close()  # cancelled, broken or abandoned: the upstream stops generating now
        if open_streams is not None:
            open_streams.discard(end)
        RECLAIMER.stream_ended()
    try:
        if not call.client_gone:
            if watch.failure is not None:
                call.error = watch.failure.reason
                call.failure = watch.failure
                await channel.fail(watch.failure)
            else:
                await channel.finish()
    except ConnectionResetError:
        call.client_gone = True
    finally:
        await _give_back(upstream, reuse=ended and not call.client_gone)


async def _give_back(upstream: aiohttp.ClientResponse, *, reuse: bool) -> None:
    """A finished stream's connection goes back to the pool once its body is read (one loop turn for the
    chunk terminator that follows the end marker), else it is closed."""
    if reuse and not upstream.content.at_eof():
        await asyncio.sleep(0)
    if reuse and upstream.content.at_eof():
        upstream.release()
    else:
        upstream.close()


async def _not_a_stream(channel: Channel, call: Call, answer: Answer) -> None:
    """An error answer (or a server that ignored `stream`): one `error` event, or the HTTP status on SSE
    when nothing went out yet (raised as an UpstreamAnswer the ingress renders)."""
    upstream = answer.upstream
    whole = answer.whole
    try:
        if whole is None:
            whole = await read_body(upstream, answer.timeouts.first_token, call.plan.max_buffered_response)
        if not whole.complete:
            raise UpstreamBadResponse(too_large(call, upstream))
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise read_failure(call, exc) from None
    finally:
        upstream.release()
    status = upstream.status
    if status < 400:
        raise UpstreamBadResponse(f"upstream '{call.upstream}' answered {status} without a stream")
    raw = answer.redact.scrub(whole.data)
    try:
        parsed: object = orjson.loads(raw)
    except orjson.JSONDecodeError:
        parsed = None
    payload = upstream_error_payload(status, parsed)
    call.error = f"upstream_{status}"
    if not channel.opened:
        call.status = status
        raise UpstreamAnswer(status, payload, dict(answer.headers))
    call.status = 200
    enc = channel.encoder
    await channel.send(enc.encode(ERROR, payload) + enc.encode(STREAM_COMPLETE, {"finish_reason": FAILED}))
    await channel.finish()


class UpstreamAnswer(Exception):
    """An upstream's error answer to an SSE request whose 200 has not gone out: the ingress answers with the
    upstream's status, Retry-After and the `error` event's payload as the JSON body."""

    def __init__(self, status: int, payload: dict[str, object], headers: dict[str, str]) -> None:
        super().__init__(status)
        self.status = status
        self.payload = payload
        self.headers = headers
