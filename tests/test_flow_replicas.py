"""Priority across replicas: three proxies share one budget through a real redis-server, and the queue's
`reserve` keeps the top class's share out of the lower classes' reach, whichever replica each request
lands on and in whatever order they arrive. The upstream is the built-in mock; the clients are the
official openai SDK."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import openai
import pytest
from conftest import Proxy
from redis_server import RedisServer, running

pytestmark = pytest.mark.timeout(90)

LIMIT = 50


def policy(url: str, reserve: str) -> str:
    return f"""
state: {{backend: redis, url: "{url}", key_prefix: sb-flow, timeout: 1s, expected_replicas: 3}}
priorities: [host, planner, batch]
upstreams:
  llm: {{provider: mock, mock: {{output_tokens: 2}}}}
queues:
  q: {{max_wait: 5s{reserve}}}
tenants:
  app: {{keys: [sk-app], priority: batch, max_priority: host}}
routes:
  - {{name: chat, upstream: llm, queue: q, limits: {{requests_per_day: {LIMIT}}}}}
"""


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    with running(tmp_path) as redis:
        yield redis


async def ask(client: openai.AsyncOpenAI, cls: str) -> tuple[str, bool]:
    try:
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                             extra_headers={"x-signalbox-priority": cls})
    except openai.RateLimitError:
        return cls, False
    return cls, True


async def replicas(start_proxy: Callable[..., Awaitable[Proxy]], async_openai: Callable[..., openai.AsyncOpenAI],
                   text: str) -> list[openai.AsyncOpenAI]:
    proxies = [await start_proxy(text) for _ in range(3)]
    return [async_openai(proxy, key="sk-app") for proxy in proxies]


async def test_the_top_class_is_never_refused_while_a_lower_one_takes_the_shared_budget(
    start_proxy: Callable[..., Awaitable[Proxy]], async_openai: Callable[..., openai.AsyncOpenAI],
    server: RedisServer,
) -> None:
    clients = await replicas(start_proxy, async_openai, policy(server.url, ", reserve: {host: 20%, planner: 10%}"))
    mix = ["batch"] * 45 + ["planner"] * 10 + ["host"] * 10
    random.Random(7).shuffle(mix)
    results = await asyncio.gather(*(ask(clients[i % 3], cls) for i, cls in enumerate(mix)))
    admitted = Counter(cls for cls, ok in results if ok)
    refused = Counter(cls for cls, ok in results if not ok)
    assert admitted["host"] == 10 and refused["host"] == 0  # its 20 % of 50 was there for it
    assert admitted["batch"] <= LIMIT * 70 // 100  # batch leaves the 30 % reserved above it
    assert admitted["batch"] + admitted["planner"] <= LIMIT * 80 // 100  # host's 20 % stays free of both
    assert refused["batch"] > 0


async def test_batch_first_on_two_replicas_leaves_the_host_share_for_the_third(
    start_proxy: Callable[..., Awaitable[Proxy]], async_openai: Callable[..., openai.AsyncOpenAI],
    server: RedisServer,
) -> None:
    clients = await replicas(start_proxy, async_openai, policy(server.url, ", reserve: {host: 20%}"))
    first = await asyncio.gather(*(ask(clients[i % 2], "batch") for i in range(60)))
    assert sum(ok for _, ok in first) == LIMIT * 80 // 100
    last = await asyncio.gather(*(ask(clients[2], "host") for _ in range(10)))
    assert all(ok for _, ok in last)  # the batch traffic on A and B could not take what host on C needs


async def test_without_a_reserve_the_first_comer_takes_it_all(
    start_proxy: Callable[..., Awaitable[Proxy]], async_openai: Callable[..., openai.AsyncOpenAI],
    server: RedisServer,
) -> None:
    """The trade-off the reserve buys: without it a batch flood on two replicas spends the host's budget."""
    clients = await replicas(start_proxy, async_openai, policy(server.url, ""))
    first = await asyncio.gather(*(ask(clients[i % 2], "batch") for i in range(60)))
    assert sum(ok for _, ok in first) == LIMIT
    last = await asyncio.gather(*(ask(clients[2], "host") for _ in range(3)))
    assert not any(ok for _, ok in last)
