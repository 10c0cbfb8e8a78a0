"""An OpenAI-style upstream that floods: each stream writes 8 KiB `data:` events as fast as its socket takes
them. Run in its own process (`python tests/flood_upstream.py`; it prints its port), so that what the
test's process holds in memory is the proxy's and not this server's.

GET /stats: {"streams": opened, "bytes": written in all, "blocked": streams whose current write has been
waiting for the socket for more than 0.5 s}. Each stream ends after 200,000 events (1.6 GB) at most, and
the server exits when its stdin closes.
"""

from __future__ import annotations

import asyncio
import sys
import time

import orjson
from aiohttp import web

EVENT = b"data: " + orjson.dumps({"choices": [{"index": 0, "delta": {"content": "x" * 8150}}]}) + b"\n\n"


def build() -> web.Application:
    streams: dict[int, float] = {}  # stream number -> when its pending write started (0: none pending)
    written = [0]

    async def chat(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        number = len(streams)
        try:
            for _ in range(200_000):
                streams[number] = time.monotonic()
                await response.write(EVENT)
                streams[number] = 0.0
                written[0] += len(EVENT)
        except ConnectionError:
            pass
        finally:
            streams[number] = 0.0
        return response

    async def stats(request: web.Request) -> web.Response:
        now = time.monotonic()
        blocked = sum(1 for since in streams.values() if since and now - since > 0.5)
        return web.json_response({"streams": len(streams), "bytes": written[0], "blocked": blocked})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/stats", stats)
    return app


async def main() -> None:
    runner = web.AppRunner(build(), access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
    await site.start()
    print(runner.addresses[0][1], flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the test closes stdin
    await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
