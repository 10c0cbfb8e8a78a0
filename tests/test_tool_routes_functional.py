"""Tool routes (`provider: http`) end to end: the proxy on loopback in front of a test tool API (an aiohttp
app here, on loopback), `httpx` as the client, on a path outside /v1. Bytes both ways, limits and their
neutral 429s, the breaker, retries by method, and the response cache with all of them at once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx2 as httpx
import orjson
import pytest
from aiohttp import web
from conftest import UPSTREAM_KEY, Proxy
from kit import UPSTREAM_KEY_REF, Loopback, build_policy, scrape, until

from proxy.tasks import spawn

pytestmark = pytest.mark.timeout(30)

StartProxy = Callable[..., Awaitable[Proxy]]
KEY = {"Authorization": "Bearer sk-alpha"}


@dataclass
class Seen:
    method: str
    path: str
    query: str
    body: bytes
    headers: dict[str, str]


@dataclass
class Tool:
    """A tool API: records every request as it arrived; answers scripted statuses first, then its normal
    answer (a JSON echo, an SSE stream under /sse, a held answer under /slow, plain text under /text)."""

    seen: list[Seen] = field(default_factory=list)
    script: list[int] = field(default_factory=list)
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        path = request.rel_url.raw_path
        self.seen.append(Seen(request.method, path, request.rel_url.raw_query_string, body, dict(request.headers)))
        if self.script:
            return web.Response(status=self.script.pop(0), text="tool busy\n", headers={"x-tool": "busy"})
        if path.endswith("/slow"):
            await self.gate.wait()
        if path.endswith("/sse"):
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for i in range(3):
                await response.write(f"event: part\ndata: {{\"n\": {i}}}\n\n".encode())
            await response.write_eof()
            return response
        if path.endswith("/chunks"):  # chunked, no length: a line now, the next once the gate opens
            response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
            await response.prepare(request)
            await response.write(b'{"part": 1}\n')
            await self.gate.wait()
            await response.write(b'{"part": 2}\n')
            await response.write_eof()
            return response
        if path.endswith("/text"):
            return web.Response(status=404, body=b"no such thing \xff", content_type="text/plain",
                                headers={"x-tool": "text"})
        echo = {"method": request.method, "path": path, "query": request.rel_url.raw_query_string, "size": len(body)}
        return web.Response(body=orjson.dumps(echo), content_type="application/json", headers={"x-tool": "echo"})


@pytest.fixture
async def tool(loopback: Loopback) -> AsyncIterator[Tool]:
    found = Tool()
    app = web.Application(client_max_size=64 * 1024**2)
    app.router.add_route("*", "/{tail:.*}", found.handle)
    found.url = await loopback.serve(app)
    yield found
    found.gate.set()


def tool_policy(tool: Tool, **route: Any) -> str:
    upstream = {"provider": "http", "base_url": f"{tool.url}/api/", "api_key": UPSTREAM_KEY_REF,
                **route.pop("upstream_extra", {})}
    routes = [{"name": "search", "match": {"path": "/tools/search/*"}, "upstream": "tool", **route}]
    return build_policy({"tool": upstream}, routes)


async def test_get_with_query_and_post_with_body_arrive_byte_identical(start_proxy: StartProxy, tool: Tool) -> None:
    proxy = await start_proxy(tool_policy(tool))
    body = b'\x00not json {"a": 1}\r\n' + bytes(range(256)) * 400  # binary, ~100 KiB
    async with httpx.AsyncClient(base_url=proxy.url, headers=KEY) as client:
        got = await client.get("/tools/search/v2/find%20me/?q=a%2Fb&q=%C3%A9&empty=")
        assert got.status_code == 200 and got.headers["x-tool"] == "echo"
        assert got.headers["x-signalbox-route"] == "search"
        posted = await client.post("/tools/search/index", content=body,
                                   headers={"Content-Type": "application/octet-stream"})
        bare = await client.get("/tools/search")
        for method in ("PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"):
            answer = await client.request(method, "/tools/search/item/7", content=b"x" if method in ("PUT", "PATCH")
                                          else None)
            assert answer.status_code == 200, method
        text = await client.get("/tools/search/text")
    get, post, root = tool.seen[0], tool.seen[1], tool.seen[2]
    assert (get.method, get.path, get.query, get.body) == ("GET", "/api/v2/find%20me/", "q=a%2Fb&q=%C3%A9&empty=", b"")
    assert (post.method, post.path, post.body) == ("POST", "/api/index", body)
    assert post.headers["Content-Type"] == "application/octet-stream"
    assert root.path == "/api"
    assert [s.method for s in tool.seen[3:8]] == ["PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]
    assert {s.path for s in tool.seen[3:8]} == {"/api/item/7"}
    # The upstream gets its own key, never the client's proxy key.
    assert all(s.headers["Authorization"] == f"Bearer {UPSTREAM_KEY}" for s in tool.seen)
    assert orjson.loads(got.content) == {"method": "GET", "path": "/api/v2/find%20me/",
                                         "query": "q=a%2Fb&q=%C3%A9&empty=", "size": 0}
    assert orjson.loads(posted.content)["size"] == len(body)
    assert bare.status_code == 200
    # An upstream error that is not JSON is relayed as it came: status, type, bytes.
    assert text.status_code == 404 and text.content == b"no such thing \xff"
    assert text.headers["content-type"].startswith("text/plain") and text.headers["x-tool"] == "text"


async def test_a_streamed_answer_is_relayed_event_by_event(start_proxy: StartProxy, tool: Tool) -> None:
    proxy = await start_proxy(tool_policy(tool))
    async with httpx.AsyncClient(base_url=proxy.url, headers=KEY) as client:
        async with client.stream("GET", "/tools/search/sse", headers={"Accept": "text/event-stream"}) as got:
            assert got.status_code == 200
            chunks = [chunk async for chunk in got.aiter_bytes()]
    expected = b"".join(f"event: part\ndata: {{\"n\": {i}}}\n\n".encode() for i in range(3))
    assert b"".join(chunks) == expected


async def test_a_chunked_answer_is_relayed_as_it_comes(start_proxy: StartProxy, tool: Tool) -> None:
    proxy = await start_proxy(tool_policy(tool))
    async with httpx.AsyncClient(base_url=proxy.url, headers=KEY) as client:
        async with client.stream("GET", "/tools/search/chunks") as got:
            assert got.status_code == 200 and got.headers["content-type"] == "application/x-ndjson"
            lines = got.aiter_lines()
            assert await anext(lines) == '{"part": 1}'  # before the tool wrote the rest
            tool.gate.set()
            assert [line async for line in lines] == ['{"part": 2}']


async def test_request_and_concurrency_limits_answer_429_in_the_neutral_shape(
    start_proxy: StartProxy, tool: Tool
) -> None:
    policy = build_policy(
        {"tool": {"provider": "http", "base_url": f"{tool.url}/api"}},
        [{"name": "search", "match": {"path": "/tools/search/*"}, "upstream": "tool",
          "limits": {"requests_per_minute": 3}},
         {"name": "slow", "match": {"path": "/tools/slow/*"}, "upstream": "tool", "limits": {"concurrent": 1}}],
        tenants={"alpha": {"keys": ["sk-alpha"], "limits": {"tokens_per_minute": 10}}},  # tokens: not a tool's
    )
    proxy = await start_proxy(policy)
    async with httpx.AsyncClient(base_url=proxy.url, headers=KEY) as client:
        answers = [await client.get(f"/tools/search/q{i}") for i in range(5)]
        assert [a.status_code for a in answers] == [200, 200, 200, 429, 429]
        refused = answers[3]
        error = orjson.loads(refused.content)["error"]
        assert error["type"] == "rate_limited" and error["retry_after"] == int(refused.headers["retry-after"])
        assert error["request_id"] == refused.headers["x-request-id"] and error["message"]
        assert set(error) == {"type", "message", "request_id", "retry_after"}
        assert "sk-alpha" not in refused.text and "authorization" not in refused.text.lower()

        held = spawn(client.get("/tools/slow/slow"), name="held-tool-call")
        await until(lambda: len(tool.seen) == 4)
        second = await client.get("/tools/slow/slow")
        assert second.status_code == 429 and orjson.loads(second.content)["error"]["type"] == "rate_limited"
        tool.gate.set()
        assert (await held).status_code == 200
    assert len(tool.seen) == 4  # three searches and the one slow call: refusals never reached the tool
    metrics = await scrape(proxy)
    refusals = {key: value for key, value in metrics.items() if key[0] == "signalbox_requests_total"
                and ("route", "search") in key[1] and ("status", "429") in key[1]}
    assert sum(refusals.values()) == 2  # the route label: tool routes have their metrics like any other


async def test_five_503s_open_the_breaker_and_the_next_call_is_refused_fast(
    start_proxy: StartProxy, tool: Tool
) -> None:
    policy = tool_policy(tool, upstream_extra={"breaker": {"consecutive_failures": 5, "cooldown": "30s"}})
    proxy = await start_proxy(policy)
    tool.script = [503] * 5
    async with httpx.AsyncClient(base_url=proxy.url, headers=KEY) as client:
        failures = [await client.get("/tools/search/q") for _ in range(5)]
        refused = await client.get("/tools/search/q")
    assert [f.status_code for f in failures] == [503] * 5
    assert all(f.text == "tool busy\n" and f.headers["x-tool"] == "busy" for f in failures)  # relayed as is
    assert refused.status_code == 503 and refused.headers["x-signalbox-attempts"] == "0"
    error = orjson.loads(refused.content)["error"]
    assert error["type"] == "circuit_open" and error["retry_after"] >= 1 and "retry-after" in refused.headers
    assert len(tool.seen) == 5  # the sixth call never reached the tool


async def test_a_get_is_retried_on_503_and_a_post_only_when_the_policy_says(
    start_proxy: StartProxy, tool: Tool
) -> None:
    proxy = await start_proxy(tool_policy(tool, retry={"attempts": 3, "backoff": {"base": "1ms", "max": "5ms"}}))
    async with httpx.AsyncClient(base_url=proxy.url, headers=KEY) as client:
        tool.script = [503, 503]
        got = await client.get("/tools/search/q")
        assert got.status_code == 200 and got.headers["x-signalbox-attempts"] == "3"
        assert len(tool.seen) == 3
        tool.script = [503]
        posted = await client.post("/tools/search/q", content=b"{}")
        assert posted.status_code == 503 and posted.headers["x-signalbox-attempts"] == "1"  # not idempotent
        assert len(tool.seen) == 4
    line = proxy.access_lines()[0]
    assert [a["status"] for a in line["attempts"]] == [503, 503, 200]

    retried = await start_proxy(tool_policy(tool, retry={"attempts": 3, "methods": ["GET", "POST"],
                                                         "backoff": {"base": "1ms", "max": "5ms"}}))
    tool.script = [503]
    async with httpx.AsyncClient(base_url=retried.url, headers=KEY) as client:
        posted = await client.post("/tools/search/q", content=b"{}")
    assert posted.status_code == 200 and posted.headers["x-signalbox-attempts"] == "2"


async def test_a_cached_tool_route_retries_its_miss_serves_hits_through_an_open_breaker_and_counts_them(
    start_proxy: StartProxy, tool: Tool
) -> None:
    """Seed 004's search tool: a 10-minute cache, retries, a per-minute limit and a breaker on one route.
    A hit never reaches the tool, is served while the tool's circuit is open, and still counts against
    the tenant's requests."""
    proxy = await start_proxy(tool_policy(
        tool, cache={"ttl": "10m"}, limits={"requests_per_minute": 9},
        retry={"attempts": 3, "backoff": {"base": "1ms", "max": "5ms"}},
        upstream_extra={"breaker": {"consecutive_failures": 3, "failure_ratio": 0, "cooldown": "60s"}},
    ))
    async with httpx.AsyncClient(base_url=proxy.url, headers=KEY) as client:
        tool.script = [503]
        first = await client.get("/tools/search/find?q=kettle")
        assert first.status_code == 200 and first.headers["x-signalbox-cache"] == "miss"
        assert first.headers["x-signalbox-attempts"] == "2" and len(tool.seen) == 2  # the 503 was retried
        again = await client.get("/tools/search/find?q=kettle")
        assert again.status_code == 200 and again.headers["x-signalbox-cache"] == "hit"
        assert again.content == first.content and again.headers["x-tool"] == "echo" and "age" in again.headers
        assert len(tool.seen) == 2  # the hit never reached the tool
        other = await client.get("/tools/search/find?q=teapot")  # another query is another entry
        assert other.headers["x-signalbox-cache"] == "miss" and len(tool.seen) == 3
        fresh = await client.get("/tools/search/find?q=kettle", headers={"Cache-Control": "no-cache"})
        assert fresh.headers["x-signalbox-cache"] == "bypass" and len(tool.seen) == 4

        tool.script = [503, 503, 503]  # three failures in a row open the tool's circuit
        broken = await client.get("/tools/search/find?q=broken")
        assert broken.status_code == 503 and len(tool.seen) == 7
        refused = await client.get("/tools/search/find?q=new")
        assert refused.status_code == 503 and orjson.loads(refused.content)["error"]["type"] == "circuit_open"
        assert len(tool.seen) == 7
        served = await client.get("/tools/search/find?q=kettle")  # degraded gracefully: the cache still answers
        assert served.status_code == 200 and served.headers["x-signalbox-cache"] == "hit"
        assert served.content == first.content
        # Hits count against the tenant's 9 a minute: the answered requests so far (2 hits among them) leave
        # two or three (whether the circuit's refusal was charged is not this test's business), then 429.
        statuses = [(await client.get("/tools/search/find?q=kettle")).status_code for _ in range(4)]
        assert statuses[:2] == [200, 200] and statuses[-1] == 429 and len(tool.seen) == 7


