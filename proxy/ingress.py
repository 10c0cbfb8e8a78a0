"""Public handlers and `handle(call)`: THE data path, read top to bottom.

identify tenant -> read and parse the body once -> resolve the route -> admission (limits) ->
scheduler (a queue slot) -> dispatch -> relay.
Every proxy-made refusal is a `ProxyError` rendered by `errors.render`; metrics and the access log
are fed once, in `finally`, from the `Call`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from functools import partial
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict

from proxy.call import Call
from proxy.errors import (
    AuthenticationFailed,
    InvalidRequest,
    MissingModel,
    NoRoute,
    Protocol,
    ProxyError,
    UpstreamTimeout,
    render,
)
from proxy.flow.admit import NOTHING
from proxy.flow.scheduler import PRIORITY_HEADER
from proxy.headers import client_headers
from proxy.policy.plan import Plan, TenantRule
from proxy.providers import exchange as exchanges
from proxy.redact import Redactor
from proxy.request_body import read_body
from proxy.runtime import STATE, Runtime
from proxy.streaming import relay, whole
from proxy.tasks import Deadline
from proxy.upstream import dispatch

# Endpoints whose body must name a model; other /v1 paths pass through with model "".
_MODEL_REQUIRED = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/messages",
        "/v1/messages/count_tokens",
        "/v1/responses",
    }
)
QUEUE_WAIT_HEADER = "x-signalbox-queue-wait-ms"
"""On every answer: how long the request waited in its queue before it was sent (0: it did not wait)."""
CLIENT_CLOSED = 499  # nginx's convention for "client closed the request"
log = logging.getLogger("signalbox.ingress")


def new_request_id() -> str:
    """24 hex digits. A correlation id, not a secret: the Mersenne Twister, not a getrandom() call per request."""
    return f"{random.getrandbits(96):024x}"


def request_id_of(headers: Mapping[str, str]) -> str:
    """The client's x-request-id if it is a plain token (printable ASCII, at most 128 characters), else a
    new one: it is echoed in a response header and written to the access log, which take no other bytes."""
    sent = headers.get("x-request-id")
    if sent and len(sent) <= 128 and sent.isascii() and sent.isprintable():
        return sent
    return new_request_id()


Stage = Callable[[web.Request, Call, Runtime], Awaitable[web.StreamResponse]]


async def proxy_handler(request: web.Request) -> web.StreamResponse:
    return await _served(request, handle, "anthropic" if request.path.startswith("/v1/messages") else "openai")


async def models_handler(request: web.Request) -> web.StreamResponse:
    """GET /v1/models and /v1/models/{id}: answered by the proxy from the policy, in the caller's protocol
    (the anthropic SDK sends `anthropic-version` and expects Anthropic's Models API shape)."""
    return await _served(request, list_models, "anthropic" if "anthropic-version" in request.headers else "openai")


async def _served(request: web.Request, stage: Stage, protocol: Protocol) -> web.StreamResponse:
    """One request through `stage`: errors in the client's protocol, then metrics and the access log."""
    state = request.app[STATE]
    call = Call(
        request_id=request_id_of(request.headers),
        plan=state.plans.current,
        method=request.method,
        path=request.rel_url.raw_path,  # percent-encoded as sent: matched and forwarded without decoding
        protocol=protocol,
        started=time.perf_counter(),
    )
    state.in_flight += 1
    try:
        return await stage(request, call, state)
    except ProxyError as err:
        call.status = err.status
        call.error = err.reason
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
        return render(internal, call.protocol, call.request_id)
    except asyncio.CancelledError:
        call.client_gone = True
        call.status = call.status or CLIENT_CLOSED
        raise
    finally:
        state.in_flight -= 1
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
    await read_body(request, call, plan.max_body_size, state.settings.client_timeouts)
    call.route = resolve(call, plan)
    asked = request.headers.get(PRIORITY_HEADER)
    if call.route.batch is not None:  # embeddings: limits taken one by one, one queue slot per batch
        async with state.scheduler.enter(call, asked, slot=False):
            return await state.batcher.submit(request, call)
    waiting = call.waiting = _waiting_room(request, call, state)
    entry = state.scheduler.enter(call, asked, waiting)
    if entry is NOTHING:
        return await forward(request, call, state, None)  # no limit, no queue: nothing to enter or leave
    try:
        async with entry:
            return await forward(request, call, state, waiting)
    except ProxyError as err:
        if waiting is None or waiting.response is None:
            raise
        return await waiting.fail(err)  # the 200 already went out while queued: an error event


def _waiting_room(request: web.Request, call: Call, state: Runtime) -> relay.QueuedStream | None:
    """Streams on a queue with heartbeat_while_queued get their headers early if they must wait."""
    queue = call.route.queue if call.route is not None else None
    if not call.stream or queue is None or not queue.heartbeat:
        return None
    assert call.route is not None
    settings = relay.route_settings(state.stream_settings, call.route.stream)
    return relay.QueuedStream(request, call, settings.heartbeat)


async def forward(
    request: web.Request, call: Call, state: Runtime, waiting: relay.QueuedStream | None
) -> web.StreamResponse:
    """Dispatch (retries, fallbacks) and relay; `timeouts.total` counts from here, after any wait for
    admission or a slot, and covers every retry and fallback."""
    assert call.route is not None
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
        return await _relay(request, call, state, sent, waiting, guard, deadline)
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


def _relay(
    request: web.Request, call: Call, state: Runtime, sent: dispatch.Sent, waiting: relay.QueuedStream | None,
    guard: Deadline, deadline: float,
) -> Awaitable[web.StreamResponse]:
    """The relay of what dispatch got: a stream, or a whole body (passed on as is or transformed). A plain
    call that returns the relay's coroutine, so the path has no extra coroutine for it."""
    assert call.route is not None and call.exchange is not None
    upstream = sent.response
    call.status = upstream.status
    redact = state.secrets.current  # errors: every secret; a success's headers: what went upstream
    headers = _answer_headers(call, sent, redact)
    prepared = waiting.response if waiting is not None else None  # out while queued, here or in dispatch
    exchange = call.exchange
    if call.stream and upstream.status == 200 and upstream.content_type == "text/event-stream":
        guard.cancel()  # past the headers, the stream's watchdog owns every time limit
        translator = exchanges.stream_translator(exchange, call.body or {}, call.model, int(call.started_wall))
        settings = relay.route_settings(state.stream_settings, call.route.stream)
        return relay.respond_stream(
            request, call, upstream, headers, sent.route.timeouts, settings, deadline, translator,
            state.open_streams, prepared, redact,
        )
    transform = None
    if exchange.kind != "pass" or upstream.status >= 400:
        model, created = call.model, int(call.started_wall)
        transform = partial(exchanges.response_body, exchange, model=model, created=created, redact=redact)
    # A stream request answered with a whole body (an error, or a server that ignores `stream`) has no
    # socket read timeout (streams are timed by the relay's watchdog): first_token bounds that read.
    read_timeout = sent.route.timeouts.first_token if call.stream else None
    if prepared is not None and waiting is not None:
        return waiting.relay_whole(upstream, transform, read_timeout, sent.body)
    return whole.respond_whole(call, upstream, headers, transform, read_timeout, request=request, whole=sent.body)


def _answer_headers(call: Call, sent: dispatch.Sent, redact: Redactor) -> CIMultiDict[str]:
    """The upstream's headers for the client, with who answered, how, and how long the request waited.
    A success's headers are searched for what went upstream (the answering upstream's secrets), an
    error's for every secret."""
    assert call.route is not None
    upstream = sent.response
    answered_by = call.plan.upstreams.get(sent.deployment.upstream)
    headers = client_headers(
        upstream.headers.items(), request_id=call.request_id, route=call.route.name, upstream_name=call.upstream,
        hide=answered_by.hide_response_headers if answered_by is not None else None,
        redact=redact if upstream.status >= 400 or answered_by is None else answered_by.secrets,
    )
    dispatch.annotate(headers, call, sent)
    headers[QUEUE_WAIT_HEADER] = _ms(call.queue_wait)
    return headers


def has_dot_segment(raw_path: str) -> bool:
    """A `.` or `..` segment, plain or percent-encoded. Routes match the path as sent, but the upstream (or
    the CDN in front of it) resolves dot segments (RFC 3986 §5.2.4): `/v1/chat/../files` would pass a
    route limited to `/v1/chat/*` and reach the Files API with the platform's key. Refused, not resolved:
    no SDK sends them."""
    for segment in raw_path.split("/"):
        if segment.replace("%2e", ".").replace("%2E", ".") in (".", ".."):
            return True
    return False


def _ms(seconds: float) -> str:
    return str(round(seconds * 1000))


def identify(request: web.Request, plan: Plan) -> TenantRule:
    """Which tenant is calling, by the policy's identification mode."""
    ident = plan.identify
    if ident.mode == "api_key":
        key = _bearer(request.headers.get("authorization")) or request.headers.get("x-api-key")
        if not key:
            raise AuthenticationFailed(
                "no API key: send your Signalbox key as 'Authorization: Bearer <key>' (or x-api-key)"
            )
        tenant = plan.tenant_for_key(key)
        if tenant is None:
            raise AuthenticationFailed("the API key is not known to this proxy; check the key your app sends")
        return tenant
    name = request.headers.get(ident.header) if ident.mode in ("header", "passthrough") else None
    name = name or ident.tenant
    if name is None:
        raise AuthenticationFailed(f"no tenant: send the {ident.header} header")
    tenant_rule = plan.tenants.get(name)
    if tenant_rule is None:
        shown = f"'{name}'" if len(name) <= 64 and name.isascii() and name.isprintable() else "(not shown)"
        raise AuthenticationFailed(f"unknown tenant {shown} in the {ident.header} header")
    return tenant_rule


def _bearer(value: str | None) -> str | None:
    if value and value[:7].lower() == "bearer ":
        return value[7:].strip() or None
    return None


def resolve(call: Call, plan: Plan) -> Any:
    assert call.tenant is not None
    if not call.model and call.path in _MODEL_REQUIRED:
        raise MissingModel("the request body must name a 'model'", param="model")
    route = plan.resolve(call.path, call.model, call.tenant)
    if route is None:
        models = plan.models_for(call.tenant)
        allowed = ", ".join(models) if models else "none"
        what = f"model '{call.model}' on {call.path}" if call.model else call.path
        raise NoRoute(
            f"no route for {what} for tenant '{call.tenant.name}'. Models you may use: {allowed}",
            param="model" if call.model else None,
        )
    return route


async def list_models(request: web.Request, call: Call, state: Runtime) -> web.Response:
    """The models the tenant's routes take, from the policy (no upstream call)."""
    protocol = call.protocol
    call.tenant = tenant = identify(request, call.plan)
    models = call.plan.models_for(tenant)
    wanted = request.match_info.get("model")
    headers = {"x-request-id": call.request_id, QUEUE_WAIT_HEADER: "0"}
    if protocol == "anthropic":
        headers["request-id"] = call.request_id
    entry = _anthropic_model if protocol == "anthropic" else _openai_model
    created = int(state.started_wall)
    body: dict[str, Any]
    if wanted is not None:
        call.model = wanted
        if wanted not in models:
            raise NoRoute(f"model '{wanted}' is not available to you. Models you may use: {', '.join(models)}")
        body = entry(wanted, created)
    elif protocol == "anthropic":
        body = {
            "data": [entry(m, created) for m in models],
            "has_more": False,
            "first_id": models[0] if models else None,
            "last_id": models[-1] if models else None,
        }
    else:
        body = {"object": "list", "data": [entry(m, created) for m in models]}
    call.status = 200
    data = orjson.dumps(body)
    call.bytes_out = len(data)
    return web.Response(body=data, content_type="application/json", headers=headers)


def _openai_model(model: str, created: int) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": created, "owned_by": "signalbox"}


def _anthropic_model(model: str, created: int) -> dict[str, Any]:
    stamp = datetime.fromtimestamp(created, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"type": "model", "id": model, "display_name": model, "created_at": stamp}
