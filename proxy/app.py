"""Builds the aiohttp applications (public and admin) and runs them with a graceful life cycle.

`build_app(plan, settings)` returns a fresh app with all state under `STATE`, so every test builds
its own. `serve()` runs it on uvloop with our own signal handling: on SIGTERM readiness fails at
once, the proxy keeps accepting for `shutdown_grace` (endpoints need time to update), then stops
accepting and lets in-flight requests finish for up to `drain_timeout`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator

import orjson
from aiohttp import web

from proxy import lifecycle
from proxy.admin import build_admin_app
from proxy.errors import ServiceUnavailable
from proxy.ingress import handler as ingress
from proxy.ingress import tool
from proxy.ingress.edge.connection import GuardedRunner
from proxy.ingress.realtime import relay as realtime
from proxy.ingress.realtime.sessions import Sessions
from proxy.ingress.unified import frontend
from proxy.ingress.unified import socket as unified_socket
from proxy.ingress.unified import sse as unified_sse
from proxy.ops import health
from proxy.policy.plan import Plan
from proxy.runtime import STATE, PlanRef, Runtime, Settings
from proxy.streaming.resume.hub import HUB
from proxy.tasks import spawn
from proxy.telemetry import tracing

log = logging.getLogger("signalbox")
# aiohttp's own cap; the policy's max_body_size (checked by ingress) is the real, reloadable limit.
_HARD_BODY_CAP = 1024**3
UNIFIED_PATH = "/signalbox/v1/stream"
"""The unified event stream: POST for SSE, GET upgraded to a WebSocket (docs/apps/unified-stream.md)."""


def build_app(plan: Plan, settings: Settings | None = None) -> web.Application:
    settings = settings or Settings()
    runtime = Runtime(plans=PlanRef(plan), settings=settings)
    runtime.access_log.enabled = settings.access_log
    runtime.tracer = tracing.from_env(os.environ)  # off (and the SDK never imported) by default
    app = web.Application(client_max_size=_HARD_BODY_CAP)
    app[STATE] = runtime
    app[realtime.SESSIONS] = Sessions()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/models", ingress.models_handler)
    app.router.add_get("/v1/models/{model:.+}", ingress.models_handler)
    app.router.add_post(UNIFIED_PATH, unified_sse.sse_handler)
    app.router.add_get(UNIFIED_PATH, unified_socket.socket_handler)
    app.router.add_delete(UNIFIED_PATH, unified_sse.cancel_handler)
    frontend.add_routes(app, settings.demo)  # the browser module, and the demo page with `serve --demo`
    app.router.add_get("/v1/realtime", realtime.realtime_handler)  # before /v1/* takes every other path
    for path in ingress.EXACT_PATHS:  # the same handler as /v1/*, matched without a regex
        app.router.add_route("*", path, ingress.handler_for(path, runtime))
    app.router.add_route("*", "/v1/{tail:.*}", ingress.catch_all(runtime))
    app.router.add_route("*", "/{tail:.*}", tool.tool_handler)  # tool routes: every other path (last)
    app[HUB] = runtime.streams
    app.cleanup_ctx.append(_limiter_store)
    app.cleanup_ctx.append(_cache_store)
    app.cleanup_ctx.append(_streams)
    app.cleanup_ctx.append(_upstreams)
    app.on_cleanup.append(_flush_access_log)
    if runtime.tracer.on:
        app.on_cleanup.append(_stop_tracing)
    return app


async def _stop_tracing(app: web.Application) -> None:
    await app[STATE].tracer.shutdown()  # the spans still queued are exported


async def _flush_access_log(app: web.Application) -> None:
    app[STATE].access_log.flush()  # lines of the last ~100 ms still sit in the buffer


async def _limiter_store(app: web.Application) -> AsyncIterator[None]:
    """The limiter store the policy's `state` names, opened once: plan swaps reconfigure it, never
    replace it (changing `state` needs a restart). Closed after the upstreams, when nothing is in flight."""
    runtime = app[STATE]
    rule = runtime.plans.current.state
    if runtime.reloader is not None:

        async def restart_needed(plan: Plan, loaded: object) -> None:
            if plan.state != rule:
                log.warning("policy reload: `state` changed; it applies at the next restart (limits stay put)")

        runtime.reloader.on_swap(restart_needed)
    if rule.backend != "redis":
        yield
        return
    from proxy.admission.redis.store import RedisStore  # only replicas sharing limits pay for the import

    store = RedisStore.open(rule, runtime.metrics)
    await store.start()  # never fails: without Redis it starts on local limits
    runtime.admission.store = store
    try:
        yield
    finally:
        await store.close()


async def _cache_store(app: web.Application) -> AsyncIterator[None]:
    """With `state.backend: redis` the response cache lives in Redis too, shared by the replicas; read at
    start-up like the limiter store (changing `state` needs a restart)."""
    runtime = app[STATE]
    rule = runtime.plans.current.state
    if rule.backend != "redis":
        yield
        return
    from proxy.cache.shared import opened  # only replicas sharing state pay for the import

    async with opened(rule, runtime.metrics.cache) as store:
        runtime.cache.store = store
        yield


async def _streams(app: web.Application) -> AsyncIterator[None]:
    """Resumable streams: mirrored to Redis Streams with the Redis state backend (its own pool), so a
    resume that reaches another replica reads them; closed after the upstreams."""
    runtime = app[STATE]
    rule = runtime.plans.current.state
    if rule.backend == "redis" and rule.url is not None:
        from proxy.admission.redis.client import connect  # only replicas sharing state pay for the import
        from proxy.streaming.resume.redis_events import RedisEvents

        client, _ = connect(rule)
        runtime.streams.shared = RedisEvents(client, rule.key_prefix)
    try:
        yield
    finally:
        await runtime.streams.close()


async def _upstreams(app: web.Application) -> AsyncIterator[None]:
    runtime = app[STATE]
    await runtime.clients.configure(runtime.plans.current)
    runtime.metrics.set_policy(runtime.plans.current.digest)
    watcher = None
    if runtime.reloader is not None:
        lifecycle.attach(runtime)
        watcher = spawn(
            runtime.reloader.watch(
                runtime.settings.reload_interval, lambda: lifecycle.reload_policy(runtime, "watch")
            ),
            name="policy-watch",
        )
    runtime.ready = True
    yield
    runtime.ready = False
    if watcher is not None:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    await runtime.batcher.close()
    await runtime.clients.close()


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text, redacted: label values are policy names, but nothing secret may leave anyway."""
    runtime = request.app[STATE]
    response = await runtime.metrics.handle(request)
    if isinstance(response.body, bytes):
        response.body = runtime.secrets.current.scrub(response.body)
    return response


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers. Never depends on upstreams (an outage must not restart us)."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    runtime = request.app[STATE]
    ok = runtime.ready and not runtime.draining
    body = {
        "ready": ok,
        "draining": runtime.draining,
        "policy": runtime.plans.current.digest[:12],
        "in_flight": runtime.in_flight,
    }
    # Where limits live; a degraded shared store (Redis down, local limits) is reported, never unready.
    describe = getattr(runtime.admission.store, "describe", None)
    body["limits"] = describe() if describe is not None else {"backend": "memory"}
    body["cache"] = runtime.cache.describe()  # where cached answers live; a Redis outage only degrades
    # One word from the detailed view (admin port, /healthz/details): an open circuit degrades, never unreadies.
    body["health"] = health.overall(health.gather(runtime))
    return web.Response(status=200 if ok else 503, body=orjson.dumps(body), content_type="application/json")