async def test_paths_no_tool_route_covers_keep_the_routers_answers(start_proxy: StartProxy, tool: Tool) -> None:
    proxy = await start_proxy(tool_policy(tool))
    async with httpx.AsyncClient(base_url=proxy.url, headers=KEY) as client:
        elsewhere = await client.get("/chat/completions")
        health = await client.post("/healthz")
        sneaky = await client.get("/tools/search/a/%2e%2e/b")
        nobody = await client.get("/tools/search/q", headers={"Authorization": "Bearer wrong"})
    assert elsewhere.status_code == 404 and "base_url" in orjson.loads(elsewhere.content)["error"]["message"]
    assert health.status_code == 405
    assert sneaky.status_code == 400 and orjson.loads(sneaky.content)["error"]["type"] == "invalid_request"
    assert nobody.status_code == 401 and orjson.loads(nobody.content)["error"]["type"] == "unauthenticated"
    assert tool.seen == []


async def test_a_queued_tool_call_waits_its_turn_and_a_client_that_leaves_frees_its_place(
    start_proxy: StartProxy, tool: Tool
) -> None:
    policy = build_policy(
        {"tool": {"provider": "http", "base_url": f"{tool.url}/api"}},
        [{"name": "slow", "match": {"path": "/tools/slow/*"}, "upstream": "tool", "queue": "one",
          "limits": {"concurrent": 1}, "on_limit": "queue"}],
        queues={"one": {"concurrency": 1, "max_wait": "10s"}},
    )
    proxy = await start_proxy(policy)
    async with httpx.AsyncClient(base_url=proxy.url, headers=KEY) as client:
        # A client that gives up while its call is at the tool: the call is cancelled, its place freed.
        with pytest.raises(httpx.ReadTimeout):
            await client.get("/tools/slow/slow", timeout=0.5)
        await until(lambda: proxy.state.in_flight == 0)
        first = spawn(client.get("/tools/slow/slow", timeout=10), name="first-tool-call")
        await until(lambda: len(tool.seen) == 2)
        second = spawn(client.get("/tools/slow/slow?n=2", timeout=10), name="second-tool-call")
        await until(lambda: proxy.state.in_flight == 2)
        assert len(tool.seen) == 2  # the second waits in the queue, not at the tool
        tool.gate.set()
        answers = [await first, await second]
    assert [a.status_code for a in answers] == [200, 200]
    assert int(answers[1].headers["x-signalbox-queue-wait-ms"]) > 0
    assert [s.query for s in tool.seen] == ["", "", "n=2"]
    lines = proxy.access_lines()
    assert lines[0]["status"] == 499 and lines[0]["outcome"] == "cancelled"
