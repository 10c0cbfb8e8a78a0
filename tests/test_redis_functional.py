"""Limits shared across replicas through Redis, end to end: several proxy instances in one test (each its
own app and RedisStore, as separate sidecars would be), one real redis-server, the official openai SDK
as the client, and an OpenAI-like upstream that counts what reaches it (requests, in flight, usage)."""

from __future__ import annotations

import asyncio
import math
import os
import random
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web
from conftest import Proxy
from kit import Loopback, sample_key, scrape, until
from redis.asyncio import Redis
from redis_server import RedisServer, running

from proxy.admission.redis.codec import redis_now
from proxy.admission.redis.store import RedisStore, SharedReservation
from proxy.tasks import spawn

pytestmark = pytest.mark.timeout(60)

StartProxy = Callable[..., Awaitable[Proxy]]
MakeAsync = Callable[..., openai.AsyncOpenAI]
PROMPT, COMPLETION = 20, 10


@dataclass
class Counting:
    """Answers chat completions like OpenAI (streams carry usage when asked) and counts what reached it."""

    url: str = ""
    delay: float = 0.0
    hold: bool = False
    gate: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(0))
    received: int = 0
    in_flight: int = 0
    peak: int = 0
    """Most requests in flight at once."""

    def release(self, n: int) -> None:
        for _ in range(n):
            self.gate.release()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.received += 1
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            if self.hold:
                await self.gate.acquire()
            if self.delay:
                await asyncio.sleep(self.delay)
            return await self._answer(request, body)
        finally:
            self.in_flight -= 1

    async def _answer(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        usage = {"prompt_tokens": PROMPT, "completion_tokens": COMPLETION, "total_tokens": PROMPT + COMPLETION}
        base = {"id": "chatcmpl-1", "created": 1, "model": body["model"]}
        if not body.get("stream"):
            message = {"role": "assistant", "content": "Hello"}
            choice = {"index": 0, "message": message, "finish_reason": "stop", "logprobs": None}
            return web.json_response({**base, "object": "chat.completion", "choices": [choice], "usage": usage})
        include = (body.get("stream_options") or {}).get("include_usage") is True
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for text, finish in (("Hel", None), ("lo", None), (None, "stop")):
            delta = {"content": text} if text else {}
            choices = [{"index": 0, "delta": delta, "finish_reason": finish}]
            chunk = {**base, "object": "chat.completion.chunk", "choices": choices}
            await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        if include:
            last = {**base, "object": "chat.completion.chunk", "choices": [], "usage": usage}
            await response.write(b"data: " + orjson.dumps(last) + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


@pytest.fixture
async def upstream(loopback: Loopback) -> AsyncIterator[Counting]:
    counting = Counting()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", counting.handle)
    counting.url = await loopback.serve(app, handler_cancellation=True)
    yield counting
    counting.release(1000)  # before `loopback` stops the server: no handler left waiting


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    with running(tmp_path) as redis:
        yield redis


@pytest.fixture
async def clock(server: RedisServer) -> AsyncIterator[Callable[[], Awaitable[float]]]:
    """Redis's own clock (the one the limits run on)."""
    client = Redis.from_url(server.url)

    async def now() -> float:
        sec, usec = await client.time()
        return redis_now(sec, usec)

    yield now
    await client.aclose()


def policy(
    upstream: Counting, url: str, limits: str, *, state: str = "", route: str = "", replicas: int = 3,
    timeout: str = "1s",
) -> str:
    return f"""
state: {{backend: redis, url: "{url}", key_prefix: sb-test, timeout: {timeout}, expected_replicas: {replicas}{state}}}
upstreams:
  up: {{provider: openai, base_url: "{upstream.url}/v1", api_key: sk-up}}
tenants:
  alpha: {{keys: [sk-alpha], limits: {{{limits}}}}}
routes:
  - name: chat
    match: {{path: /v1/chat/completions}}
    upstream: up
    {route}
"""


def chat(client: openai.AsyncOpenAI, **kwargs: Any) -> Awaitable[Any]:
    kwargs.setdefault("max_tokens", 50)
    return client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}], **kwargs)


async def attempt(client: openai.AsyncOpenAI, **kwargs: Any) -> Any:
    """The answer, or the RateLimitError (anything else fails the test)."""
    try:
        return await chat(client, **kwargs)
    except openai.RateLimitError as error:
        return error


