"""The frontend helper and its demo page, on the public port (docs/apps/frontend.md).

    GET /signalbox/v1/client.js         the ES module (static/signalbox-stream.js): always served. It holds no
                                        data, so any origin may load it (CORS `*`); cached for an hour, and
                                        revalidated by its ETag (a new proxy version serves a new file)
    GET /signalbox/v1/demo              the demo page and its files (static/demo.*): only when the process runs
    GET /signalbox/v1/demo/{file}       with `serve --demo` (`make run` does); a production proxy serves none

Static files read once from the package at start-up; a handful of fixed names, so no static-file router.
"""

from __future__ import annotations

import hashlib
from importlib import resources

from aiohttp import web

CLIENT_PATH = "/signalbox/v1/client.js"
DEMO_PATH = "/signalbox/v1/demo"
_JS = "text/javascript"
_DEMO_FILES = {"demo.html": "text/html", "demo.js": _JS, "demo.css": "text/css"}
_CLIENT_HEADERS = {
    "Cache-Control": "public, max-age=3600, must-revalidate",
    "Access-Control-Allow-Origin": "*",
    "X-Content-Type-Options": "nosniff",
}
_DEMO_HEADERS = {
    # The page loads only its own files and talks only to this proxy (fetch and WebSocket).
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _read(name: str) -> bytes:
    return (resources.files("proxy.ingress.unified") / "static" / name).read_bytes()


def add_routes(app: web.Application, demo: bool) -> None:
    """Serve the module, and the demo page when `demo`."""
    client = _read("signalbox-stream.js")
    etag = '"' + hashlib.sha256(client).hexdigest()[:32] + '"'

    async def client_js(request: web.Request) -> web.Response:
        headers = {**_CLIENT_HEADERS, "ETag": etag}
        if etag in request.headers.get("If-None-Match", ""):
            return web.Response(status=304, headers=headers)
        return web.Response(body=client, content_type=_JS, charset="utf-8", headers=headers)

    app.router.add_get(CLIENT_PATH, client_js)
    if not demo:
        return
    files = {name: (_read(name), kind) for name, kind in _DEMO_FILES.items()}

    async def demo_file(request: web.Request) -> web.Response:
        found = files.get(request.match_info.get("file") or "demo.html")
        if found is None:
            raise web.HTTPNotFound(text=f"no such file: the demo is {DEMO_PATH}")
        body, kind = found
        return web.Response(body=body, content_type=kind, charset="utf-8", headers=_DEMO_HEADERS)

    app.router.add_get(DEMO_PATH, demo_file)
    app.router.add_get(DEMO_PATH + "/{file}", demo_file)
