"""Reading a resumable unified stream again after a dropped connection, and stopping one
(docs/apps/unified-stream.md#resuming-a-dropped-stream):

    POST /signalbox/v1/stream   with `x-signalbox-stream-id` and `Last-Event-ID`: the events after that seq,
                                then the live tail, as SSE (the body is not read)
    {"type": "resume", ...}     the same over a WebSocket (proxy/ingress/unified/socket.py)
    DELETE /signalbox/v1/stream with `x-signalbox-stream-id`: stops the generation (a browser's cancel over
                                SSE, whose aborted fetch alone would only detach it)

Only the tenant that started a stream finds it; not found, expired and another tenant's look the same (404).
The generation was admitted once: a resume takes no limit, no queue slot and no tokens.
"""

from __future__ import annotations

import time

from aiohttp import web

from proxy.errors import InvalidRequest
from proxy.ingress.unified.run import new_call
from proxy.policy.plan import TenantRule
from proxy.runtime import Runtime
from proxy.streaming.resume.events import parse_after
from proxy.streaming.resume.follow import StreamGap, StreamNotFound
from proxy.streaming.resume.hub import HUB, LAST_EVENT_ID, Hub, Source
from proxy.streaming.resume.ring import Batch, Dropped
from proxy.streaming.settings import StreamSettings, route_settings
from proxy.streaming.sink import Watch
from proxy.streaming.unified.channel import STREAM_ID_HEADER, Channel, SSEChannel
from proxy.streaming.unified.resumable import follow
from proxy.telemetry.outcome import judge

MAX_STREAM_ID = 128
RESUMED_PATH = "/signalbox/v1/stream"
"""The access log's `path` of a resume (it reads a stream; the target API was the original request's)."""


async def find(hub: Hub, tenant: TenantRule, key: object, after: int | None) -> tuple[Source, Batch]:
    """The stream `key` names for `tenant`, and its events after `after` buffered now; raises the 404, 409
    or 400 a resume gets."""
    if after is None:
        hub.failed("bad_id")
        raise InvalidRequest("the seq to resume after must be a non-negative integer the proxy sent",
                             param=LAST_EVENT_ID)
    source = None
    if isinstance(key, str) and 0 < len(key) <= MAX_STREAM_ID:
        source = await hub.find(key, tenant.name)
    if source is None:
        hub.failed("unknown")
        raise StreamNotFound("no resumable stream by that id for this caller (unknown, expired, or not yours)")
    try:
        first = await source.read(after, 0.0)
    except Dropped as gap:
        hub.failed(gap.reason)
        raise StreamGap(f"{gap}; resume from a later seq, or start a new request") from None
    hub.resumed(source)
    return source, first


def settings_of(state: Runtime, source: Source) -> StreamSettings:
    route = state.plans.current.routes_by_name.get(source.meta.route)
    return route_settings(state.stream_settings, route.stream if route is not None else None)


async def follow_for(state: Runtime, hub: Hub, source: Source, channel: Channel, after: int) -> None:
    """The stream's events after `after` to this channel, until the stream's end."""
    settings = settings_of(state, source)
    channel.stream_id = source.meta.id
    channel.encoder.seq = after + 1  # an error of this reader's own (a gap) takes the next seq
    sink = await channel.sink(Watch(time.monotonic()), settings.write_buffer)
    await follow(source, channel, sink, after, hub, settings.slow_client)
    await channel.finish()


async def sse(request: web.Request, state: Runtime, tenant: TenantRule, request_id: str) -> web.StreamResponse:
    """POST with `x-signalbox-stream-id`: one resume, counted and logged as a request of its own."""
    hub = request.app[HUB]
    after = parse_after(request.headers.get(LAST_EVENT_ID, ""))
    source, _ = await find(hub, tenant, request.headers.get(STREAM_ID_HEADER), after)
    assert after is not None  # find() refused it otherwise
    call = new_call(state, request_id, RESUMED_PATH)
    call.tenant = tenant
    call.stream = True
    call.status = 200
    channel = SSEChannel(request, request_id)
    state.in_flight += 1
    try:
        await follow_for(state, hub, source, channel, after)
    except (ConnectionResetError, TimeoutError):
        call.client_gone = True
        if request.transport is not None:
            request.transport.abort()
    finally:
        state.in_flight -= 1
        judge(call)
        state.metrics.record(call)
        state.access_log.write(call)
    return channel.response if channel.response is not None else web.Response(status=204)


async def stop(request: web.Request, tenant: TenantRule) -> None:
    """DELETE with `x-signalbox-stream-id`: stop the stream's generation (its readers get `stream_complete`
    `cancelled`). A stream that ended already is left as it is."""
    hub = request.app[HUB]
    key = request.headers.get(STREAM_ID_HEADER, "")
    source = await hub.find(key, tenant.name) if 0 < len(key) <= MAX_STREAM_ID else None
    if source is None:
        raise StreamNotFound("no resumable stream by that id for this caller (unknown, expired, or not yours)")
    await hub.stop(source, "cancelled")