async def serve(app: web.Application) -> None:
    """Run until SIGTERM/SIGINT, then drain (see module docstring)."""
    runtime = app[STATE]
    settings = runtime.settings
    admin = await _start_admin(app)
    runner = GuardedRunner(
        app, settings.client_timeouts, handle_signals=False, handler_cancellation=True, access_log=None,
        shutdown_timeout=_LAST_WORDS,
    )
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port, backlog=1024, reuse_address=True)
    await site.start()
    digest = runtime.plans.current.digest[:12]
    log.info("serving on http://%s:%s (policy %s)", settings.host, settings.port, digest)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(
        signal.SIGHUP, lambda: spawn(lifecycle.reload_policy(runtime, "sighup"), name="sighup-reload")
    )
    try:
        await stop.wait()
        await _drain(runtime, runner, site)
    finally:
        await runner.cleanup()
        await admin.cleanup()


_LAST_WORDS = 2.0
"""After the drain timeout: how long ended streams get to write their error event, and how long
aiohttp then waits for handlers before cancelling them. Counted in the chart's 10 s of margin."""
_POLL = 0.05


async def _drain(runtime: Runtime, runner: web.AppRunner, site: web.TCPSite) -> None:
    settings = runtime.settings
    loop = asyncio.get_running_loop()
    runtime.draining = True  # /readyz answers 503 from now on
    log.info("shutdown: readiness failing; accepting for %.1fs more", settings.shutdown_grace)
    await asyncio.sleep(settings.shutdown_grace)
    await site.stop()  # no new connections
    if runner.server is not None:
        runner.server.pre_shutdown()  # idle keep-alive connections close; busy ones after their response
    log.info("shutdown: stopped accepting; draining %d requests for up to %.1fs", runtime.in_flight,
             settings.drain_timeout)
    deadline = loop.time() + settings.drain_timeout
    # in_flight is a plain counter kept by ingress; a short poll bounds the wait without a hook there.
    while runtime.in_flight and loop.time() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(_POLL)
    if not runtime.in_flight:
        log.info("shutdown: drained")
        return
    log.warning("drain timeout: ending %d requests still in flight", runtime.in_flight)
    shutting_down = ServiceUnavailable("the proxy is shutting down; retry the request", should_retry=True)
    shutting_down.cause = "shutdown"
    # Nothing new goes upstream from here: a slot freed by an ended stream must not start another call.
    runtime.clients.refusing = runtime.admission.closing = shutting_down
    runtime.scheduler.shut(shutting_down)
    for end in list(runtime.open_streams):
        end(shutting_down)
    ended = loop.time() + _LAST_WORDS
    while runtime.open_streams and loop.time() < ended:  # noqa: ASYNC110 (same: a plain set)
        await asyncio.sleep(_POLL / 2)


async def _start_admin(app: web.Application) -> web.AppRunner:
    """The admin API on its own port, sharing the app's runtime (see proxy.admin)."""
    settings = app[STATE].settings
    runner = GuardedRunner(
        build_admin_app(app), settings.client_timeouts, admin=True, handle_signals=False, access_log=None,
        shutdown_timeout=1.0,
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, settings.admin_host, settings.admin_port, reuse_address=True).start()
    except BaseException:
        await runner.cleanup()
        raise
    log.info("admin API on http://%s:%s", settings.admin_host, settings.admin_port)
    return runner
