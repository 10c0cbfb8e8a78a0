"""The admin API, on its own port: queue inspection and control (pause, resume, clear), the policy
life cycle (status, reload now, explain a request), the detailed health view, and the wall screen (the
dashboard page and its live feed, proxy/ops/wall.py).

Every request but `GET /healthz/details` and the dashboard page's own files (no data in them) needs
`Authorization: Bearer $SIGNALBOX_ADMIN_TOKEN`. With no token configured the API refuses everything, unless
the runtime setting `admin_auth_disabled` is on, which the CLI allows only when the admin port is bound to a
loopback address. Nothing here shows prompt content.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web

from proxy import lifecycle
from proxy.flow.gate import Queue
from proxy.ops import health, wall
from proxy.ops import queues as queue_status
from proxy.policy.explain import ExplainError, explain
from proxy.policy.load import Problem
from proxy.runtime import STATE, Runtime

TOKEN_ENV = "SIGNALBOX_ADMIN_TOKEN"
HEALTH_PATH = "/healthz/details"
"""Readable without the token (monitoring): states and policy names only, no limits, no content."""
_TOKEN: web.AppKey[str | None] = web.AppKey("signalbox_admin_token", str)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_admin_app(app: web.Application, environ: Mapping[str, str] | None = None) -> web.Application:
    """The admin app sharing `app`'s runtime state (same queues, same limiter store)."""
    runtime = app[STATE]
    settings = runtime.settings
    token = (os.environ if environ is None else environ).get(TOKEN_ENV) or None
    if settings.admin_auth_disabled and token is None and not is_loopback(settings.admin_host):
        host = settings.admin_host
        raise ValueError(f"admin auth may be disabled only on a loopback admin host, not {host}")
    if token is not None:
        runtime.secrets.add_process_secret(token)
    admin = web.Application(middlewares=[_redacted, _auth])
    admin[STATE] = runtime
    admin[_TOKEN] = token
    admin.router.add_get("/admin/queues", list_queues)
    admin.router.add_get("/admin/queues/{name}", one_queue)
    admin.router.add_get("/admin/queues/{name}/items", queue_items)
    admin.router.add_post("/admin/queues/{name}/pause", pause_queue)
    admin.router.add_post("/admin/queues/{name}/resume", resume_queue)
    admin.router.add_delete("/admin/queues/{name}", clear_queue)
    admin.router.add_get("/admin/policy", policy_status)
    admin.router.add_post("/admin/reload", reload_policy)
    admin.router.add_get("/admin/explain", explain_request)
    admin.router.add_get("/admin/upstreams", list_upstreams)
    admin.router.add_get(HEALTH_PATH, health_details)
    wall.add_routes(admin)
    return admin


@web.middleware
async def _auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.method in ("GET", "HEAD") and (request.path == HEALTH_PATH or wall.is_page(request.path)):
        return await handler(request)  # no data behind these: the page's data comes from /admin/live
    token = request.app[_TOKEN]
    if token is None:
        if not request.app[STATE].settings.admin_auth_disabled:
            hint = "or run with --admin-no-auth on a loopback admin host"
            return _error(403, f"the admin API is locked: set {TOKEN_ENV} ({hint})")
        return await handler(request)
    sent = request.headers.get("authorization", "")
    if not (sent[:7].lower() == "bearer " and hmac.compare_digest(sent[7:].strip().encode(), token.encode())):
        response = _error(401, f"send 'Authorization: Bearer <token>' with the token from {TOKEN_ENV}")
        response.headers["WWW-Authenticate"] = 'Bearer realm="signalbox-admin"'
        return response
    return await handler(request)


@web.middleware
async def _redacted(request: web.Request, handler: Handler) -> web.StreamResponse:
    """No secret the process knows leaves in an admin answer (a reload error may quote a value)."""
    response = await handler(request)
    if isinstance(response, web.Response) and isinstance(response.body, bytes):
        response.body = request.app[STATE].secrets.current.scrub(response.body)
    return response


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


def _error(status: int, message: str) -> web.Response:
    return _json({"error": {"message": message, "type": "admin_error", "param": None, "code": None}}, status)


def _queue(request: web.Request, need_slots: bool = False) -> Queue | web.Response:
    """The named queue from the registry, created from the current plan if no request used it yet."""
    runtime: Runtime = request.app[STATE]
    name = request.match_info["name"]
    plan = runtime.plans.current
    spec = plan.queues.get(name)
    queue = runtime.scheduler.queues.get(name)
    if spec is not None:
        queue = runtime.scheduler.queue(spec, plan.priorities)
    if queue is None:
        known = ", ".join(sorted({*plan.queues, *runtime.scheduler.queues})) or "none"
        return _error(404, f"no queue '{name}' (queues: {known})")
    if need_slots and queue.spec.concurrency is None:
        return _error(409, f"queue '{name}' has no slots (no concurrency set): nothing ever waits in it")
    return queue


async def list_queues(request: web.Request) -> web.Response:
    return _json(await queue_status.listing(request.app[STATE]))


async def one_queue(request: web.Request) -> web.Response:
    """One queue's status, as in GET /admin/queues."""
    queue = _queue(request)
    if isinstance(queue, web.Response):
        return queue
    runtime: Runtime = request.app[STATE]
    book, plan = runtime.metrics.queues, runtime.plans.current
    return _json(queue_status.summary(queue, book, plan, queue.clock(), time.perf_counter()))


