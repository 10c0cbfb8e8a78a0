"""The wall screen on the admin port: the dashboard page and its live feed.

    GET /admin/dashboard              the page (proxy/ops/dashboard/: plain HTML, JS and CSS, no build step);
    GET /admin/dashboard/{file}       public: they hold no data, and nothing the page loads comes from elsewhere
    GET /admin/live                   the data, behind the admin token like the rest of the admin API: a
                                      Server-Sent Events stream of `snapshot` events (proxy/ops/live.py)

The page cannot use EventSource (it sends no Authorization header, and a token in the URL would land in logs
and history): it reads this stream with fetch() and a streaming body reader, the token in the header. A
snapshot goes out when the data changed (looked at every `interval`), a `heartbeat` event after `heartbeat`
seconds without one. A stream is bounded: at most `max_streams` at once (503 after), `max_age` seconds each
(then an `end` event; the page reconnects), every write within `write_timeout`; it stops when the client
leaves or the admin app shuts down.

Why not aiohttp-sse: the framing is one line per event (`event:` and one `data:` line of compact JSON), and the
stream's bounds (count, age, write timeout, shutdown) are ours to set anyway; a dependency would add nothing.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from importlib import resources

import orjson
from aiohttp import web

from proxy.ops import live
from proxy.runtime import STATE, Runtime

PAGE = "/admin/dashboard"
LIVE = "/admin/live"
_ASSETS = {
    "index.html": "text/html",
    "dashboard.js": "text/javascript",
    "dashboard.css": "text/css",
}
_HEADERS = {
    # The page loads only its own files and talks only to this admin port.
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@dataclass(slots=True)
class LiveSettings:
    interval: float = 1.0
    """How often the data is looked at (a snapshot goes out only when it changed)."""
    heartbeat: float = 5.0
    """Seconds without a snapshot after which a heartbeat event goes out."""
    max_streams: int = 8
    max_age: float = 3600.0
    write_timeout: float = 10.0
    """A client that does not read for this long is dropped."""


@dataclass(slots=True)
class Hub:
    """The live feed of one admin app: each open stream's stop event, the counters' readings, the latest
    snapshot."""

    settings: LiveSettings = field(default_factory=LiveSettings)
    streams: set[asyncio.Event] = field(default_factory=set)
    window: live.Window = field(default_factory=live.Window)
    """The counters' recent readings, shared: a page opened later sees the last minute at once."""
    last: tuple[float, float, bytes] | None = None
    """The latest snapshot (loop time, wall time, JSON), shared by streams that look within half an interval:
    one build a second however many screens watch."""

    async def snapshot(self, runtime: Runtime) -> tuple[float, bytes]:
        """The wall time and JSON of a fresh snapshot (or one built less than half an interval ago)."""
        now = asyncio.get_running_loop().time()
        if self.last is not None and now - self.last[0] < self.settings.interval / 2:
            return self.last[1], self.last[2]
        at = time.time()
        inputs = await live.gather(runtime, at)
        body = orjson.dumps(live.snapshot(inputs, self.window.base(inputs.counters), runtime.metrics.ttft.bounds))
        self.last = (now, at, body)
        return at, body

    async def close(self, _app: web.Application | None = None) -> None:
        for stop in self.streams:
            stop.set()


HUB: web.AppKey[Hub] = web.AppKey("signalbox_live_hub", Hub)


_PUBLIC = frozenset({PAGE, PAGE + "/", *(f"{PAGE}/{name}" for name in _ASSETS)})


def is_page(path: str) -> bool:
    """The page and its files, which the admin token does not guard (GET and HEAD only). Exact paths, not a
    prefix: nothing else under it is opened by a path trick."""
    return path in _PUBLIC


def add_routes(admin: web.Application, settings: LiveSettings | None = None) -> None:
    hub = admin[HUB] = Hub(settings or LiveSettings())
    files = resources.files("proxy.ops") / "dashboard"
    assets = {name: (files.joinpath(name).read_bytes(), kind) for name, kind in _ASSETS.items()}

    async def asset(request: web.Request) -> web.Response:
        name = request.match_info.get("file") or "index.html"
        found = assets.get(name)
        if found is None:
            return _error(404, f"no such file: the dashboard is {PAGE}")
        body, kind = found
        return web.Response(body=body, content_type=kind, charset="utf-8", headers=_HEADERS)

    admin.router.add_get(PAGE, asset)
    admin.router.add_get(PAGE + "/", asset)
    admin.router.add_get(PAGE + "/{file}", asset)
    admin.router.add_get(LIVE, stream)
    admin.on_shutdown.append(hub.close)


async def stream(request: web.Request) -> web.StreamResponse:
    hub = request.app[HUB]
    if len(hub.streams) >= hub.settings.max_streams:
        message = f"{len(hub.streams)} live streams are open already; close one (or retry later)"
        return _error(503, message, {"Retry-After": "5"})
    response = web.StreamResponse(headers={
        "Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-store", "X-Accel-Buffering": "no",
    })
    stop = asyncio.Event()
    hub.streams.add(stop)  # counted before the first await: two arrivals cannot both take the last place
    try:
        await response.prepare(request)
        await _feed(request, response, hub, stop)
    except (ConnectionResetError, TimeoutError):
        pass  # the client left, or stopped reading: nothing to tell it
    finally:
        hub.streams.discard(stop)
    return response


async def _feed(request: web.Request, response: web.StreamResponse, hub: Hub, stop: asyncio.Event) -> None:
    runtime: Runtime = request.app[STATE]
    settings = hub.settings
    loop = asyncio.get_running_loop()
    ends = loop.time() + settings.max_age
    sent: bytes | None = None
    last = loop.time()
    while not stop.is_set() and loop.time() < ends:
        if request.transport is None or request.transport.is_closing():
            return  # the client left
        at, body = await hub.snapshot(runtime)
        if body != sent:
            await _send(response, runtime, "snapshot", b'{"at":%.3f,' % at + body[1:], settings)
            sent, last = body, loop.time()
        elif loop.time() - last >= settings.heartbeat:
            await _send(response, runtime, "heartbeat", b'{"at":%.3f}' % time.time(), settings)
            last = loop.time()
        try:
            await asyncio.wait_for(stop.wait(), settings.interval)
        except TimeoutError:
            pass
    await _send(response, runtime, "end", b'{"reason":"%s"}' % (b"shutdown" if stop.is_set() else b"max_age"),
                settings)


async def _send(response: web.StreamResponse, runtime: Runtime, event: str, data: bytes,
                settings: LiveSettings) -> None:
    # Like every admin answer: no secret the process knows goes out (a request id or model is the client's).
    frame = b"event: %s\ndata: %s\n\n" % (event.encode(), runtime.secrets.current.scrub(data))
    async with asyncio.timeout(settings.write_timeout):
        await response.write(frame)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """The admin API's error shape (proxy/admin.py)."""
    body = {"error": {"message": message, "type": "admin_error", "param": None, "code": None}}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json", headers=headers)
