"""Test upstreams and policies for the response cache tests: an OpenAI-like chat upstream whose every
answer is different (it numbers them), so a body seen twice came from the cache, and which can be held
(to pile up concurrent misses) and told which response headers to send."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import httpx2 as httpx
import orjson
from aiohttp import web
from kit import build_policy, route_spec, upstream_spec

TENANTS = {"alpha": {"keys": ["sk-alpha"]}, "beta": {"keys": ["sk-beta"]}}
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@dataclass
class Numbered:
    url: str = ""
    calls: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    """Sent with every answer (Cache-Control, Set-Cookie, ...)."""
    hold: asyncio.Event | None = None
    bodies: list[dict[str, Any]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.calls += 1
        self.bodies.append(body)
        number = self.calls
        if self.hold is not None:
            await self.hold.wait()
        message = {"role": "assistant", "content": f"answer {number}"}
        answer = {
            "id": f"chatcmpl-{number}", "object": "chat.completion", "created": 1, "model": body["model"],
            "choices": [{"index": 0, "message": message, "finish_reason": "stop", "logprobs": None}],
            "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
        }
        if body.get("stream"):
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            chunk = {**answer, "object": "chat.completion.chunk",
                     "choices": [{"index": 0, "delta": {"content": f"answer {number}"}, "finish_reason": "stop"}]}
            await response.write(b"data: " + orjson.dumps(chunk) + b"\n\ndata: [DONE]\n\n")
            await response.write_eof()
            return response
        return web.Response(body=orjson.dumps(answer), content_type="application/json", headers=self.headers)


def app_for(upstream: Numbered) -> web.Application:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", upstream.handle)
    return app


def cache_policy(url: str, cache: dict[str, Any] | None = None, *, state: dict[str, Any] | None = None,
                 limits: dict[str, Any] | None = None, route: dict[str, Any] | None = None, **top: Any) -> str:
    extra: dict[str, Any] = {"cache": cache if cache is not None else {"ttl": "10m"}, **(route or {})}
    if limits is not None:
        extra["limits"] = limits
    spec = route_spec("chat", "up", path="/v1/chat/completions", **extra)
    if state is not None:
        top["state"] = state
    return build_policy({"up": upstream_spec(url)}, [spec], tenants=TENANTS, **top)


async def ask(client: httpx.AsyncClient, base: str, key: str = "sk-alpha", headers: dict[str, str] | None = None,
              **body: Any) -> httpx.Response:
    payload = {"model": "gpt-4o-mini", "messages": CHAT, **body}
    sent = {"Authorization": f"Bearer {key}", **(headers or {})}
    return await client.post(f"{base}/v1/chat/completions", json=payload, headers=sent)


@dataclass
class Embedder:
    """OpenAI-like embeddings with the mock's deterministic vectors (seeded by each input alone); records
    the inputs of every call and the usage it billed."""

    url: str = ""
    inputs: list[list[Any]] = field(default_factory=list)
    usage: list[dict[str, int]] = field(default_factory=list)
    drop_last: bool = False
    """Answer one vector fewer than the inputs (a broken upstream)."""

    async def handle(self, request: web.Request) -> web.Response:
        from proxy.mock import embeddings as mock

        body = await request.json()
        self.inputs.append(body["input"] if isinstance(body["input"], list) else [body["input"]])
        answer = mock.embeddings_response(body, 8)
        if self.drop_last:
            answer["data"].pop()
        self.usage.append(answer["usage"])
        return web.Response(body=orjson.dumps(answer), content_type="application/json")


def embedder_app(upstream: Embedder) -> web.Application:
    app = web.Application()
    app.router.add_post("/v1/embeddings", upstream.handle)
    return app


def embeddings_policy(url: str, *, batch: dict[str, Any] | None = None) -> str:
    cached: dict[str, Any] = {"cache": {"ttl": "10m"}}
    if batch is not None:
        cached["batch"] = batch
    routes = [
        route_spec("cached", "up", path="/v1/embeddings", model="emb-cached", **cached),
        route_spec("plain", "up", path="/v1/embeddings", model="emb-plain"),
    ]
    return build_policy({"up": upstream_spec(url)}, routes, tenants=TENANTS)
