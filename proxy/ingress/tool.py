"""Tool routes (`provider: http`): any path outside /v1 that a `provider: http` route's prefix covers.

The same stages as an LLM call (tenant, limits, queue and priority, dispatch with its timeouts, retries,
breaker and fallbacks, the relay, metrics and the access log), without what only LLM calls have: the
body is read as bytes within `max_body_size` and never parsed (no model, no token estimate), and the
answer is relayed as it came. Proxy-made errors use the neutral JSON shape (errors.py `neutral_body`).
A client that accepts `text/event-stream` is relayed a streamed answer event by event; a chunked answer
passes through as it arrives; one with a Content-Length is read whole first (so a connection cut mid-body
can still be retried), a larger one than `max_buffered_response` passes through as it arrives.
"""

from __future__ import annotations

from functools import partial

from aiohttp import web

from proxy.call import Call
from proxy.errors import InvalidRequest, NoRoute
from proxy.flow.admit import NOTHING
from proxy.flow.scheduler import PRIORITY_HEADER
from proxy.ingress.handler import _served, forward
from proxy.ingress.identify import has_dot_segment, identify
from proxy.ingress.read import read_raw
from proxy.policy.plan import Plan, RouteRule
from proxy.runtime import STATE, Runtime

_OWN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


async def tool_handler(request: web.Request) -> web.StreamResponse:
    """Every path the router has no other route for. A path no tool route covers gets the router's own
    refusal, as before tool routes existed (a 404 naming what the port serves; a 405 on the proxy's paths)."""
    path = request.rel_url.raw_path
    state = request.app[STATE]
    if not any(route.paths(path) for route in state.plans.current.tools):
        if path in _OWN_PATHS:
            raise web.HTTPMethodNotAllowed(request.method, ["GET", "HEAD"])
        raise web.HTTPNotFound()
    return await _served(request, handle_tool, "neutral", state)


async def handle_tool(request: web.Request, call: Call, state: Runtime) -> web.StreamResponse:
    plan = call.plan
    if ("." in call.path or "%" in call.path) and has_dot_segment(call.path):
        raise InvalidRequest("the path has a '.' or '..' segment; send the path without them", param="path")
    call.tenant = identify(request, plan)
    call.route = tool_route(call.path, call.tenant.name, plan)
    await read_raw(request, call, plan.max_body_size, state.settings.client_timeouts)
    accept = request.headers.get("Accept")
    call.stream = accept is not None and "text/event-stream" in accept
    asked = request.headers.get(PRIORITY_HEADER)
    if call.route.cache is not None:  # as on the LLM routes: after identification, before limits and queue
        return await state.cache.serve(request, call, partial(_admitted, request, call, state, asked),
                                       partial(state.scheduler.own_limits, call, asked))
    return await _admitted(request, call, state, asked)


async def _admitted(request: web.Request, call: Call, state: Runtime, asked: str | None) -> web.StreamResponse:
    entry = state.scheduler.enter(call, asked, None)
    if entry is NOTHING:
        return await forward(request, call, state)
    async with entry:
        return await forward(request, call, state)


def tool_route(path: str, tenant: str, plan: Plan) -> RouteRule:
    """The first tool route, in policy order, whose prefix covers the path and which admits the tenant."""
    for route in plan.tools:
        if (route.tenants is None or tenant in route.tenants) and route.paths(path):
            return route
    raise NoRoute(f"no tool route for this path for tenant '{tenant}'")  # the path may hold a key: not quoted
