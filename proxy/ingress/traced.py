"""Ingress's end of a traced request: the request's priority class, resolved as the flow resolves it, for
its spans (proxy/telemetry/spans.py). Called only when tracing is on (`call.trace` set)."""

from __future__ import annotations

from aiohttp import web

from proxy.call import Call
from proxy.errors import ProxyError
from proxy.flow.scheduler import PRIORITY_HEADER, priority_of


def finish(request: web.Request, call: Call) -> None:
    """End the request's spans, once its outcome is judged."""
    trace = call.trace
    if trace is None:
        return
    trace.end(call, class_of(request, call))


def class_of(request: web.Request, call: Call) -> str | None:
    """The priority class the call ran in (None: no tenant, or an unknown class asked for)."""
    if call.tenant is None:
        return None
    try:
        return call.plan.priorities[priority_of(call.plan, call.tenant, request.headers.get(PRIORITY_HEADER))]
    except (ProxyError, IndexError):
        return None
