"""The response cache end to end on one proxy (memory store): real loopback servers, httpx and the openai
SDK as clients, an upstream whose every answer is numbered (a body seen twice came from the cache)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import httpx2 as httpx
import openai
import pytest
from cache_helpers import Numbered, app_for, ask, cache_policy
from conftest import Proxy
from kit import Loopback, sample_key, scrape, until

from proxy.tasks import spawn

pytestmark = pytest.mark.timeout(60)
StartProxy = Callable[..., Awaitable[Proxy]]


@pytest.fixture
async def upstream(loopback: Loopback) -> Numbered:
    numbered = Numbered()
    numbered.url = await loopback.serve(app_for(numbered))
    return numbered


async def test_a_repeat_is_a_hit_byte_for_byte_with_age_and_no_upstream_call(
    start_proxy: StartProxy, upstream: Numbered
) -> None:
    proxy = await start_proxy(cache_policy(upstream.url))
    async with httpx.AsyncClient() as client:
        first = await ask(client, proxy.url)
        second = await ask(client, proxy.url)
        reordered = await client.post(  # the same JSON, keys in another order: the same entry
            f"{proxy.url}/v1/chat/completions",
            headers={"Authorization": "Bearer sk-alpha", "Content-Type": "application/json"},
            content=b'{"messages": [{"content": "What is the capital of France?", "role": "user"}], '
                    b'"model": "gpt-4o-mini"}',
        )
        other = await ask(client, proxy.url, temperature=0.5)
    assert first.status_code == second.status_code == 200
    assert first.headers["x-signalbox-cache"] == "miss"
    assert second.headers["x-signalbox-cache"] == "hit"
    assert reordered.headers["x-signalbox-cache"] == "hit"
    assert second.content == first.content == reordered.content
    assert int(second.headers["age"]) >= 0
    assert second.headers["x-request-id"] != first.headers["x-request-id"]
    assert other.headers["x-signalbox-cache"] == "miss" and other.content != first.content
    assert upstream.calls == 2
    found = await scrape(proxy)
    assert found.get(sample_key("signalbox_cache_requests_total", route="chat", result="hit")) == 2
    assert found.get(sample_key("signalbox_cache_requests_total", route="chat", result="miss")) == 2
    assert (found.get(sample_key("signalbox_cache_stored_bytes_total", route="chat")) or 0) > len(first.content)


async def test_the_openai_sdk_gets_the_cached_completion(
    start_proxy: StartProxy, upstream: Numbered, async_openai: Callable[..., openai.AsyncOpenAI]
) -> None:
    proxy = await start_proxy(cache_policy(upstream.url))
    client = async_openai(proxy)
    answers = []
    for _ in range(3):
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "What is the capital of France?"}]
        )
        answers.append((raw.headers["x-signalbox-cache"], raw.parse().choices[0].message.content))
    assert answers == [("miss", "answer 1"), ("hit", "answer 1"), ("hit", "answer 1")]
    assert upstream.calls == 1


@pytest.mark.parametrize("header", ["no-store", "private", "no-cache", "max-age=0"])
async def test_an_upstream_that_forbids_storing_is_never_cached(
    start_proxy: StartProxy, upstream: Numbered, header: str
) -> None:
    upstream.headers = {"Cache-Control": header}
    proxy = await start_proxy(cache_policy(upstream.url))
    async with httpx.AsyncClient() as client:
        got = [await ask(client, proxy.url) for _ in range(3)]
    assert [r.headers["x-signalbox-cache"] for r in got] == ["miss", "miss", "miss"]
    assert len({r.content for r in got}) == 3
    assert upstream.calls == 3


async def test_set_cookie_answers_are_not_cached_and_max_age_is_honoured(
    start_proxy: StartProxy, upstream: Numbered
) -> None:
    upstream.headers = {"Set-Cookie": "session=abc"}
    proxy = await start_proxy(cache_policy(upstream.url))
    now = [1000.0]
    proxy.state.cache.memory.clock = lambda: now[0]  # the store's clock, moved by hand
    async with httpx.AsyncClient() as client:
        await ask(client, proxy.url)
        assert (await ask(client, proxy.url)).headers["x-signalbox-cache"] == "miss"
        upstream.headers = {"Cache-Control": "max-age=60"}
        await ask(client, proxy.url, n=2)
        now[0] += 59
        assert (await ask(client, proxy.url, n=2)).headers["x-signalbox-cache"] == "hit"
        now[0] += 2  # past the upstream's max-age (shorter than the policy's 10 minutes)
        assert (await ask(client, proxy.url, n=2)).headers["x-signalbox-cache"] == "miss"
    assert upstream.calls == 4


async def test_client_no_cache_bypasses_and_refreshes_and_no_store_neither_reads_nor_writes(
    start_proxy: StartProxy, upstream: Numbered
) -> None:
    proxy = await start_proxy(cache_policy(upstream.url))
    async with httpx.AsyncClient() as client:
        first = await ask(client, proxy.url)
        refreshed = await ask(client, proxy.url, headers={"Cache-Control": "no-cache"})
        after = await ask(client, proxy.url)
        skipped = await ask(client, proxy.url, headers={"Cache-Control": "no-store"}, temperature=1)
        later = await ask(client, proxy.url, temperature=1)
    assert refreshed.headers["x-signalbox-cache"] == "bypass"
    assert refreshed.content != first.content  # went upstream although an entry existed
    assert after.headers["x-signalbox-cache"] == "hit" and after.content == refreshed.content  # refreshed
    assert skipped.headers["x-signalbox-cache"] == "bypass"
    assert later.headers["x-signalbox-cache"] == "miss"  # no-store wrote nothing
    assert upstream.calls == 4


async def test_a_tenant_scoped_cache_never_serves_b_what_a_fetched_and_shared_does(
    start_proxy: StartProxy, upstream: Numbered
) -> None:
    scoped = await start_proxy(cache_policy(upstream.url))
    async with httpx.AsyncClient() as client:
        a1 = await ask(client, scoped.url, "sk-alpha")
        b1 = await ask(client, scoped.url, "sk-beta")
        a2 = await ask(client, scoped.url, "sk-alpha")
        b2 = await ask(client, scoped.url, "sk-beta")
        assert [r.headers["x-signalbox-cache"] for r in (a1, b1, a2, b2)] == ["miss", "miss", "hit", "hit"]
        assert b1.content != a1.content and a2.content == a1.content and b2.content == b1.content
        shared = await start_proxy(cache_policy(upstream.url, {"ttl": "10m", "scope": "shared"}))
        s1 = await ask(client, shared.url, "sk-alpha", temperature=0.2)
        s2 = await ask(client, shared.url, "sk-beta", temperature=0.2)
    assert s2.headers["x-signalbox-cache"] == "hit" and s2.content == s1.content
    assert upstream.calls == 3


async def test_fifty_identical_concurrent_misses_make_one_upstream_call(
    start_proxy: StartProxy, upstream: Numbered
) -> None:
    upstream.hold = asyncio.Event()
    proxy = await start_proxy(cache_policy(upstream.url))
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=60), timeout=30) as client:
        tasks = [spawn(ask(client, proxy.url), name="ask") for _ in range(50)]
        # All in the proxy, one of them upstream (held there), the others waiting for it.
        await until(lambda: proxy.state.in_flight == 50 and upstream.calls > 0, within=20)
        assert upstream.calls == 1 and len(proxy.state.cache.flights) == 1
        upstream.hold.set()
        got = await asyncio.gather(*tasks)
    assert upstream.calls == 1
    assert {r.status_code for r in got} == {200}
    assert len({r.content for r in got}) == 1
    labels = sorted(r.headers["x-signalbox-cache"] for r in got)
    assert labels.count("miss") == 1 and labels.count("hit") == 49


async def test_streams_bypass_the_cache_with_a_label(start_proxy: StartProxy, upstream: Numbered) -> None:
    proxy = await start_proxy(cache_policy(upstream.url))
    async with httpx.AsyncClient() as client:
        first = await ask(client, proxy.url, stream=True)
        second = await ask(client, proxy.url, stream=True)
    assert first.headers["x-signalbox-cache"] == second.headers["x-signalbox-cache"] == "bypass"
    assert b"answer 1" in first.content and b"answer 2" in second.content
    assert upstream.calls == 2


async def test_hits_count_against_the_tenants_request_limit(start_proxy: StartProxy, upstream: Numbered) -> None:
    limits = {"per_tenant": {"requests_per_minute": 3}}
    proxy = await start_proxy(cache_policy(upstream.url, limits=limits))
    async with httpx.AsyncClient() as client:
        got = [await ask(client, proxy.url) for _ in range(5)]
    assert [r.status_code for r in got] == [200, 200, 200, 429, 429]
    assert [r.headers.get("x-signalbox-cache") for r in got[:3]] == ["miss", "hit", "hit"]
    assert "x-signalbox-cache" not in got[3].headers  # a hit refused by the limit was not served
    assert "retry-after" in got[3].headers
    assert upstream.calls == 1


async def test_a_miss_refused_by_a_limit_is_labelled(start_proxy: StartProxy, upstream: Numbered) -> None:
    proxy = await start_proxy(cache_policy(upstream.url, limits={"per_tenant": {"requests_per_minute": 1}}))
    async with httpx.AsyncClient() as client:
        await ask(client, proxy.url)
        refused = await ask(client, proxy.url, temperature=1)
    assert refused.status_code == 429 and refused.headers["x-signalbox-cache"] == "miss"
    assert "retry-after" in refused.headers and upstream.calls == 1


async def test_the_memory_cache_stays_within_its_bytes_and_evicts_the_least_recent(
    start_proxy: StartProxy, upstream: Numbered
) -> None:
    proxy = await start_proxy(cache_policy(upstream.url, cache_memory="2KiB"))
    async with httpx.AsyncClient() as client:
        for n in range(1, 11):  # ten different requests of ~400 bytes each
            await ask(client, proxy.url, n=n)
        memory = proxy.state.cache.memory
        assert 0 < memory.used <= 2048
        kept = len(memory)
        assert 2 <= kept < 10
        newest = await ask(client, proxy.url, n=10)
        oldest = await ask(client, proxy.url, n=1)
    assert newest.headers["x-signalbox-cache"] == "hit"
    assert oldest.headers["x-signalbox-cache"] == "miss"  # evicted first
    found = await scrape(proxy)
    assert found.get(sample_key("signalbox_cache_evictions_total", route="chat")) == 10 - kept + 1
    assert found.get(sample_key("signalbox_cache_memory_bytes")) == memory.used


async def test_an_answer_over_max_entry_is_relayed_but_not_kept(start_proxy: StartProxy, upstream: Numbered) -> None:
    proxy = await start_proxy(cache_policy(upstream.url, {"ttl": "10m", "max_entry": 100}))
    async with httpx.AsyncClient() as client:
        got = [await ask(client, proxy.url) for _ in range(2)]
    assert [r.headers["x-signalbox-cache"] for r in got] == ["miss", "miss"]
    assert upstream.calls == 2


async def test_a_hit_takes_no_queue_slot(start_proxy: StartProxy, upstream: Numbered) -> None:
    queues = {"one": {"concurrency": 1, "max_wait": "20s"}}
    proxy = await start_proxy(cache_policy(upstream.url, route={"queue": "one", "on_limit": "queue"}, queues=queues))
    async with httpx.AsyncClient(timeout=30) as client:
        cached = await ask(client, proxy.url)
        upstream.hold = asyncio.Event()
        busy = spawn(ask(client, proxy.url, temperature=1), name="ask")  # takes the only slot, held upstream
        await until(lambda: upstream.calls == 2)
        again = await ask(client, proxy.url)  # answered while the slot is taken
        assert not busy.done()
        upstream.hold.set()
        assert (await busy).status_code == 200
    assert again.headers["x-signalbox-cache"] == "hit" and again.content == cached.content
