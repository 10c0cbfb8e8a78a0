"""A minimal, fast OpenAI-style upstream for the overhead benchmark (aiohttp + uvloop).

Non-streaming: one fixed small chat.completion. Streaming: N chat.completion.chunk events,
each written on its own, M ms apart, then `data: [DONE]`.
Run: python bench/fast_upstream.py --port 9000 [--events 50 --interval-ms 20]
"""

from __future__ import annotations

import argparse
import asyncio

import orjson
import uvloop
from aiohttp import web

COMPLETION = orjson.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "bench-model",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
    }
)


def _chunk(delta: dict[str, str], finish: str | None) -> bytes:
    event = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "bench-model",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + orjson.dumps(event) + b"\n\n"


def stream_events(count: int, with_usage: bool) -> list[bytes]:
    """The events of one stream, pre-encoded: role first, tokens, a finish, optional usage, [DONE]."""
    events = [_chunk({"role": "assistant", "content": ""}, None)]
    events += [_chunk({"content": "tok"}, None) for _ in range(max(count - 2, 0))]
    events.append(_chunk({}, "stop"))
    if with_usage:
        usage = {"prompt_tokens": 5, "completion_tokens": count, "total_tokens": count + 5}
        event = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000,
                 "model": "bench-model", "choices": [], "usage": usage}
        events.append(b"data: " + orjson.dumps(event) + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return events


def build_app(events: int, interval_s: float) -> web.Application:
    plain, with_usage = stream_events(events, False), stream_events(events, True)

    async def chat(request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        if not body.get("stream"):
            return web.Response(body=COMPLETION, content_type="application/json")
        usage = bool((body.get("stream_options") or {}).get("include_usage"))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        for i, event in enumerate(with_usage if usage else plain):
            if i:
                await asyncio.sleep(interval_s)
            await resp.write(event)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--events", type=int, default=50, help="chunk events per stream, before [DONE]")
    parser.add_argument("--interval-ms", type=float, default=20.0)
    args = parser.parse_args()
    app = build_app(args.events, args.interval_ms / 1000)
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None, backlog=1024,
                loop=uvloop.new_event_loop())


if __name__ == "__main__":
    main()
