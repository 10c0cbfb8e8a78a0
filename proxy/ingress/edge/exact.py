"""Requests to an exact path go straight to its handler, past aiohttp's router.

aiohttp's `Application._handle` resolves every request anew: it walks the path's parts up to "/" through
the router's index (a `resolve` per candidate), makes a match info with the app stack, then looks for an
Expect header and middlewares: ~190 Python bytecodes per request (bench/bytecodes.py). For a path whose
first candidate in that index is a plain resource with one route for every method (`add_route("*", path)`,
as app.py registers the LLM endpoints), the router's answer is always that route, so it is known at
start-up: one dict lookup gives the handler and a match info made once (frozen and shared: nothing writes
to a plain resource's empty match dict). Everything else (other paths, an `Expect` header, an app with
middlewares or domain-matched sub-apps) goes through `Application._handle` unchanged.

Relies on the router's `_resource_index`, `_matched_sub_app_resources`, `Resource._routes`, the app's
`_run_middlewares` and `Request._match_info`: tests/test_edge_exact.py pins them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import hdrs, web
from aiohttp.web_urldispatcher import PlainResource, UrlMappingMatchInfo

RequestHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def exact_routes(app: web.Application) -> dict[str, tuple[UrlMappingMatchInfo, RequestHandler]]:
    """Path -> (match info, handler) for every path the router always answers with the same route; empty
    when the app runs middlewares or has domain-matched sub-apps (both must see every request).
    Call once the app is frozen (the runner's setup): the router no longer changes."""
    router = app.router
    if app._run_middlewares or router._matched_sub_app_resources:
        return {}
    routes: dict[str, tuple[UrlMappingMatchInfo, RequestHandler]] = {}
    for path, candidates in router._resource_index.items():
        first = candidates[0] if candidates else None
        if type(first) is not PlainResource or first.canonical != path or list(first._routes) != [hdrs.METH_ANY]:
            continue  # the router may pick another route, by method or by a later candidate
        route = first._routes[hdrs.METH_ANY]
        match_info = UrlMappingMatchInfo({}, route)
        match_info.add_app(app)
        match_info.freeze()
        routes[path] = (match_info, route.handler)
    return routes


def request_handler(app: web.Application) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """The server's request handler for `app`: exact paths by a lookup, the rest by `app._handle`.
    A plain function returning the handler's coroutine: no coroutine level of its own."""
    generic = app._handle
    routes = exact_routes(app)
    if not routes:
        return generic

    def handle(request: web.Request) -> Awaitable[web.StreamResponse]:
        found = routes.get(request.rel_url.path_safe)  # the key aiohttp's router matches on
        if found is None or hdrs.EXPECT in request.headers:
            return generic(request)  # (the Expect handling is the route's: left to aiohttp)
        request._match_info, handler = found
        return handler(request)

    return handle
