"""Rate units and priority reserves in the Redis limiter store, against a real redis-server (one per test, on
loopback): every unit's window in the scripts, several units in one limit, settlement into every unit, and
headroom across replicas: three independent `RedisStore` clients (each its own connection pool, as three
proxies would have) share one limit with `queues.NAME.reserve` configured, and the highest class is never
refused while lower classes take from the shared budget."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from redis_server import RedisServer, running

from proxy.admission.limits import Refusal
from proxy.admission.redis import codec as codec
from proxy.admission.redis.store import RedisStore, SharedReservation
from proxy.policy.compile import compile_plan
from proxy.policy.load import load_policy
from proxy.policy.plan import Limit, LimitSpec, Plan, StateRule, headroom_for

pytestmark = pytest.mark.timeout(30)

HOST, PLANNER, CRITIC, BATCH = range(4)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    with running(tmp_path) as redis:
        yield redis


OpenStore = Callable[..., Awaitable[RedisStore]]


@pytest.fixture
async def opened() -> AsyncIterator[OpenStore]:
    """opened(url, prefix) -> a started RedisStore with its own client and pool; all closed at teardown."""
    stores: list[RedisStore] = []

    async def open_store(url: str, prefix: str = "t") -> RedisStore:
        rule = StateRule(backend="redis", url=url, key_prefix=prefix, timeout=2.0)
        store = RedisStore.open(rule)
        await store.start()
        stores.append(store)
        return store

    yield open_store
    for store in stores:
        await store.close()


def limit(key: str = "tenant:a", **numbers: int) -> Limit:
    return Limit(key, f"tenant '{key}'", "a", LimitSpec(**numbers))  # type: ignore[arg-type]


async def redis_now(store: RedisStore) -> float:
    sec, usec = await store.client.time()
    return codec.redis_now(sec, usec)


# --- units in the scripts --------------------------------------------------------------------------------


async def test_per_second_and_per_day_both_bind_across_replicas(server: RedisServer, opened: OpenStore) -> None:
    a, b = await opened(server.url), await opened(server.url)
    lim = limit(requests_per_second=2, requests_per_day=5)
    now = await redis_now(a)
    if now % 1 > 0.7:  # keep the first burst inside one second
        await asyncio.sleep(1.02 - now % 1)
    assert isinstance(await a.try_acquire([lim], 0), SharedReservation)
    assert isinstance(await b.try_acquire([lim], 0), SharedReservation)
    burst = await a.try_acquire([lim], 0)
    assert isinstance(burst, Refusal) and burst.unit == "second" and burst.exact
    assert burst.retry_after is not None and 0 < burst.retry_after <= 2.0  # computed, not measured
    admitted = 2
    for _ in range(60):  # the day's other three, as fast as the per-second window lets them through
        result = await (a, b)[admitted % 2].try_acquire([lim], 0)
        if isinstance(result, SharedReservation):
            admitted += 1
            continue
        assert result.unit in ("second", "day")
        if result.unit == "day":
            break
        assert result.retry_after is not None
        await asyncio.sleep(result.retry_after + 0.01)
    assert admitted == 5
    day = await b.try_acquire([lim], 0)
    assert isinstance(day, Refusal) and day.unit == "day" and day.dimension == "requests"
    assert day.retry_after is not None and day.retry_after > 3600  # the day must slide, not the second
    (usage,) = await a.remaining(["tenant:a"])
    assert {m.name: round(m.used) for m in usage.windows}["requests_per_day"] == 5


async def test_settle_refunds_into_every_unit_and_the_layout_keeps_minute_fields(
    server: RedisServer, opened: OpenStore
) -> None:
    store = await opened(server.url)
    lim = limit(tokens_per_minute=1000, tokens_per_day=1500, requests_per_second=50)
    held = await store.try_acquire([lim], 900)
    assert isinstance(held, SharedReservation)
    refused = await store.try_acquire([lim], 700)
    assert isinstance(refused, Refusal) and refused.dimension == "tokens" and not refused.exact
    assert refused.unit in ("minute", "day")
    await store.settle(held, requests=1, tokens=300)  # 600 back, in the minute and in the day
    (usage,) = await store.remaining(["tenant:a"])
    used = {m.name: m.used for m in usage.windows}
    assert used["tokens_per_minute"] == pytest.approx(300, abs=5)
    assert used["tokens_per_day"] == pytest.approx(300, abs=1)
    assert used["requests_per_second"] <= 1
    keys = await store.client.hkeys("{t:tenant:a}:window")
    fields = {k.decode() if isinstance(k, bytes) else k for k in keys}
    # The minute keeps the field names of the minute-only layout; other units carry a suffix.
    assert {"i", "tc", "tp", "pc", "i_d", "tc_d", "i_s", "rc_s"} <= fields
    ttl_ms = int(await store.client.pttl("{t:tenant:a}:window"))
    assert ttl_ms > 2 * 86400 * 1000 - 60_000  # kept as long as the day's previous window counts


async def test_headroom_in_the_script_for_requests_tokens_and_concurrency(
    server: RedisServer, opened: OpenStore
) -> None:
    store = await opened(server.url)
    rate = limit("route:r", requests_per_hour=10)
    low = 0
    while isinstance(await store.try_acquire([rate], 0, headroom=0.25), SharedReservation):
        low += 1
    assert low == 7  # 7.5 may be used by a class that must leave 25% free
    refused = await store.try_acquire([rate], 0, headroom=0.25)
    assert isinstance(refused, Refusal) and refused.exact and refused.headroom == 0.25
    assert refused.retry_after is not None and refused.retry_after > 60
    top = [await store.try_acquire([rate], 0) for _ in range(4)]
    assert [isinstance(t, SharedReservation) for t in top] == [True, True, True, False]
    tokens = limit("route:t", tokens_per_minute=1000)
    assert isinstance(await store.try_acquire([tokens], 700, headroom=0.3), SharedReservation)
    assert isinstance(await store.try_acquire([tokens], 1, headroom=0.3), Refusal)
    never = await store.try_acquire([tokens], 701, headroom=0.3)
    assert isinstance(never, Refusal) and never.retry_after is None
    assert isinstance(await store.try_acquire([tokens], 300), SharedReservation)
    slots = limit("route:c", concurrent=4)
    held = [await store.try_acquire([slots], 0, headroom=0.5) for _ in range(3)]
    assert [isinstance(h, SharedReservation) for h in held] == [True, True, False]
    assert isinstance(await store.try_acquire([slots], 0), SharedReservation)
    assert isinstance(await store.try_acquire([slots], 0), SharedReservation)


# --- reserves across three replicas ---------------------------------------------------------------------


POLICY = """
priorities: [host, planner, critic, batch]
upstreams:
  llm: {{provider: mock, limits: {{requests_per_day: 50}}}}