async def queue_items(request: web.Request) -> web.Response:
    queue = _queue(request)
    if isinstance(queue, web.Response):
        return queue
    now = queue.clock()
    items: list[dict[str, Any]] = [
        {
            "request_id": t.request_id,
            "tenant": t.tenant,
            "priority": queue.classes[t.cls],
            "model": t.model,
            "stream": t.stream,
            "waited_ms": round((now - t.enqueued) * 1000, 1),
            "position": queue.board.position(t),
            "eta_s": _rounded(queue.eta_of(t)),
            "waiting_for": queue.cause(t),
        }
        for t in queue.board.tickets()
    ]
    items.sort(key=lambda item: item["position"])
    return _json({"queue": queue.spec.name, "paused": queue.paused, "items": items})


def _rounded(seconds: float | None) -> float | None:
    return round(seconds, 1) if seconds is not None else None


async def pause_queue(request: web.Request) -> web.Response:
    queue = _queue(request, need_slots=True)
    if isinstance(queue, web.Response):
        return queue
    queue.pause()
    return _json(_state(queue))


async def resume_queue(request: web.Request) -> web.Response:
    queue = _queue(request, need_slots=True)
    if isinstance(queue, web.Response):
        return queue
    queue.resume()
    return _json(_state(queue))


def _state(queue: Queue) -> dict[str, Any]:
    name, paused = queue.spec.name, queue.paused
    return {"queue": name, "paused": paused, "waiting": len(queue.board), "active": queue.active}


async def clear_queue(request: web.Request) -> web.Response:
    queue = _queue(request)
    if isinstance(queue, web.Response):
        return queue
    return _json({"queue": queue.spec.name, "cleared": queue.clear()})


# --- policy life cycle --------------------------------------------------------------------------------


def _when(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _problem(problem: Problem) -> dict[str, Any]:
    mark = problem.mark
    return {
        "file": mark.file if mark else None,
        "line": mark.line if mark else None,
        "column": mark.column if mark else None,
        "path": problem.path or None,
        "message": problem.message,
        "text": str(problem),
    }


def _policy(runtime: Runtime) -> dict[str, Any]:
    """The active version, its source hash, when it was loaded, and the last refused attempt."""
    plan = runtime.plans.current
    reloader = runtime.reloader
    if reloader is None:  # built from a plan, not from files: nothing to reload from
        return {
            "version": 1, "digest": plan.digest, "source": None, "files": list(plan.files),
            "loaded_at": _when(runtime.plans.loaded_at), "reloadable": False, "last_error": None,
        }
    status = reloader.status
    last_error = None
    if status.last_error is not None:
        last_error = {"digest": status.failed_digest, "problems": [_problem(p) for p in status.last_error]}
    return {
        "version": status.version,
        "digest": status.digest,
        "source": status.source,
        "files": list(reloader.loaded.files),
        "loaded_at": _when(status.loaded_at),
        "reloadable": True,
        "watch_interval_s": runtime.settings.reload_interval,
        "last_attempt": {"at": _when(status.last_attempt_at), "trigger": status.last_trigger},
        "reloads": {"applied": status.successes, "rejected": status.failures},
        "last_error": last_error,
    }


async def policy_status(request: web.Request) -> web.Response:
    return _json(_policy(request.app[STATE]))


async def reload_policy(request: web.Request) -> web.Response:
    """Reload now. 200 when a new version is serving or nothing changed; 422 (the old version keeps
    serving) with every problem and its file:line when the new files are refused."""
    runtime: Runtime = request.app[STATE]
    result = await lifecycle.reload_policy(runtime, "admin")
    if result is None:
        return _error(409, "this proxy was started from a compiled plan, not from policy files")
    outcome = "rejected" if result.failed else "applied" if result.changed else "unchanged"
    return _json({"result": outcome, "policy": _policy(runtime)}, 422 if result.failed else 200)


async def explain_request(request: web.Request) -> web.Response:
    """`signalbox explain` against the serving policy: ?model=M&(tenant=T|key=K)&path=P, each optional as in
    the CLI (no model is a request without one; no tenant or key is the only tenant, or identify's)."""
    runtime: Runtime = request.app[STATE]
    query = request.query
    if "tenant" in query and "key" in query:
        return _error(400, "give tenant or key, not both")
    reloader = runtime.reloader
    plan = runtime.plans.current
    if reloader is None or reloader.loaded.digest != plan.digest:
        return _error(409, "explain needs the policy files this plan was compiled from")
    stream = runtime.settings.stream
    try:
        answer = explain(
            reloader.loaded, plan, model=query.get("model", ""), path=query.get("path", "/v1/chat/completions"),
            tenant=query.get("tenant"), key=query.get("key"),
            stream_defaults={"heartbeat": stream.heartbeat, "slow_client": stream.slow_client},
        )
    except ExplainError as exc:
        return _error(400, str(exc))
    return _json(answer)


async def list_upstreams(request: web.Request) -> web.Response:
    """Per deployment: circuit state, failures in a row, openings, requests outstanding, pacing hold;
    per route: first attempts and retries in the retry budget's 10 s window."""
    return _json(request.app[STATE].upstreams.snapshot())


async def health_details(request: web.Request) -> web.Response:
    """Each dependency's state and the overall one (proxy/ops/health.py): 200 while healthy or degraded, 503
    when unhealthy."""
    body = health.report(request.app[STATE])
    return _json(body, 503 if body["status"] == "unhealthy" else 200)
