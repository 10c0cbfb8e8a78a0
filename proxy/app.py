"""Builds the aiohttp applications (public and admin) and runs them with a graceful life cycle.

`build_app(plan, settings)` returns a fresh app with all state under `STATE`, so every test builds
its own. `serve()` runs it on uvloop with our own signal handling: on SIGTERM readiness fails at
once, the proxy keeps accepting for `shutdown_grace` (endpoints need time to update), then stops
accepting and lets in-flight requests finish for up to `drain_timeout`.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator

import orjson
from aiohttp import web

from proxy import ingress
from proxy.admin import build_admin_app
from proxy.errors import ServiceUnavailable
from proxy.policy.load import LoadedPolicy
from proxy.policy.plan import Plan
from proxy.policy.reload import Listener
from proxy.tasks import spawn
from proxy.runtime import STATE, PlanRef, Runtime, Settings

log = logging.getLogger("signalbox")
# aiohttp's own cap; the policy's max_body_size (checked by ingress) is the real, reloadable limit.
_HARD_BODY_CAP = 1024**3


def build_app(plan: Plan, settings: Settings | None = None) -> web.Application:
    settings = settings or Settings()
    runtime = Runtime(plans=PlanRef(plan), settings=settings)
    runtime.access_log.enabled = settings.access_log
    app = web.Application(client_max_size=_HARD_BODY_CAP)
    app[STATE] = runtime
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", runtime.metrics.handle)
    app.router.add_get("/v1/models", ingress.models_handler)
    app.router.add_get("/v1/models/{model:.+}", ingress.models_handler)
    app.router.add_route("*", "/v1/{tail:.*}", ingress.proxy_handler)
    app.cleanup_ctx.append(_upstreams)
    return app


async def _upstreams(app: web.Application) -> AsyncIterator[None]:
    runtime = app[STATE]
    await runtime.clients.configure(runtime.plans.current)
    runtime.metrics.set_policy(runtime.plans.current.digest)
    watcher = None
    if runtime.reloader is not None:
        runtime.reloader.on_change(_reconfigure(runtime))
        watcher = spawn(
            runtime.reloader.watch(runtime.settings.reload_interval, lambda: reload_policy(runtime)),
            name="policy-watch",
        )
    runtime.ready = True
    yield
    runtime.ready = False
    if watcher is not None:
        watcher.cancel()
    await runtime.clients.close()


def _reconfigure(runtime: Runtime) -> Listener:
    async def listener(plan: Plan, loaded: LoadedPolicy) -> None:
        await runtime.clients.configure(plan)
        runtime.scheduler.reconfigure(plan)
        runtime.metrics.set_policy(plan.digest)

    return listener


async def reload_policy(runtime: Runtime) -> bool:
    """SIGHUP and POST /admin/reload: reload now; metrics say how it went."""
    if runtime.reloader is None:
        return False
    failures = runtime.reloader.status.failures
    changed = await runtime.reloader.reload()
    failed = runtime.reloader.status.failures > failures
    if failed:
        runtime.metrics.reload_failures.inc()
    runtime.metrics.reload_success.set(0 if runtime.reloader.status.last_error else 1)
    return changed


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
    return web.Response(status=200 if ok else 503, body=orjson.dumps(body), content_type="application/json")


async def serve(app: web.Application) -> None:
    """Run until SIGTERM/SIGINT, then drain (see module docstring)."""
    runtime = app[STATE]
    settings = runtime.settings
    admin = await _start_admin(app)
    runner = web.AppRunner(app, handle_signals=False, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port, backlog=1024, reuse_address=True)
    await site.start()
    log.info("serving on http://%s:%s (policy %s)", settings.host, settings.port, runtime.plans.current.digest[:12])
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: spawn(reload_policy(runtime), name="sighup-reload"))
    try:
        await stop.wait()
        runtime.draining = True
        log.info("shutdown: readiness failing; accepting for %.1fs more", settings.shutdown_grace)
        await asyncio.sleep(settings.shutdown_grace)
        await site.stop()  # stop accepting; open connections keep going
        deadline = loop.time() + settings.drain_timeout
        while runtime.in_flight and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if runtime.in_flight:
            log.warning("drain timeout: ending %d requests still in flight", runtime.in_flight)
            shutting_down = ServiceUnavailable("the proxy is shutting down; retry the request", should_retry=True)
            for end in list(runtime.open_streams):
                end(shutting_down)
            ended = loop.time() + 2.0  # let relays write their error event
            while runtime.open_streams and loop.time() < ended:
                await asyncio.sleep(0.02)
    finally:
        await runner.cleanup()
        await admin.cleanup()


async def _start_admin(app: web.Application) -> web.AppRunner:
    """The admin API on its own port, sharing the app's runtime (see proxy.admin)."""
    settings = app[STATE].settings
    runner = web.AppRunner(build_admin_app(app), handle_signals=False, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, settings.admin_host, settings.admin_port, reuse_address=True).start()
    except BaseException:
        await runner.cleanup()
        raise
    log.info("admin API on http://%s:%s", settings.admin_host, settings.admin_port)
    return runner
