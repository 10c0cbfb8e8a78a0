"""Where resumable streams meet the data path: `relay` serves a new stream on a resumable route (the relay
calls it), `intercept` serves the requests that read an existing one (ingress calls it before the body is
read, only when some route of the plan is resumable).

A new stream: the generation runs in a task of its own (produce.py) into the stream's ring; the client that
asked is the ring's first reader (follow.py). When that client leaves, the request's handler stays, detached:
it waits for the generation to end, so the request keeps its queue slot, its concurrency lease and its token
reservation (settled from the stream's usage) exactly as if the client had stayed. A detached generation is
stopped when nobody has read it for `ttl`, or at once when the process already runs `max_detached` of them.

Reading an existing one: the same endpoint with `x-signalbox-stream-id` (and `Last-Event-ID`), or the
Responses API's own `GET /v1/responses/{id}?stream=true&starting_after=N` (responses.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import web
from multidict import CIMultiDict

from proxy.call import Call
from proxy.errors import InvalidRequest, ProxyError
from proxy.streaming.resume import responses
from proxy.streaming.resume.events import parse_after
from proxy.streaming.resume.follow import StreamGap, StreamNotFound, follow, open_sink, sse_headers
from proxy.streaming.resume.hub import HUB, LAST_EVENT_ID, STREAM_ID_HEADER, Hub, Source
from proxy.streaming.resume.produce import Generation, produce
from proxy.streaming.resume.ring import Dropped, Meta, Ring
from proxy.streaming.settings import StreamSettings, route_settings

WATCH_EVERY = 1.0
"""Longest pause between two looks at a detached generation (ttl, cancel)."""


async def relay(
    request: web.Request,
    call: Call,
    gen: Generation,
    headers: CIMultiDict[str],
    open_streams: set[Callable[[ProxyError], None]] | None,
) -> web.StreamResponse:
    """Serve a new resumable stream: start its generation, follow it for this client, detach if it leaves."""
    assert call.tenant is not None and call.route is not None and gen.settings.resumable is not None
    hub = request.app[HUB]
    spec = gen.settings.resumable
    meta = Meta(hub.new_id(), call.tenant.name, call.protocol, call.path, call.route.name, spec.ttl)
    ring = hub.open(meta, spec)
    producer = hub.tasks.spawn(produce(request, call, hub, ring, gen, open_streams), name="resumable-stream")
    response = web.StreamResponse(status=200, headers=headers)
    response.headers.update(sse_headers(meta.id))
    try:
        sink = await open_sink(request, response, gen.settings)
        if gen.settings.heartbeat > 0:
            await sink.write(sink.heartbeat())
        await follow(Source(meta, ring, None), sink, -1, gen.settings, hub, protocol=call.protocol,
                     request_id=call.request_id)
        await response.write_eof()
    except asyncio.CancelledError:
        client_left(call)
        await hold_detached(hub, ring, producer, call, absorbed=True)
        raise
    except (ConnectionResetError, TimeoutError):
        client_left(call)
        _abort(request)
    if await hold_detached(hub, ring, producer, call, absorbed=False):
        raise asyncio.CancelledError  # aiohttp cancelled the handler meanwhile (the client left): as it said
    return response


def client_left(call: Call) -> None:
    call.client_gone = True
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        task.uncancel()  # the client's leaving is handled: the handler waits for the generation, then re-raises


async def hold_detached(hub: Hub, ring: Ring, producer: asyncio.Task[None], call: Call, *, absorbed: bool) -> bool:
    """Wait for the generation to end, holding what the request holds (slot, lease, token reservation). Nobody
    reads it from here on (the client left, or has had all it will get): it is detached, stopped when nobody
    reads it for `ttl` (a resume counts), or at once when too many generations are detached already. Never
    cancels the generation itself. `absorbed`: the handler's cancellation was taken back already (a second
    one, at shutdown, ends the wait). Returns whether one arrived here."""
    if producer.done():
        return False
    counted = not ring.ended  # an ended generation is only settling its accounts: not detached
    stop = hub.stoppers.get(ring.meta.id)
    if counted and hub.detached >= hub.max_detached and stop is not None:
        stop("detached_limit")
    hub.detached += counted
    late = False
    try:
        while not producer.done():
            try:
                await asyncio.wait({producer}, timeout=min(ring.ttl / 4, WATCH_EVERY))
            except asyncio.CancelledError:
                if absorbed:
                    raise  # cancelled again (shutdown): the drain ends the generation itself
                absorbed = late = True
                client_left(call)
                continue
            stop = hub.stoppers.get(ring.meta.id)
            if stop is not None and not ring.watched(hub.clock()) and not await _read_elsewhere(hub, ring):
                stop("ttl")
    finally:
        hub.detached -= counted
    return late


async def _read_elsewhere(hub: Hub, ring: Ring) -> bool:
    """Is a reader on another replica following this stream (the shared store knows)?"""
    return hub.shared is not None and await hub.shared.seen(ring.meta)


async def intercept(request: web.Request, call: Call, process: StreamSettings) -> web.StreamResponse | None:
    """Serve a request that reads an existing stream; None for any other request (it goes on as usual).
    `call.tenant` is known: only that tenant's streams are found."""
    hub = request.app[HUB]
    named = request.headers.get(STREAM_ID_HEADER)
    if named is not None:
        after = parse_after(request.headers.get(LAST_EVENT_ID, ""))
        source = await _source(hub, call, named)
        if source is None:
            raise StreamNotFound("no resumable stream by that id for this caller (unknown, expired, or not yours)")
        return await resume(request, call, hub, source, after, process)
    if call.path.startswith("/v1/responses/"):
        return await responses.serve(
            request, call, hub, lambda source, after: resume(request, call, hub, source, after, process)
        )
    return None


async def _source(hub: Hub, call: Call, key: str) -> Source | None:
    assert call.tenant is not None
    if not key or len(key) > 128:
        return None
    source = await hub.find(key, call.tenant.name)
    if source is None:
        hub.failed("unknown")
    return source


async def resume(
    request: web.Request, call: Call, hub: Hub, source: Source, after: int | None, process: StreamSettings
) -> web.StreamResponse:
    """Answer with the stream's events after id `after`, then its live tail."""
    if after is None:
        hub.failed("bad_id")
        raise InvalidRequest("the id to resume from must be a non-negative integer the proxy sent", param=LAST_EVENT_ID)
    route = call.plan.routes_by_name.get(source.meta.route)
    settings = route_settings(process, route.stream if route is not None else None)
    try:
        first = await source.read(after, 0.0)
    except Dropped as gap:
        hub.failed(gap.reason)
        raise StreamGap(f"{gap}; resume from a later id, or start a new request") from None
    hub.resumed(source)
    call.protocol = source.meta.protocol
    call.stream = True
    call.status = 200
    response = web.StreamResponse(status=200, headers={**sse_headers(source.meta.id), "x-request-id": call.request_id})
    sink = await open_sink(request, response, settings)
    try:
        await follow(source, sink, after, settings, hub, protocol=source.meta.protocol, request_id=call.request_id,
                     first=first if first.events or first.ended else None)
        await response.write_eof()
    except (ConnectionResetError, TimeoutError):
        call.client_gone = True
        _abort(request)
    return response


def _abort(request: web.Request) -> None:
    """A client that took no write for `slow_client` (TimeoutError) is cut off, as on a plain stream."""
    transport = request.transport
    if transport is not None and not transport.is_closing():
        transport.abort()