tenants:
  app: {{keys: [sk-app]}}
queues:
  agents: {{concurrency: 100{reserve}}}
routes:
  - {{name: chat, upstream: llm, queue: agents}}
"""


def plan(write: Path, reserve: str) -> Plan:
    write.write_text(POLICY.format(reserve=reserve))
    return compile_plan(load_policy(write))


Outcome = list[tuple[int, bool]]


async def replica(store: RedisStore, plan: Plan, classes: list[int], outcome: Outcome) -> None:
    """One proxy's stream of requests, each asking the shared store with its class's headroom."""
    queue = plan.queues["agents"]
    lim = plan.upstreams["llm"].limit
    assert lim is not None
    for cls in classes:
        result = await store.try_acquire([lim], 0, headroom=headroom_for(queue, cls))
        outcome.append((cls, isinstance(result, SharedReservation)))


def counts(outcome: Outcome, admitted: bool) -> dict[int, int]:
    found = dict.fromkeys(range(4), 0)
    for cls, ok in outcome:
        found[cls] += ok == admitted
    return found


async def test_three_replicas_never_refuse_the_top_class_while_lower_ones_take_the_shared_budget(
    server: RedisServer, opened: OpenStore, tmp_path: Path
) -> None:
    reserved = plan(tmp_path / "policy.yaml", ", reserve: {host: 20%, planner: 10%}")
    assert reserved.queues["agents"].headroom == pytest.approx((0.0, 0.2, 0.3, 0.3))
    stores = [await opened(server.url, "fleet") for _ in range(3)]  # three proxies, three pools
    shuffle = random.Random(13).shuffle
    streams = [[BATCH] * 30, [PLANNER, HOST] * 5 + [BATCH] * 10, [CRITIC, HOST, CRITIC] * 5]
    for stream in streams:
        shuffle(stream)  # every replica interleaves its classes
    outcome: Outcome = []
    await asyncio.gather(*(replica(s, reserved, c, outcome) for s, c in zip(stores, streams, strict=True)))
    admitted, refused = counts(outcome, True), counts(outcome, False)
    assert admitted[HOST] == 10 and refused[HOST] == 0  # all of the top class, whatever the order
    assert admitted[BATCH] > 0 and refused[BATCH] > 0  # the lower classes took from the shared budget...
    assert admitted[CRITIC] + admitted[BATCH] <= 35  # ...but never the top 30% of it (50 x 0.7)
    assert admitted[PLANNER] + admitted[CRITIC] + admitted[BATCH] <= 40  # nor planners the top 20%
    (usage,) = await stores[0].remaining(["upstream:llm"])
    assert usage.requests is not None and usage.requests.used == pytest.approx(sum(admitted.values()))
    assert 35 <= sum(admitted.values()) <= 50


@pytest.mark.parametrize("reserve", ["", ", reserve: {host: 20%}"])
async def test_batch_on_two_replicas_cannot_take_what_a_host_request_on_the_third_needs(
    server: RedisServer, opened: OpenStore, tmp_path: Path, reserve: str
) -> None:
    """The issue's example: batch traffic on replicas A and B arrives first and drains the shared budget;
    the host requests that come to C afterwards find it empty, unless the policy reserves their share."""
    shared = plan(tmp_path / "policy.yaml", reserve)
    a, b, c = [await opened(server.url, "fleet") for _ in range(3)]
    outcome: Outcome = []
    await asyncio.gather(replica(a, shared, [BATCH] * 30, outcome), replica(b, shared, [BATCH] * 30, outcome))
    await replica(c, shared, [HOST] * 10, outcome)
    admitted = counts(outcome, True)
    if reserve:
        assert (admitted[BATCH], admitted[HOST]) == (40, 10)
    else:
        assert (admitted[BATCH], admitted[HOST]) == (50, 0)  # without a reserve the top class starves
