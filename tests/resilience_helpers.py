"""A fault-injecting OpenAI-compatible upstream for the resilience tests: each request gets the next
scripted `Step` (a status with headers, a stall before the headers, a stream that hangs mid-way), and the
server records when each request arrived, on which connection, and which handlers the proxy abandoned."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from kit import Loopback


@dataclass
class Step:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    stall: float = 0.0
    """Silence before the response headers."""
    events: int = 3
    """Content chunks of a streamed answer."""
    hang_after: int | None = None
    """Streams: stop after this many chunks, silent or (with `comments`) sending only SSE comments."""
    comments: bool = False


def _chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    body = {"id": "chatcmpl-f", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [choice]}
    return b"data: " + orjson.dumps(body) + b"\n\n"


def _completion(name: str) -> bytes:
    message = {"role": "assistant", "content": f"hello from {name}"}
    choice = {"index": 0, "message": message, "finish_reason": "stop", "logprobs": None}
    usage = {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    body = {"id": "chatcmpl-f", "object": "chat.completion", "created": 1, "model": "m", "choices": [choice],
            "usage": usage}
    return orjson.dumps(body)


class Faulty:
    def __init__(self, name: str) -> None:
        self.name = name
        self.url = ""
        self.steps: list[Step] = []
        self.default = Step()
        self.arrivals: list[float] = []
        self.peers: list[tuple[str, int]] = []
        self.abandoned = 0
        """Handlers cancelled because the proxy closed the connection."""

    @property
    def calls(self) -> int:
        return len(self.arrivals)

    def script(self, *steps: Step) -> None:
        self.steps.extend(steps)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        self.arrivals.append(time.monotonic())
        assert request.transport is not None
        self.peers.append(request.transport.get_extra_info("peername"))
        step = self.steps.pop(0) if self.steps else self.default
        try:
            if step.stall:
                await asyncio.sleep(step.stall)
            if step.status != 200:
                error = {"error": {"message": f"{self.name} says {step.status}", "type": "server_error",
                                   "param": None, "code": None}}
                return web.Response(status=step.status, body=orjson.dumps(error), headers=step.headers,
                                    content_type="application/json")
            if not body.get("stream"):
                return web.Response(body=_completion(self.name), headers=step.headers,
                                    content_type="application/json")
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream", **step.headers})
            await response.prepare(request)
            await response.write(_chunk({"role": "assistant", "content": ""}))
            for i in range(step.events):
                if step.hang_after is not None and i >= step.hang_after:
                    for _ in range(36_000):
                        if step.comments:
                            await response.write(b": keep-alive\n\n")
                        await asyncio.sleep(0.1)
                await response.write(_chunk({"content": f"{self.name}-{i} "}))
            await response.write(_chunk({}, "stop"))
            if (body.get("stream_options") or {}).get("include_usage") is True:  # as OpenAI: a last usage chunk
                usage = {"prompt_tokens": 3, "completion_tokens": step.events, "total_tokens": 3 + step.events}
                last = {"id": "chatcmpl-f", "object": "chat.completion.chunk", "created": 1, "model": "m",
                        "choices": [], "usage": usage}
                await response.write(b"data: " + orjson.dumps(last) + b"\n\n")
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response
        except asyncio.CancelledError:
            self.abandoned += 1
            raise


class Servers(Loopback):
    """Loopback servers started by a test, cleaned up at teardown; the faulty upstreams among them."""

    async def faulty(self, name: str, keepalive: float = 75.0) -> Faulty:
        upstream = Faulty(name)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", upstream.handle)
        upstream.url = await self.serve(
            app, handler_cancellation=True, shutdown_timeout=0.2, keepalive_timeout=keepalive
        )
        return upstream


async def servers_fixture() -> AsyncIterator[Servers]:
    started = Servers()
    yield started
    await started.close()
