"""`POST /signalbox/v1/stream`: one unified request answered as server-sent events.

The body is `{"path": "/v1/chat/completions" | "/v1/responses" | "/v1/messages", "body": {...}}`. Refused
before anything went out (authentication, a bad body, no route, a limit without a queue, an upstream's
error answer): the HTTP status with `{"type": "error", "error": {...}}` and Retry-After where it applies.
From the first event on (queued or streamed) the status is 200 and every ending is an event."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
from aiohttp import web

from proxy.call import Call
from proxy.errors import InvalidRequest, ProxyError
from proxy.ingress.identify import identify, request_id_of
from proxy.ingress.read import read_body
from proxy.ingress.unified import resume
from proxy.ingress.unified.run import new_call, serve, stream_body, target_of
from proxy.runtime import STATE
from proxy.streaming.unified.channel import STREAM_ID_HEADER, SSEChannel
from proxy.streaming.unified.events import error_payload
from proxy.streaming.unified.relay import UpstreamAnswer
from proxy.telemetry.outcome import judge


async def sse_handler(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    request_id = request_id_of(request.headers)
    channel = SSEChannel(request, request_id)
    call: Call | None = None
    try:
        tenant = identify(request, state.plans.current)
        if STREAM_ID_HEADER in request.headers:
            return await resume.sse(request, state, tenant, request_id)
        envelope = new_call(state, request_id, "/v1/chat/completions")
        await read_body(request, envelope, envelope.plan.max_body_size, state.settings.client_timeouts)
        given = envelope.body
        if given is None:
            raise InvalidRequest('send {"path": "/v1/chat/completions", "body": {...}} as the JSON body')
        path = target_of(given.get("path"))
        call = new_call(state, request_id, path)
        call.started = envelope.started
        # The upstream must not see how the client reached the proxy (its query, or this path).
        upstream_view = request.clone(rel_url=path)
        await serve(upstream_view, state, channel, call, tenant, stream_body(given.get("body"), path))
    except ProxyError as err:
        if call is None:
            _count_refusal(state, request_id, err)
        return _refused(err.status, error_payload(err), err.response_headers(), request_id)
    except UpstreamAnswer as answer:
        headers = {k: v for k, v in answer.headers.items() if k.lower() in _KEPT}
        return _refused(answer.status, answer.payload, headers, request_id)
    except asyncio.CancelledError:
        raise
    return channel.response if channel.response is not None else web.Response(status=204)


async def cancel_handler(request: web.Request) -> web.Response:
    """`DELETE /signalbox/v1/stream` with `x-signalbox-stream-id`: stop a resumable stream (204)."""
    state = request.app[STATE]
    request_id = request_id_of(request.headers)
    try:
        await resume.stop(request, identify(request, state.plans.current))
    except ProxyError as err:
        return _refused(err.status, error_payload(err), err.response_headers(), request_id)
    return web.Response(status=204, headers={"x-request-id": request_id})


_KEPT = frozenset({"retry-after", "retry-after-ms", "x-should-retry", "x-request-id", "x-signalbox-route"})


def _refused(status: int, payload: dict[str, Any], headers: dict[str, str], request_id: str) -> web.Response:
    body = orjson.dumps({"type": "error", **payload})
    return web.Response(status=status, body=body, content_type="application/json",
                        headers={**headers, "x-request-id": request_id})


def _count_refusal(state: Any, request_id: str, err: ProxyError) -> None:
    """A refusal before the request had a target (authentication, the envelope): still one request in the
    metrics and the access log, as any refused request is."""
    call = new_call(state, request_id, "/signalbox/v1/stream")
    call.started = time.perf_counter()
    call.status, call.error, call.failure = err.status, err.reason, err
    judge(call)
    state.metrics.record(call)
    state.access_log.write(call)
