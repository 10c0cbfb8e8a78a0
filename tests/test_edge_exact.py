"""The exact-path dispatch (proxy/ingress/edge/exact.py) against aiohttp's router: over generated paths and
methods, a path it answers itself gets the route the router resolves, and what it does not answer goes to
the router. Also pins the aiohttp internals it reads (an upgrade that moves them fails here)."""

from __future__ import annotations

from collections.abc import Callable

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from aiohttp.web_urldispatcher import UrlMappingMatchInfo
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.ingress.edge import exact
from proxy.ingress.edge.connection import GuardedRunner
from proxy.ingress.handler import EXACT_PATHS
from proxy.runtime import ClientTimeouts

pytestmark = pytest.mark.timeout(60)

POLICY = """
identify: {mode: api_key}
upstreams:
  up: {provider: openai, base_url: "http://127.0.0.1:9/v1", api_key: "k"}
tenants:
  alpha: {keys: [sk-alpha]}
routes:
  - {name: all, upstream: up}
"""
METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS")
_EXACT = sorted(EXACT_PATHS)
PATHS = st.one_of(
    st.sampled_from(_EXACT),
    st.builds(lambda p, tail: p + tail, st.sampled_from(_EXACT), st.sampled_from(["/", "/x", "x", "%2F", "/.."])),
    st.builds(lambda p: p.replace("c", "%63", 1), st.sampled_from(_EXACT)),  # percent-encoded: same path_safe
    st.sampled_from(["/", "/v1", "/v1/", "/v1/models", "/v1/models/gpt", "/healthz", "/metrics", "/anything",
                     "/v1/realtime", "/signalbox/v1/stream", "/v1/files/abc", "//v1/chat/completions"]),
)


async def _router_route(app: web.Application, method: str, path: str) -> web.AbstractRoute | None:
    match = await app.router.resolve(make_mocked_request(method, path, app=app))
    return None if match.http_exception is not None else match.route


def _check(app: web.Application, routes: dict[str, tuple[UrlMappingMatchInfo, exact.RequestHandler]],
           method: str, path: str, resolved: web.AbstractRoute | None) -> None:
    found = routes.get(make_mocked_request(method, path, app=app).rel_url.path_safe)
    if found is not None:  # answered past the router: by the route the router picks, for every method
        match_info, handler = found
        assert resolved is not None and match_info.route is resolved and handler is resolved.handler, path
        assert match_info.apps == (app,) and match_info.current_app is app
        assert match_info.get("x") is None and len(match_info) == 0  # a plain resource's match dict is empty


@pytest.fixture
async def proxy_app(make_plan: Callable[[str], object]) -> web.Application:
    from proxy.app import build_app

    app = build_app(make_plan(POLICY))  # type: ignore[arg-type]
    app.freeze()
    return app


async def test_the_llm_paths_are_answered_past_the_router(proxy_app: web.Application) -> None:
    routes = exact.exact_routes(proxy_app)
    assert EXACT_PATHS <= set(routes)
    for path in EXACT_PATHS:
        for method in METHODS:
            _check(proxy_app, routes, method, path, await _router_route(proxy_app, method, path))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(METHODS), path=PATHS)
async def test_any_path_gets_the_route_the_router_picks(proxy_app: web.Application, method: str, path: str) -> None:
    routes = exact.exact_routes(proxy_app)
    _check(proxy_app, routes, method, path, await _router_route(proxy_app, method, path))


async def _ok(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def _get(request: web.Request) -> web.Response:
    return web.Response(text="get")


def _frozen(app: web.Application) -> web.Application:
    app.freeze()
    return app


async def test_only_paths_the_router_always_answers_the_same_way_are_taken() -> None:
    app = web.Application()
    app.router.add_get("/by-method", _get)  # GET has its own route: "*" takes the rest
    app.router.add_route("*", "/by-method", _ok)
    app.router.add_route("*", "/first/{tail:.*}", _get)  # a dynamic resource: never exact
    app.router.add_route("*", "/plain", _ok)
    app.router.add_resource("/plain", name="second").add_route("*", _get)  # a second resource: the first wins
    _frozen(app)
    routes = exact.exact_routes(app)
    assert set(routes) == {"/plain"}
    assert routes["/plain"][1] is _ok
    for method in METHODS:
        for path in ("/by-method", "/plain", "/first/x"):
            _check(app, routes, method, path, await _router_route(app, method, path))


async def test_an_app_with_middlewares_or_domain_sub_apps_keeps_the_router() -> None:
    @web.middleware
    async def mark(request: web.Request, handler: Callable[..., object]) -> web.StreamResponse:
        return await handler(request)  # type: ignore[misc, no-any-return]

    with_middleware = web.Application(middlewares=[mark])
    with_middleware.router.add_route("*", "/plain", _ok)
    assert exact.exact_routes(_frozen(with_middleware)) == {}
    with_domain = web.Application()
    with_domain.router.add_route("*", "/plain", _ok)
    sub = web.Application()
    sub.router.add_route("*", "/plain", _get)
    with_domain.add_domain("example.com", sub)
    assert exact.exact_routes(_frozen(with_domain)) == {}
    assert exact.request_handler(with_domain) == with_domain._handle


async def test_a_served_exact_path_sees_its_app_and_route_and_expect_still_works(loopback: object) -> None:
    seen: list[tuple[object, object]] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append((request.app, request.match_info.route.resource))
        return web.Response(text=str(len(await request.read())))

    app = web.Application()
    resource = app.router.add_resource("/plain")
    resource.add_route("*", handler)
    runner = GuardedRunner(app, ClientTimeouts(), access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    try:
        assert runner.server is not None and runner.server.request_handler != app._handle  # the fast path is on
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        async with aiohttp.ClientSession() as http:
            async with http.post(f"http://127.0.0.1:{port}/plain", data=b"abc") as resp:
                assert (resp.status, await resp.text()) == (200, "3")
            async with http.post(f"http://127.0.0.1:{port}/plain", data=b"abcd", expect100=True) as resp:
                assert (resp.status, await resp.text()) == (200, "4")  # Expect: through aiohttp's own handling
    finally:
        await runner.cleanup()
    assert seen == [(app, resource), (app, resource)]