async def outside_a_minute_edge(now: Callable[[], Awaitable[float]], margin: float = 6.0) -> None:
    """Sliding windows free capacity from the next minute on: keep a burst inside one minute."""
    left = 60 - (await now()) % 60
    if left < margin:
        await asyncio.sleep(left + 0.05)


async def metric(proxy: Proxy, name: str) -> float | None:
    return (await scrape(proxy)).get(sample_key(name))


async def readyz(proxy: Proxy) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.get(proxy.url + "/readyz") as response:
        return response.status, await response.json()


# --- requests per minute ------------------------------------------------------------------------------


async def test_three_replicas_admit_exactly_the_shared_60_per_minute(
    start_proxy: StartProxy, async_openai: MakeAsync, upstream: Counting, server: RedisServer,
    clock: Callable[[], Awaitable[float]],
) -> None:
    text = policy(upstream, server.url, "requests_per_minute: 60")
    proxies = [await start_proxy(text) for _ in range(3)]
    clients = [async_openai(proxy) for proxy in proxies]
    await outside_a_minute_edge(clock)
    before = await clock()
    results = await asyncio.gather(*(attempt(clients[i % 3]) for i in range(200)))
    after = await clock()
    refused = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert len(results) - len(refused) == 60  # exactly the shared limit, not 3 x 60
    assert upstream.received == 60
    # 60 counted in this minute: the next request fits once 1/60 of the next minute has passed.
    frees_at = (before // 60 + 1) * 60 + 1
    for error in refused:
        headers = error.response.headers
        wait = int(headers["retry-after-ms"]) / 1000
        assert frees_at - after - 1 <= wait <= frees_at - before + 1
        assert int(headers["retry-after"]) == max(1, math.ceil(wait - 0.001))
        assert headers["x-ratelimit-limit-requests"] == "60"
        assert headers["x-ratelimit-remaining-requests"] == "0"
    for proxy in proxies:
        status, body = await readyz(proxy)
        assert status == 200 and body["limits"]["backend"] == "redis" and body["limits"]["shared"] is True


# --- tokens per minute, streamed --------------------------------------------------------------------------


async def test_token_limit_holds_across_replicas_and_streams_settle_real_usage(
    start_proxy: StartProxy, async_openai: MakeAsync, upstream: Counting, server: RedisServer,
    clock: Callable[[], Awaitable[float]],
) -> None:
    limit = 2000
    text = policy(upstream, server.url, f"tokens_per_minute: {limit}")
    proxies = [await start_proxy(text) for _ in range(3)]
    clients = [async_openai(proxy) for proxy in proxies]
    store = proxies[0].state.admission.store

    async def used() -> float:
        (usage,) = await store.remaining(["tenant:alpha"])
        assert usage.tokens is not None
        return float(usage.tokens.used)

    async def settled_at(total: int) -> bool:
        return await used() == pytest.approx(total)

    def reserved() -> int:
        return sum(p.state.admission.tokens.get("alpha", [0])[0] for p in proxies)

    await outside_a_minute_edge(clock)
    upstream.hold = True
    loop = asyncio.get_running_loop()
    first = [loop.create_task(attempt(clients[i % 3], max_tokens=300, stream=True)) for i in range(12)]
    async def all_decided() -> bool:
        return upstream.received + sum(t.done() for t in first) == 12

    await until(all_decided, 10)
    held = upstream.received
    estimate = reserved() / held
    # The reservations of every replica count in one shared total, which never passes the limit.
    assert held * estimate <= limit < (held + 1) * estimate
    assert await used() == pytest.approx(reserved())
    upstream.release(held)
    streams = await asyncio.gather(*first)
    answers = [s for s in streams if not isinstance(s, openai.RateLimitError)]
    assert len(answers) == held
    for stream in answers:
        chunks = [chunk async for chunk in stream]
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello"
    # Settled with the real usage the upstream reported at the end of each stream (not the estimate).
    await until(lambda: settled_at(held * (PROMPT + COMPLETION)))
    # The refunds make room: a second wave gets more in, and the total stays within the limit.
    upstream.hold = False
    second = await asyncio.gather(*(attempt(clients[i % 3], max_tokens=300, stream=True) for i in range(12)))
    for stream in second:
        if not isinstance(stream, openai.RateLimitError):
            [_ async for _ in stream]
    admitted = upstream.received
    assert admitted > held
    await until(lambda: settled_at(admitted * (PROMPT + COMPLETION)))
    assert admitted * (PROMPT + COMPLETION) <= limit


# --- concurrency ---------------------------------------------------------------------------------------------


async def test_concurrency_is_shared_and_a_dead_replicas_leases_expire(
    start_proxy: StartProxy, async_openai: MakeAsync, upstream: Counting, server: RedisServer
) -> None:
    text = policy(upstream, server.url, "concurrent: 5", state=", lease_ttl: 1s")
    proxies = [await start_proxy(text) for _ in range(3)]
    clients = [async_openai(proxy) for proxy in proxies]
    upstream.delay = 0.5
    for _ in range(2):
        results = await asyncio.gather(*(attempt(clients[i % 3]) for i in range(30)))
        refused = [r for r in results if isinstance(r, openai.RateLimitError)]
        assert refused and all("concurrency limit" in e.message for e in refused)
        assert len(results) - len(refused) >= 5
    assert upstream.peak == 5  # never more in flight at the upstream, across all three replicas
    upstream.delay = 0.0
    store = proxies[0].state.admission.store
    async def all_released() -> bool:  # a response may reach the client before its lease is given back
        return (await store.remaining(["tenant:alpha"]))[0].concurrent == (5, 0)

    await until(all_released)
    # A replica dies holding all five leases (it never releases them): the others refuse...
    plan = proxies[0].state.plans.current
    dead = RedisStore.open(plan.state)
    await dead.start()
    tenant = plan.tenants["alpha"].limit
    assert tenant is not None
    for _ in range(5):
        assert isinstance(await dead.try_acquire([tenant], 0), SharedReservation)
    await dead.close(release=False)
    died = time.monotonic()
    with pytest.raises(openai.RateLimitError, match="concurrency limit"):
        await chat(clients[1])
    # ...until the leases expire (lease_ttl 1s) and the next acquire reclaims them.

    async def served() -> Any:
        answer = await attempt(clients[2])
        return None if isinstance(answer, openai.RateLimitError) else answer

    result = await until(served, within=5.0, step=0.05)  # the dead replica's leases reclaimed
    assert result.choices[0].message.content == "Hello"
    assert time.monotonic() - died > 0.7


# --- Redis outage ------------------------------------------------------------------------------------------


async def test_redis_outage_falls_back_to_local_shares_and_sharing_resumes(
    start_proxy: StartProxy, async_openai: MakeAsync, upstream: Counting, server: RedisServer,
    clock: Callable[[], Awaitable[float]],
) -> None:
    state = ", breaker: {failures: 2, cooldown: 200ms}"
    text = policy(upstream, server.url, "requests_per_minute: 40", state=state, replicas=2)
    proxies = [await start_proxy(text) for _ in range(2)]
    clients = [async_openai(proxy) for proxy in proxies]
    await outside_a_minute_edge(clock, margin=15.0)  # the whole test in one minute of Redis's clock
    for i in range(4):
        await chat(clients[i % 2])
    assert [await metric(p, "signalbox_limiter_degraded") for p in proxies] == [0.0, 0.0]

    await server.astop()
    for i in range(6):  # no request fails because Redis is gone
        assert (await chat(clients[i % 2])).choices[0].message.content == "Hello"
    for proxy in proxies:
        assert await metric(proxy, "signalbox_limiter_degraded") == 1.0
        status, body = await readyz(proxy)
        assert status == 200 and body["ready"] is True  # degraded is not unready
        assert body["limits"]["degraded"] is True and body["limits"]["shared"] is False
    # Each replica now applies its share, 40 / 2 = 20 a minute; proxy 0 used 5 of it already: 2 admitted
    # through Redis before the outage, 3 locally since.
    results = [await attempt(clients[0]) for _ in range(20)]
    refused = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert len(refused) == 5 and refused[0].response.headers["x-ratelimit-limit-requests"] == "20"

    await server.astart()  # an empty Redis (no data, no scripts)
    async def shared_again() -> bool:  # the keepers probe after each cooldown
        return [await metric(p, "signalbox_limiter_degraded") for p in proxies] == [0.0, 0.0]

    await until(shared_again)
    store = proxies[0].state.admission.store

    async def reconciled() -> bool:  # the 21 requests admitted locally (18 + 3) are added to the new Redis
        (usage,) = await store.remaining(["tenant:alpha"])
        return usage.requests is not None and usage.requests.used == 21

    await until(reconciled)
    results = await asyncio.gather(*(attempt(clients[i % 2]) for i in range(50)))
    assert sum(not isinstance(r, openai.RateLimitError) for r in results) == 40 - 21  # shared again
    for proxy in proxies:
        status, body = await readyz(proxy)
        assert status == 200 and body["limits"]["shared"] is True


# --- policy reload --------------------------------------------------------------------------------------------


async def test_a_reload_keeps_the_shared_counts_and_the_store(
    start_proxy: StartProxy, make_plan: Callable[[str], Any], async_openai: MakeAsync, upstream: Counting,
    server: RedisServer, clock: Callable[[], Awaitable[float]], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SB_TEST_REDIS_URL", server.url)
    text = policy(upstream, "${SB_TEST_REDIS_URL}", "requests_per_minute: 3")
    proxy = await start_proxy(text)
    alpha = async_openai(proxy)
    store = proxy.state.admission.store
    assert isinstance(store, RedisStore)
    await outside_a_minute_edge(clock)
    for _ in range(3):
        await chat(alpha)
    with pytest.raises(openai.RateLimitError):
        await chat(alpha)
    plan = make_plan(policy(upstream, "${SB_TEST_REDIS_URL}", "requests_per_minute: 5"))
    proxy.state.plans.swap(plan)
    await proxy.state.admission.reconfigure(plan)
    assert proxy.state.admission.store is store  # the store outlives plan swaps
    for _ in range(2):
        await chat(alpha)
    with pytest.raises(openai.RateLimitError) as caught:
        await chat(alpha)
    assert caught.value.response.headers["x-ratelimit-limit-requests"] == "5"
    assert upstream.received == 5


# --- an upstream's limit on a pool -------------------------------------------------------------------------------


async def test_an_upstream_limit_on_a_pool_is_shared_and_counts_only_the_calls_that_upstream_gets(
    start_proxy: StartProxy, async_openai: MakeAsync, upstream: Counting, server: RedisServer,
    clock: Callable[[], Awaitable[float]], loopback: Loopback,
) -> None:
    spare = Counting()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", spare.handle)
    spare.url = await loopback.serve(app)
    text = f"""
state: {{backend: redis, url: "{server.url}", key_prefix: sb-test, timeout: 1s}}
upstreams:
  up: {{provider: openai, base_url: "{upstream.url}/v1", api_key: sk-up, limits: {{requests_per_minute: 5}}}}
  spare: {{provider: openai, base_url: "{spare.url}/v1", api_key: sk-up}}
tenants:
  alpha: {{keys: [sk-alpha]}}
routes:
  - name: chat
    match: {{path: /v1/chat/completions}}
    deployments: [{{upstream: up, weight: 1000}}, {{upstream: spare, weight: 0.001}}]
"""
    proxies = [await start_proxy(text) for _ in range(2)]
    for seed, proxy in enumerate(proxies):
        proxy.state.upstreams.rng = random.Random(seed)  # `up` first whenever it has room
    clients = [async_openai(proxy) for proxy in proxies]
    await outside_a_minute_edge(clock)
    answers = await asyncio.gather(*(chat(clients[i % 2]) for i in range(16)))  # none is refused
    assert all(a.choices[0].message.content == "Hello" for a in answers)
    assert upstream.received == 5 and spare.received == 11  # the shared 5, not 2 x 5; the rest elsewhere
    (usage,) = await proxies[1].state.admission.store.remaining(["upstream:up"])
    assert usage.requests is not None and usage.requests.used == pytest.approx(5)


# --- a slow Redis is not an outage ----------------------------------------------------------------------------

_STALL = (
    "EVAL \"local t = redis.call('TIME') local s = t[1] * 1000000 + t[2] while true do "
    "local n = redis.call('TIME') if n[1] * 1000000 + n[2] - s > {us} then return 1 end end\" 0"
)


async def stall(server: RedisServer, seconds: float) -> None:
    """Keep Redis busy (a Lua loop) for `seconds`: every other call waits, none fails."""
    await asyncio.to_thread(server.command, _STALL.format(us=round(seconds * 1e6)))


@contextmanager
def busy_cpu(seconds: float) -> Iterator[None]:
    """One busy-loop process per CPU for the block (each ends by itself after `seconds`; stopped by PID)."""
    code = f"import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    pass\n"
    spinners = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(os.cpu_count() or 1)]
    try:
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait(5)


@pytest.mark.timeout(150)
async def test_three_replicas_on_a_loaded_machine_admit_exactly_the_limit_run_after_run(
    start_proxy: StartProxy, async_openai: MakeAsync, upstream: Counting, server: RedisServer,
    clock: Callable[[], Awaitable[float]],
) -> None:
    """20 runs of 90 requests over three replicas sharing 30 a minute, each run on a limit of its own,
    with cold connection pools, every CPU busy and Redis stalling 70 ms every 250 ms: calls answer late
    (hundreds of ms: the test's event loop serves three replicas and all the clients), none fails, and
    each run admits exactly 30, not 30 plus local shares on top."""
    runs, limit = 20, 30
    tenants = "\n".join(f"  t{i}: {{keys: [sk-t{i}], limits: {{requests_per_minute: {limit}}}}}" for i in range(runs))
    text = f"""
state: {{backend: redis, url: "{server.url}", key_prefix: sb-slow, expected_replicas: 3}}
upstreams:
  up: {{provider: openai, base_url: "{upstream.url}/v1", api_key: sk-up}}
tenants:
{tenants}
routes:
  - name: chat
    match: {{path: /v1/chat/completions}}
    upstream: up
"""
    proxies = [await start_proxy(text) for _ in range(3)]
    base = [async_openai(proxy) for proxy in proxies]
    admitted: list[int] = []
    stalling = True

    async def stalls() -> None:
        while stalling:
            await stall(server, 0.07)
            await asyncio.sleep(0.25)

    with busy_cpu(120):
        for run in range(runs):
            for proxy in proxies:  # cold pools: every run opens its connections under load
                await proxy.state.admission.store.client.connection_pool.disconnect(inuse_connections=False)
            clients = [client.with_options(api_key=f"sk-t{run}") for client in base]
            await outside_a_minute_edge(clock, margin=5.0)
            stalling = True
            staller = spawn(stalls(), name="redis-staller")
            before = upstream.received
            results = await asyncio.gather(*(attempt(clients[i % 3]) for i in range(3 * limit)))
            stalling = False
            await staller
            admitted.append(sum(not isinstance(r, openai.RateLimitError) for r in results))
            assert upstream.received - before == admitted[-1]
    assert admitted == [limit] * runs
    for proxy in proxies:
        assert await metric(proxy, "signalbox_limiter_degraded") == 0.0


async def test_past_the_bound_each_replica_admits_only_what_is_left_of_its_share_and_reconciles(
    start_proxy: StartProxy, async_openai: MakeAsync, upstream: Counting, server: RedisServer,
    clock: Callable[[], Awaitable[float]],
) -> None:
    state = ", breaker: {failures: 1, cooldown: 3s}"
    text = policy(upstream, server.url, "requests_per_minute: 60", state=state, timeout="100ms")
    proxies = [await start_proxy(text) for _ in range(3)]
    clients = [async_openai(proxy) for proxy in proxies]
    store = proxies[0].state.admission.store
    await outside_a_minute_edge(clock, margin=15.0)
    first = await asyncio.gather(*(attempt(clients[i % 3]) for i in range(30)))
    assert not any(isinstance(r, openai.RateLimitError) for r in first)  # 10 per replica, through Redis
    stalled = spawn(stall(server, 1.0), name="redis-stall")
    await asyncio.sleep(0.05)
    second = await asyncio.gather(*(attempt(clients[i % 3]) for i in range(60)))
    # Redis answers past the bound: each replica decides alone, on its share of 20, of which it used 10.
    assert sum(not isinstance(r, openai.RateLimitError) for r in second) == 30
    assert upstream.received == 60
    await stalled

    async def reconciled() -> bool:  # the late admissions rolled back, the local ones added
        (usage,) = await store.remaining(["tenant:alpha"])
        degraded = [p.state.admission.store.health.degraded for p in proxies]
        return usage.requests is not None and usage.requests.used == 60 and not any(degraded)

    await until(reconciled, 15)
    third = await asyncio.gather(*(attempt(clients[i % 3]) for i in range(30)))
    assert all(isinstance(r, openai.RateLimitError) for r in third)
    assert upstream.received == 60
