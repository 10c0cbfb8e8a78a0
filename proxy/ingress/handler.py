"""Public handlers and `handle(call)`: THE data path, read top to bottom.

identify tenant -> read and parse the body once -> resolve the route -> [the route's cache: a hit is
answered there, after its own limits] -> admission (limits) -> scheduler (a queue slot) -> dispatch -> relay.
Every proxy-made refusal is a `ProxyError` rendered by `errors.render`; metrics and the access log
are fed once, in `finally`, from the `Call`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from functools import partial

from aiohttp import web

from proxy.batching import split
from proxy.cache.answer import CACHE_HEADER
from proxy.call import Call
from proxy.errors import (
    InvalidRequest,
    Protocol,
    ProxyError,
    UpstreamTimeout,
    render,
)
from proxy.flow.admit import NOTHING
from proxy.flow.scheduler import PRIORITY_HEADER
from proxy.ingress import traced
from proxy.ingress.identify import MODEL_REQUIRED, has_dot_segment, identify, request_id_of, resolve
from proxy.ingress.models import list_models
from proxy.ingress.read import read_body
from proxy.runtime import STATE, Runtime
from proxy.streaming import relay
from proxy.streaming.resume import entry as resume
from proxy.tasks import Deadline
from proxy.telemetry.outcome import judge
from proxy.upstream import dispatch
from proxy.upstream.headers import QUEUE_WAIT_HEADER, client_headers

CLIENT_CLOSED = 499  # nginx's convention for "client closed the request"
log = logging.getLogger("signalbox.ingress")


Stage = Callable[[web.Request, Call, Runtime], Awaitable[web.StreamResponse]]
Respond = Callable[..., Awaitable[web.StreamResponse]]


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

EXACT_PATHS = MODEL_REQUIRED
"""The LLM endpoints that get a route of their own (app.py): aiohttp matches an exact path with one dict
lookup and a string compare, where `/v1/{tail:.*}` costs a walk up the path and a regex; the handler is the
same, its protocol decided once (`handler_for`)."""


def protocol_of(path: str) -> Protocol:
    """The client's protocol, by its path: Anthropic's Messages API, else OpenAI's."""
    return "anthropic" if path.startswith("/v1/messages") else "openai"


async def proxy_handler(request: web.Request, state: Runtime) -> web.StreamResponse:
    """/v1/* (but the exact paths and the proxy's own endpoints): `state` bound at start-up (`catch_all`)."""
    return await _served(request, handle, protocol_of(request.path), state)


def catch_all(state: Runtime) -> Handler:
    """`proxy_handler` with the app's runtime bound: no `request.app[STATE]` lookup per request."""
    return partial(proxy_handler, state=state)


def handler_for(path: str, state: Runtime) -> Handler:
    """`proxy_handler` for requests to `path` alone, with the protocol decided at start-up rather than
    per request (and one coroutine level less)."""
    return partial(_served, stage=handle, protocol=protocol_of(path), state=state)


async def models_handler(request: web.Request) -> web.StreamResponse:
    """GET /v1/models and /v1/models/{id}: answered by the proxy from the policy, in the caller's protocol
    (the anthropic SDK sends `anthropic-version` and expects Anthropic's Models API shape)."""
    protocol: Protocol = "anthropic" if "anthropic-version" in request.headers else "openai"
    return await _served(request, list_models, protocol, request.app[STATE])


async def _served(request: web.Request, stage: Stage, protocol: Protocol, state: Runtime) -> web.StreamResponse:
    """One request through `stage`: errors in the client's protocol, then metrics and the access log."""
    call = Call(
        request_id=request_id_of(request.headers),
        plan=state.plans.current,
        method=request.method,
        path=request.rel_url.raw_path,  # percent-encoded as sent: matched and forwarded without decoding
        protocol=protocol,
        started=time.perf_counter(),
    )
    call.trace = state.tracer.begin(call, request.headers)  # None when tracing is off
    state.in_flight += 1
    try:
        return await stage(request, call, state)
    except ProxyError as err:
        call.status = err.status
        call.error = err.reason
        call.failure = err
        err.headers[QUEUE_WAIT_HEADER] = _ms(call.queue_wait)
        return render(err, call.protocol, call.request_id)
    except ConnectionResetError:
        call.client_gone = True
        call.status = call.status or CLIENT_CLOSED
        raise
    except Exception:
        log.exception("request %s failed inside the proxy", call.request_id)
        internal = ProxyError(f"internal error in the proxy (request id {call.request_id}); please report it")
        call.status = internal.status
        call.error = internal.reason
        call.failure = internal
        return render(internal, call.protocol, call.request_id)
    except asyncio.CancelledError:
        call.client_gone = True
        call.status = call.status or CLIENT_CLOSED
        raise
    finally:
        state.in_flight -= 1
        judge(call)  # the outcome both of them record
        if call.trace is not None:
            traced.finish(request, call)
        state.metrics.record(call)
        state.access_log.write(call)


