"""One unified request through the data path every request takes: the tenant, the body parsed once, the
route, the flow (limits, queue, priority), dispatch (retries, fallbacks, timeouts) and the unified relay;
then the outcome, metrics and access log, fed once as `handler._served` feeds them.

What differs from `handler.handle`: the body comes from the unified request (an SSE POST's envelope or a
WebSocket message), always streams, asks OpenAI-compatible chat upstreams for their usage, and a refusal
becomes an `error` event once anything went out (or the HTTP status on SSE before that).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from functools import partial
from typing import Any

import orjson
from aiohttp import web

from proxy.call import Call
from proxy.errors import BodyTooLarge, InvalidRequest, Protocol, ProxyError
from proxy.flow.admit import NOTHING
from proxy.flow.scheduler import PRIORITY_HEADER
from proxy.ingress.handler import forward
from proxy.ingress.identify import resolve
from proxy.policy.plan import TenantRule
from proxy.runtime import Runtime
from proxy.streaming.resume.hub import Hub
from proxy.streaming.settings import route_settings
from proxy.streaming.unified import relay as unified
from proxy.streaming.unified.channel import Channel
from proxy.streaming.unified.events import CANCELLED, STREAM_COMPLETE
from proxy.streaming.unified.waiting import UnifiedWaiting
from proxy.telemetry.outcome import CLIENT_CLOSED, judge

log = logging.getLogger("signalbox.unified")

TARGETS: Mapping[str, Protocol] = {
    "/v1/chat/completions": "openai",
    "/v1/responses": "openai",
    "/v1/messages": "anthropic",
}
"""The APIs a unified request may name (`path`), and the protocol of their request bodies."""
_USAGE_PATHS = frozenset({"/v1/chat/completions"})


def target_of(path: object) -> str:
    if path is None:
        return "/v1/chat/completions"
    if not isinstance(path, str) or path not in TARGETS:
        raise InvalidRequest(f"'path' must be one of {', '.join(TARGETS)}", param="path")
    return path


def stream_body(body: object, path: str) -> dict[str, Any]:
    """The request body as it goes upstream: streamed, and for chat completions with the usage chunk."""
    if not isinstance(body, dict):
        raise InvalidRequest("'body' must be a JSON object: the request body of the API 'path' names", param="body")
    out = {**body, "stream": True}
    if path in _USAGE_PATHS:
        options = body.get("stream_options")
        out["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    return out


async def serve(
    request: web.Request,
    state: Runtime,
    channel: Channel,
    call: Call,
    tenant: TenantRule,
    body: dict[str, Any],
) -> None:
    """Run `call` to its end; every ending reaches the client as events (or, on SSE before the 200, raises
    the ProxyError or UpstreamAnswer the SSE handler renders). Cancellation is re-raised after the
    request's `stream_complete` (finish_reason `cancelled`) went out on a socket that is still open."""
    state.in_flight += 1
    try:
        await _run(request, state, channel, call, tenant, body)
    except ProxyError as err:
        call.failure = err
        call.error = err.reason
        if not channel.opened:
            call.status = err.status
            raise
        call.status = call.status or 200
        await _quietly(channel.fail(err), call)
    except unified.UpstreamAnswer:
        raise
    except asyncio.CancelledError:
        call.client_gone = True
        call.status = call.status or CLIENT_CLOSED
        await _quietly(channel.send(channel.encoder.encode(STREAM_COMPLETE, {"finish_reason": CANCELLED})), call)
        raise
    except ConnectionResetError:
        call.client_gone = True
        call.status = call.status or CLIENT_CLOSED
    except Exception:
        log.exception("unified request %s failed inside the proxy", call.request_id)
        internal = ProxyError(f"internal error in the proxy (request id {call.request_id}); please report it")
        call.failure, call.error, call.status = internal, internal.reason, internal.status
        if not channel.opened:
            raise internal from None
        await _quietly(channel.fail(internal), call)
    finally:
        state.in_flight -= 1
        judge(call)
        state.metrics.record(call)
        state.access_log.write(call)


async def _quietly(sending: Any, call: Call) -> None:
    """A last event to a client that may have left meanwhile."""
    try:
        await sending
    except (ConnectionResetError, RuntimeError):
        call.client_gone = True


async def _run(
    request: web.Request, state: Runtime, channel: Channel, call: Call, tenant: TenantRule, body: dict[str, Any]
) -> None:
    plan = call.plan
    call.tenant = tenant
    call.raw_body = orjson.dumps(body)
    if len(call.raw_body) > plan.max_body_size:
        raise BodyTooLarge(f"the request body is over this proxy's limit of {plan.max_body_size} bytes")
    call.body = body
    model = body.get("model")
    call.model = model if isinstance(model, str) else ""
    call.stream = True
    call.route = route = resolve(call, plan)
    if route.batch is not None:
        raise InvalidRequest(f"route '{route.name}' merges embeddings into batches: it has no stream")
    stream = route_settings(state.stream_settings, route.stream)
    heartbeat = stream.heartbeat
    if stream.resumable is not None:
        channel.stream_id = Hub.new_id()  # named from the first event on, queued ones included
    waiting = call.waiting = UnifiedWaiting(channel, call, heartbeat)
    respond = partial(unified.respond, channel)
    entry = state.scheduler.enter(call, request.headers.get(PRIORITY_HEADER), waiting)
    if entry is NOTHING:
        await forward(request, call, state, respond)
        return
    async with entry:
        await forward(request, call, state, respond)


def new_call(state: Runtime, request_id: str, path: str) -> Call:
    return Call(
        request_id=request_id,
        plan=state.plans.current,
        method="POST",
        path=path,
        protocol=TARGETS.get(path, "openai"),
        started=time.perf_counter(),
    )
