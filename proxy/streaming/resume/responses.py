"""The OpenAI Responses API's own way to resume and stop a stream, for any upstream behind a resumable route:

    GET  /v1/responses/{id}?stream=true&starting_after=N   the events after sequence_number N, then the live tail
    GET  /v1/responses/{id}                                 the response object as its newest event has it
    POST /v1/responses/{id}/cancel                          stop the generation; the response, status "cancelled"

`{id}` is the response id the stream's first event (`response.created`) named. Requests for an id the proxy
does not hold for this tenant are not answered here: they go to the upstream as usual (an OpenAI upstream
answers for its own stored responses).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import orjson
from aiohttp import web

from proxy.call import Call
from proxy.streaming.resume.events import parse_after
from proxy.streaming.resume.hub import LAST_EVENT_ID, Hub, Source
from proxy.streaming.sse import SSEEvent

Resume = Callable[[Source, int | None], Awaitable[web.StreamResponse]]
PREFIX = "/v1/responses/"
SCANNED = 64
"""Newest events looked at for the latest response object."""


def target(path: str, method: str) -> tuple[str, str] | None:
    """(response id, action) for a path this module serves: action is "get" or "cancel"."""
    rest = path[len(PREFIX) :]
    rid, _, tail = rest.partition("/")
    if not rid or "%" in rid:
        return None
    if not tail and method in ("GET", "HEAD"):
        return rid, "get"
    if tail == "cancel" and method == "POST":
        return rid, "cancel"
    return None


async def serve(request: web.Request, call: Call, hub: Hub, resume: Resume) -> web.StreamResponse | None:
    found = target(call.path, call.method)
    if found is None:
        return None
    assert call.tenant is not None
    rid, action = found
    source = await hub.find(rid, call.tenant.name)
    if source is None:
        return None  # not a stream of ours: the upstream may know it
    query = request.rel_url.query
    if action == "get" and query.get("stream", "").lower() == "true":
        value = query.get("starting_after")
        if value is None:
            value = request.headers.get(LAST_EVENT_ID, "")
        return await resume(source, parse_after(value))
    if action == "cancel":
        await hub.stop(source, "cancelled")
    snapshot = await _snapshot(hub, source, rid)
    if action == "cancel" and snapshot.get("status") in ("queued", "in_progress"):
        snapshot["status"] = "cancelled"
    call.status = 200
    return web.Response(body=orjson.dumps(snapshot), content_type="application/json",
                        headers={"x-request-id": call.request_id, "x-signalbox-stream-id": source.meta.id})


async def _snapshot(hub: Hub, source: Source, rid: str) -> dict[str, Any]:
    if source.ring is not None:
        events: Iterable[bytes] = reversed(list(source.ring.events)[-SCANNED:])
        ended = source.ring.ended
    else:
        assert source.shared is not None
        events, ended = await source.shared.newest(source.meta, SCANNED)
    response = latest_response(events)
    if response is None:
        return {"id": rid, "object": "response", "status": "completed" if ended else "in_progress"}
    if not ended and response.get("status") == "queued":
        response["status"] = "in_progress"
    return response


def latest_response(newest_first: Iterable[bytes]) -> dict[str, Any] | None:
    """The `response` object of the newest event that carries one (response.created, .in_progress,
    .completed, .incomplete, .failed), from events newest first."""
    for raw in newest_first:
        if b'"response"' not in raw:
            continue
        try:
            data = orjson.loads(SSEEvent(raw).data_bytes())
        except orjson.JSONDecodeError:
            continue
        response = data.get("response") if isinstance(data, dict) else None
        if isinstance(response, dict):
            return response
    return None