async def handle(request: web.Request, call: Call, state: Runtime) -> web.StreamResponse:
    plan = call.plan
    if ("." in call.path or "%" in call.path) and has_dot_segment(call.path):
        raise InvalidRequest(
            f"the path {call.path} has a '.' or '..' segment; send the path without them",
            param="path",
        )
    call.tenant = identify(request, plan)
    if plan.resumable and (read := await resume.intercept(request, call, state.stream_settings)) is not None:
        return read  # a resume of a stream already running (or its Responses API endpoints)
    await read_body(request, call, plan.max_body_size, state.settings.client_timeouts)
    call.route = resolve(call, plan)
    if call.route.cache is not None:  # looked up after identification, before limits and queue (proxy/cache)
        asked = request.headers.get(PRIORITY_HEADER)
        return await state.cache.serve(request, call, partial(admitted, request, call, state),
                                       partial(state.scheduler.own_limits, call, asked))
    return await admitted(request, call, state)


async def admitted(request: web.Request, call: Call, state: Runtime) -> web.StreamResponse:
    """Limits and a queue slot, then dispatch and the relay (or the batcher for embeddings)."""
    route = call.route
    assert route is not None
    if route.batch is not None or (route.split is not None and split.wanted(call)):
        # embeddings: limits taken one by one, one queue slot per batch (or per oversized call's parts)
        async with state.scheduler.enter(call, request.headers.get(PRIORITY_HEADER), slot=False):
            call.mark("dispatch")  # processing time counts from here (the batch's wait included)
            return await state.batcher.submit(request, call)
    queue = route.queue
    if queue is None and not route.limit_sets and not route.upstream_limited:
        return await forward(request, call, state)  # what `Scheduler.enter` would find: nothing to enter
    waiting = None
    if call.stream and queue is not None:  # only a queued stream can have a waiting room
        waiting = call.waiting = relay.waiting_room(request, call, state.stream_settings)
    entry = state.scheduler.enter(call, request.headers.get(PRIORITY_HEADER), waiting)
    if entry is NOTHING:
        return await forward(request, call, state)  # no limit, no queue: nothing to enter or leave
    try:
        async with entry:
            return await forward(request, call, state)
    except ProxyError as err:
        if waiting is None or waiting.response is None:
            raise
        return await waiting.fail(err)  # the 200 already went out while queued: an error event


async def forward(
    request: web.Request, call: Call, state: Runtime, respond: Respond = relay.respond
) -> web.StreamResponse:
    """Dispatch (retries, fallbacks), then the relay, called once for every kind of answer (stream, whole
    body, after a queued stream's early 200); `timeouts.total` counts from here, after any wait for
    admission or a slot, and covers every retry and fallback. `respond`: the unified stream's relay
    (proxy/streaming/unified/relay.py) answers in its own event model."""
    assert call.route is not None
    call.mark("dispatch")  # processing time and time to first token count from here (queue wait excluded)
    plan = call.plan
    total = call.route.timeouts.total
    deadline = time.monotonic() + total
    sent: dispatch.Sent | None = None
    guard = Deadline(total, state.deadlines)
    try:
        sent = await dispatch.dispatch(
            call,
            state.clients,
            request.headers,
            request.rel_url.raw_query_string,  # still percent-encoded: forwarded as the client sent it
            deadline=deadline,
        )
        upstream = sent.response
        call.status = upstream.status
        answered_by = plan.upstreams.get(sent.deployment.upstream)
        redact = state.secrets.current  # errors: every secret; a success's headers: what went upstream
        headers = client_headers(
            upstream.headers.items(), request_id=call.request_id, route=call.route.name, upstream_name=call.upstream,
            hide=answered_by.hide_response_headers if answered_by is not None else None,
            redact=redact if upstream.status >= 400 or answered_by is None else answered_by.secrets,
            protocol=call.protocol,
        )
        dispatch.annotate(headers, call, sent)
        if call.cache is not None:
            headers[CACHE_HEADER] = call.cache
        headers[QUEUE_WAIT_HEADER] = _ms(call.queue_wait) if call.queue_wait else "0"  # most never wait
        answer = relay.Answer(upstream, headers, sent.route.timeouts, deadline, redact, sent.body)
        if call.trace is not None:
            call.trace.relaying(sent.body.data if sent.body is not None and sent.body.complete else None)
        return await respond(request, call, answer, state.stream_settings, state.open_streams, guard)
    except (asyncio.CancelledError, TimeoutError) as exc:
        if isinstance(exc, asyncio.CancelledError) and not guard.expired():
            raise  # the client went away: not a timeout
        late = UpstreamTimeout("the request ran past its total deadline (timeouts.total)", should_retry=False)
        raise dispatch.counted(late, call) from None
    except ProxyError as err:
        raise dispatch.counted(err, call) from None
    finally:
        guard.cancel()
        if sent is not None:
            sent.done()


def _ms(seconds: float) -> str:
    return str(round(seconds * 1000))


