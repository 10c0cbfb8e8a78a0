"""The response cache shared by replicas through a real redis-server: what one replica fetched, another
serves byte for byte; keys hold no content; a Redis outage turns lookups into misses, never errors."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import httpx2 as httpx
import openai
import pytest
from cache_helpers import Embedder, Numbered, app_for, ask, cache_policy, embedder_app
from conftest import Proxy
from kit import Loopback, build_policy, route_spec, sample_key, scrape, until, upstream_spec
from redis.asyncio import Redis
from redis_server import RedisServer, running

from proxy.tasks import spawn

pytestmark = pytest.mark.timeout(60)
StartProxy = Callable[..., Awaitable[Proxy]]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    with running(tmp_path) as redis:
        yield redis


@pytest.fixture
async def upstream(loopback: Loopback) -> Numbered:
    numbered = Numbered()
    numbered.url = await loopback.serve(app_for(numbered))
    return numbered


def shared_state(url: str) -> dict[str, object]:
    return {"backend": "redis", "url": url, "key_prefix": "sb-cache", "timeout": "1s",
            "breaker": {"failures": 2, "cooldown": "30s"}}


async def test_a_miss_on_one_replica_is_a_byte_identical_hit_on_the_other(
    start_proxy: StartProxy, upstream: Numbered, server: RedisServer
) -> None:
    text = cache_policy(upstream.url, state=shared_state(server.url))
    one, two = await start_proxy(text), await start_proxy(text)
    async with httpx.AsyncClient() as client:
        first = await ask(client, one.url)
        second = await ask(client, two.url)
        upstream.headers = {"Cache-Control": "no-store"}
        private = [await ask(client, proxy.url, temperature=1) for proxy in (one, two, one)]
        upstream.headers = {}
        asked_fresh = await ask(client, one.url, headers={"Cache-Control": "no-cache"})
        after = await ask(client, two.url)
    assert first.headers["x-signalbox-cache"] == "miss"
    assert second.headers["x-signalbox-cache"] == "hit"
    assert second.content == first.content
    assert [r.headers["x-signalbox-cache"] for r in private] == ["miss", "miss", "miss"]
    assert asked_fresh.headers["x-signalbox-cache"] == "bypass" and asked_fresh.content != first.content
    assert after.headers["x-signalbox-cache"] == "hit" and after.content == asked_fresh.content  # refreshed
    assert upstream.calls == 5
    redis = Redis.from_url(server.url)
    try:
        keys = sorted(k.decode() for k in await redis.keys("sb-cache:cache:*"))
        assert len(keys) == 1 and len(keys[0]) == len("sb-cache:cache:") + 64
        ttl = await redis.pttl(keys[0])
        assert 0 < ttl <= 600_000
        assert b"France" not in keys[0].encode()
    finally:
        await redis.aclose()


async def test_with_redis_down_every_request_is_a_miss_and_none_fails(
    start_proxy: StartProxy, upstream: Numbered, server: RedisServer
) -> None:
    proxy = await start_proxy(cache_policy(upstream.url, state=shared_state(server.url)))
    async with httpx.AsyncClient(timeout=30) as client:
        await ask(client, proxy.url)
        assert (await ask(client, proxy.url)).headers["x-signalbox-cache"] == "hit"
        await server.astop()
        got = [await ask(client, proxy.url) for _ in range(4)]
    assert [r.status_code for r in got] == [200] * 4
    assert [r.headers["x-signalbox-cache"] for r in got] == ["miss"] * 4
    assert upstream.calls == 5
    found = await scrape(proxy)
    assert (found.get(sample_key("signalbox_cache_store_errors_total", op="get")) or 0) >= 4


async def test_embedding_inputs_cached_by_one_replica_serve_the_other(
    start_proxy: StartProxy, async_openai: Callable[..., openai.AsyncOpenAI], loopback: Loopback,
    server: RedisServer,
) -> None:
    embedder = Embedder()
    embedder.url = await loopback.serve(embedder_app(embedder))
    route = route_spec("emb", "up", path="/v1/embeddings", cache={"ttl": "10m", "scope": "shared"})
    text = build_policy({"up": upstream_spec(embedder.url)}, [route], state=shared_state(server.url),
                        tenants={"alpha": {"keys": ["sk-alpha"]}, "beta": {"keys": ["sk-beta"]}})
    one, two = await start_proxy(text), await start_proxy(text)
    first = await async_openai(one).embeddings.create(model="e", input=["a", "b", "c"])
    second = await async_openai(two, key="sk-beta").embeddings.create(model="e", input=["c", "d", "a"])
    assert embedder.inputs == [["a", "b", "c"], ["d"]]
    assert second.data[0].embedding == first.data[2].embedding
    assert second.data[2].embedding == first.data[0].embedding


async def test_concurrent_misses_on_two_replicas_make_one_upstream_call(
    start_proxy: StartProxy, upstream: Numbered, server: RedisServer
) -> None:
    upstream.hold = asyncio.Event()
    text = cache_policy(upstream.url, state=shared_state(server.url))
    one, two = await start_proxy(text), await start_proxy(text)
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=30), timeout=30) as client:
        first = spawn(ask(client, one.url), name="ask")
        await until(lambda: upstream.calls > 0)
        rest = [spawn(ask(client, proxy.url), name="ask") for proxy in (one, two) for _ in range(10)]
        await until(lambda: one.state.in_flight == 11 and two.state.in_flight == 10, within=20)
        upstream.hold.set()
        got = [await first, *await asyncio.gather(*rest)]
    assert upstream.calls == 1
    assert len({r.content for r in got}) == 1
    assert [r.headers["x-signalbox-cache"] for r in got] == ["miss"] + ["hit"] * 20


async def test_readyz_says_where_the_cache_lives_and_stays_ready_without_redis(
    start_proxy: StartProxy, upstream: Numbered, server: RedisServer
) -> None:
    shared = await start_proxy(cache_policy(upstream.url, state=shared_state(server.url)))
    local = await start_proxy(cache_policy(upstream.url))
    async with httpx.AsyncClient(timeout=30) as client:
        assert (await client.get(f"{local.url}/readyz")).json()["cache"]["backend"] == "memory"
        assert (await client.get(f"{shared.url}/readyz")).json()["cache"] == {"backend": "redis", "degraded": False}
        await server.astop()
        for _ in range(3):
            await ask(client, shared.url)
        ready = await client.get(f"{shared.url}/readyz")
    assert ready.status_code == 200 and ready.json()["cache"] == {"backend": "redis", "degraded": True}
