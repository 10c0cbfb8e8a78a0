"""The Redis limiter store against a real redis-server (started per test on a free port): atomic
all-or-nothing admission, Retry-After from Redis's clock, settlement, shared concurrency leases with
renewal and reclaim, NOSCRIPT reload, timeouts and the breaker, reloads, and a one-node Redis Cluster
(scripts must keep every key of a call in one slot). Pure parts (key layout, breaker, local shares,
URL parsing) are tested without sockets."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from kit import until
from redis.crc import key_slot
from redis_server import RedisServer, running

from proxy.admission.limits import Refusal
from proxy.admission.redis import codec as codec
from proxy.admission.redis.client import parse
from proxy.admission.redis.degrade import Breaker, local_share
from proxy.admission.redis.store import RedisStore, SharedReservation
from proxy.admission.store import Reservation
from proxy.policy.plan import Limit, LimitSpec, StateRule
from proxy.telemetry.metrics import Metrics

pytestmark = pytest.mark.timeout(30)


def limit(key: str = "tenant:a", *, rpm: int | None = None, tpm: int | None = None, conc: int | None = None) -> Limit:
    return Limit(key, f"scope {key}", "a", LimitSpec(rpm, tpm, conc))


# --- pure: key layout, breaker, local shares, URLs -----------------------------------------------------


def test_every_key_of_a_limit_shares_one_hash_tag_and_slot() -> None:
    for key in ("tenant:alpha", "route:chat/tenant:alpha", "upstream:openai-eu", "route:r.1"):
        window, leases = codec.limit_keys("signalbox", key)
        tag = "{signalbox:" + key + "}"
        assert window == tag + ":window" and leases == tag + ":leases"
        assert key_slot(window.encode()) == key_slot(leases.encode()) == key_slot(tag[1:-1].encode())
    # Different limits (and prefixes) are different tags, so a Cluster spreads them over slots.
    assert codec.hash_tag("signalbox", "tenant:a") != codec.hash_tag("signalbox", "tenant:b")
    assert codec.hash_tag("p1", "tenant:a") != codec.hash_tag("p2", "tenant:a")
    prepared = [codec.prepare("sb", limit("tenant:a", rpm=1)), codec.prepare("sb", limit("route:r", conc=2))]
    keys, args = codec.acquire_call(prepared, 10, "lease-1", 30000, 60.0)
    assert keys == ["{sb:tenant:a}:window", "{sb:tenant:a}:leases", "{sb:route:r}:window", "{sb:route:r}:leases"]
    # tokens, lease, ttl, headroom; then per limit: concurrent, hash expiry, units, (suffix, length, rpm, tpm)...
    assert args == [10, "lease-1", 30000, 0.0, 0, 121_000, 1, "", 60.0, 1, 0, 2, 121_000, 0]


def test_breaker_opens_after_consecutive_failures_and_probes_once_per_cooldown() -> None:
    breaker = Breaker(failures=3, cooldown=1.0)
    assert breaker.allow(0.0)
    assert not breaker.failure(0.0) and not breaker.failure(0.1)
    breaker.success(0.2)  # a success resets the count
    assert not breaker.failure(0.3) and not breaker.failure(0.4)
    assert breaker.failure(0.5)  # the third in a row: degraded (True = a change to report)
    assert breaker.degraded and not breaker.allow(1.0)
    assert breaker.allow(1.5)  # cooldown over: this caller is the probe...
    assert not breaker.allow(1.5)  # ...and the only one
    assert not breaker.failure(1.6)  # the probe failed: still degraded, nothing new to report
    assert not breaker.allow(2.0) and breaker.allow(2.6)
    breaker.abandon()  # a cancelled probe: the next caller probes at once
    assert breaker.allow(2.61)
    assert breaker.success(2.7) and not breaker.degraded  # True = back to shared
    assert not breaker.success(2.8)


def test_local_share_is_the_limit_divided_by_the_replicas_never_below_one() -> None:
    shared = limit(rpm=60, tpm=100_000, conc=5)
    share = local_share(shared, 3)
    assert share.spec == LimitSpec(20, 33_333, 1) and share.key == shared.key
    assert local_share(limit(rpm=2), 3).spec.requests_per_minute == 1
    assert local_share(shared, 1) is shared


def test_store_urls_are_parsed_without_leaking_credentials() -> None:
    plain = parse("redis://:s3cret@cache.internal:6380/2")
    assert (plain.kind, plain.hosts, plain.where) == ("standalone", (("cache.internal", 6380),), "redis://cache.internal:6380")
    assert parse("rediss://cache:6379").tls
    assert parse("unix:///run/redis.sock").where == "unix:///run/redis.sock"
    sentinel = parse("redis+sentinel://user:p%40ss@s1:26379,s2,[::1]:26380/mymaster/3")
    assert sentinel.kind == "sentinel" and sentinel.service == "mymaster" and sentinel.db == 3
    assert sentinel.hosts == (("s1", 26379), ("s2", 26379), ("::1", 26380))
    assert (sentinel.username, sentinel.password) == ("user", "p@ss")
    assert "p@ss" not in sentinel.where and "p%40ss" not in sentinel.where
    cluster = parse("rediss+cluster://:pw@n1:7000,n2:7001")
    assert cluster.kind == "cluster" and cluster.tls and cluster.hosts == (("n1", 7000), ("n2", 7001))
    for bad in ("http://x", "redis+sentinel://s1:26379", "redis+cluster://n1:7000/3", "redis+foo://x"):
        with pytest.raises(ValueError) as caught:
            parse(bad)
        assert "x:" not in str(caught.value).replace("://", "")  # the message never echoes the URL


# --- against a real redis-server ------------------------------------------------------------------------


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    with running(tmp_path) as redis:
        yield redis


def rule(url: str, **overrides: object) -> StateRule:
    settings: dict[str, object] = {"backend": "redis", "url": url, "key_prefix": "t", "timeout": 1.0}
    settings.update(overrides)
    return StateRule(**settings)  # type: ignore[arg-type]


@pytest.fixture
async def stores() -> AsyncIterator[list[RedisStore]]:
    """Stores a test opens (each one a "replica"); closed at teardown."""
    opened: list[RedisStore] = []
    yield opened
    for store in opened:
        await store.close()


async def open_store(stores: list[RedisStore], url: str, **overrides: object) -> RedisStore:
    metrics = overrides.pop("metrics", None)
    store = RedisStore.open(rule(url, **overrides), metrics)  # type: ignore[arg-type]
    await store.start()
    stores.append(store)
    return store


def degraded(metrics: Metrics) -> float | None:
    return metrics.registry.get_sample_value("signalbox_limiter_degraded")


async def redis_time(store: RedisStore) -> float:
    sec, usec = await store.client.time()
    return codec.redis_now(sec, usec)


async def test_admission_is_all_or_nothing_across_limits(server: RedisServer, stores: list[RedisStore]) -> None:
    store = await open_store(stores, server.url)
    tenant, route = limit("tenant:a", rpm=10), limit("route:chat", rpm=1)
    first = await store.try_acquire([tenant, route], 0)
    assert isinstance(first, SharedReservation) and [x.key for x in first.limits] == ["tenant:a", "route:chat"]
    second = await store.try_acquire([tenant, route], 0)
    assert isinstance(second, Refusal) and second.limit.key == "route:chat" and second.exact
    usage = {u.key: u for u in await store.remaining()}
    assert usage["tenant:a"].requests is not None and usage["tenant:a"].requests.used == 1  # refused: not counted
    assert usage["route:chat"].requests is not None and usage["route:chat"].requests.remaining == 0


async def test_retry_after_follows_the_sliding_window_on_redis_time(
    server: RedisServer, stores: list[RedisStore]
) -> None:
    store = await open_store(stores, server.url)
    other = await open_store(stores, server.url)  # another replica sees the same counts
    lim = limit(rpm=3)
    now = await redis_time(store)
    if now % 60 > 55:  # keep the four calls inside one window
        await asyncio.sleep(60 - now % 60 + 0.05)
    for replica in (store, other, store):
        assert isinstance(await replica.try_acquire([lim], 0), SharedReservation)
    refused = await other.try_acquire([lim], 0)
    now = await redis_time(store)
    assert isinstance(refused, Refusal) and refused.dimension == "requests" and refused.retry_after is not None
    # Three counted in this window: one more fits once a third of the next window has passed.
    frees_at = (now // 60 + 1) * 60 + 60 / 3
    assert refused.retry_after == pytest.approx(frees_at - now, abs=0.05)
    assert refused.usage.requests is not None and refused.usage.requests.remaining == 0
    assert refused.usage.requests.reset == pytest.approx((now // 60 + 2) * 60 - now, abs=0.05)


async def test_settle_refunds_or_charges_the_difference_once(server: RedisServer, stores: list[RedisStore]) -> None:
    store = await open_store(stores, server.url)
    lim = limit(tpm=1000)
    reservation = await store.try_acquire([lim], 600)
    assert isinstance(reservation, SharedReservation)
    refused = await store.try_acquire([lim], 500)
    assert isinstance(refused, Refusal) and refused.dimension == "tokens"
    assert not refused.exact  # 600 reserved and unsettled: a refund may come first
    await store.settle(reservation, requests=1, tokens=100)  # refund 500
    await store.settle(reservation, requests=1, tokens=0)  # ignored: settled once
    (usage,) = await store.remaining()
    assert usage.tokens is not None and usage.tokens.used == pytest.approx(100, abs=2)
    second = await store.try_acquire([lim], 100)
    assert isinstance(second, SharedReservation)
    await store.settle(second, requests=1, tokens=400)  # charge 300 more
    (usage,) = await store.remaining()
    assert usage.tokens is not None and usage.tokens.used == pytest.approx(500, abs=5)
    exact = await store.try_acquire([lim], 900)
    assert isinstance(exact, Refusal) and exact.exact  # nothing pending any more: the wait is exact


async def test_concurrency_leases_are_shared_and_released_once(server: RedisServer, stores: list[RedisStore]) -> None:
    a = await open_store(stores, server.url)
    b = await open_store(stores, server.url)
    lim = limit(conc=2)
    first, second = await a.try_acquire([lim], 0), await b.try_acquire([lim], 0)
    assert isinstance(first, SharedReservation) and first.concurrent
    assert isinstance(second, SharedReservation) and second.concurrent
    refused = await a.try_acquire([lim], 0)
    assert isinstance(refused, Refusal) and refused.dimension == "concurrent" and not refused.exact
    assert refused.usage.concurrent == (2, 2)
    await b.release(second)
    await b.release(second)  # idempotent
    (usage,) = await a.remaining()
    assert usage.concurrent == (2, 1)
    assert isinstance(await a.try_acquire([lim], 0), SharedReservation)


async def test_leases_are_renewed_while_held_and_reclaimed_after_a_replica_dies(
    server: RedisServer, stores: list[RedisStore]
) -> None:
    live = await open_store(stores, server.url, lease_ttl=0.3)
    other = await open_store(stores, server.url, lease_ttl=0.3)
    lim = limit(conc=1)
    held = await live.try_acquire([lim], 0)
    assert isinstance(held, SharedReservation)
    await asyncio.sleep(1.0)  # three TTLs: only renewal keeps it
    assert isinstance(await other.try_acquire([lim], 0), Refusal)
    await live.release(held)
    taken = await other.try_acquire([lim], 0)
    assert isinstance(taken, SharedReservation)
    # A replica that dies holding it: the lease stays until its TTL runs out, then is reclaimed.
    stores.remove(other)
    await other.close(release=False)
    died = time.monotonic()

    async def reclaimed() -> bool:
        return not isinstance(await live.try_acquire([lim], 0), Refusal)

    await until(reclaimed, within=3.0, step=0.02)  # the dead replica's lease, once its TTL ran out
    assert time.monotonic() - died > 0.15


async def test_scripts_are_reloaded_after_noscript(server: RedisServer, stores: list[RedisStore]) -> None:
    store = await open_store(stores, server.url)
    lim = limit(rpm=5, tpm=1000, conc=3)
    first = await store.try_acquire([lim], 100)
    assert isinstance(first, SharedReservation)
    assert server.command("SCRIPT FLUSH") == "+OK"  # as after a restart or a failover
    second = await store.try_acquire([lim], 100)
    assert isinstance(second, SharedReservation)
    server.command("SCRIPT FLUSH")
    await store.settle(second, requests=1, tokens=10)
    await store.release(second)
    server.command("SCRIPT FLUSH")
    (usage,) = await store.remaining()
    assert usage.requests is not None and usage.requests.used == 2
    assert usage.tokens is not None and usage.tokens.used == pytest.approx(110, abs=2)
    assert usage.concurrent == (3, 1)
    assert store.health.degraded is False


async def test_a_silent_redis_costs_one_timeout_then_local_shares_apply(
    tmp_path: Path, stores: list[RedisStore]
) -> None:
    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(-1)  # accepts and reads, never answers
        writer.close()

    silent = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    metrics = Metrics()
    try:
        store = await open_store(
            stores, f"redis://127.0.0.1:{port}", timeout=0.05, expected_replicas=3, metrics=metrics
        )
        assert store.health.degraded  # the scripts could not be loaded: degraded from the start
        assert degraded(metrics) == 1
        lim = limit(rpm=6)  # 6 / 3 replicas = 2 here
        results = [await store.try_acquire([lim], 0) for _ in range(3)]  # the breaker is open: local limits
        assert [type(r) for r in results] == [Reservation, Reservation, Refusal]
        refused = results[2]
        assert isinstance(refused, Refusal) and refused.limit.spec.requests_per_minute == 2
        assert store.describe()["degraded"] is True and "TimeoutError" in (store.describe()["reason"] or "")
    finally:
        silent.close()


async def test_redis_stopping_opens_the_breaker_and_a_restart_closes_it(
    server: RedisServer, stores: list[RedisStore], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="signalbox.limits")
    metrics = Metrics()
    store = await open_store(stores, server.url, timeout=0.2, metrics=metrics, breaker_cooldown=0.1)
    lim = limit(rpm=100)
    assert isinstance(await store.try_acquire([lim], 0), SharedReservation)
    await server.astop()
    for _ in range(3):  # refused connections: fast failures, each answered from local limits
        result = await store.try_acquire([lim], 0)
        assert isinstance(result, Reservation) and not isinstance(result, SharedReservation)
    assert store.health.degraded and degraded(metrics) == 1
    failures = [
        metrics.registry.get_sample_value("signalbox_redis_errors_total", {"op": op, "kind": "connection"}) or 0
        for op in ("acquire", "probe")
    ]
    assert failures[0] >= 1 and sum(failures) >= 3  # the keeper pings an idle Redis too: it may fail first
    await server.astart()
    await until(lambda: not store.health.degraded, within=5.0, step=0.02)  # the keeper probes after each cooldown
    assert degraded(metrics) == 0
    assert isinstance(await store.try_acquire([lim], 0), SharedReservation)  # NOSCRIPT: loaded again
    changes = [r for r in caplog.records if r.name == "signalbox.limits" and r.levelno >= logging.INFO]
    assert [r.levelname for r in changes[1:]] == ["WARNING", "INFO"]  # once per change, not per request
    assert "unreachable" in changes[1].getMessage() and "shared again" in changes[2].getMessage()


async def test_cancelled_acquire_leaves_no_lease_behind(tmp_path: Path, stores: list[RedisStore]) -> None:
    gate = asyncio.Event()

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await gate.wait()
        writer.close()

    hanging = await asyncio.start_server(slow, "127.0.0.1", 0)
    port = hanging.sockets[0].getsockname()[1]
    try:
        store = RedisStore.open(rule(f"redis://127.0.0.1:{port}", timeout=2.0))
        stores.append(store)  # not started: the breaker is closed, the call hangs until cancelled
        task = asyncio.get_running_loop().create_task(store.try_acquire([limit(conc=1)], 0))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert len(store._orphans) == 1 and not store._held  # removed from Redis later, or it expires
        assert not store.health.degraded  # a cancellation is not a Redis failure
    finally:
        gate.set()
        hanging.close()


async def test_reload_keeps_the_shared_counts_and_uses_the_new_numbers(
    server: RedisServer, stores: list[RedisStore]
) -> None:
    store = await open_store(stores, server.url, expected_replicas=2)
    old = limit(rpm=3)
    for _ in range(3):
        assert isinstance(await store.try_acquire([old], 0), SharedReservation)
    assert isinstance(await store.try_acquire([old], 0), Refusal)
    new = limit(rpm=4)
    await store.reconfigure({new.key: new})
    # A request still holding the old plan is counted under the new numbers.
    assert isinstance(await store.try_acquire([old], 0), SharedReservation)
    refused = await store.try_acquire([old], 0)
    assert isinstance(refused, Refusal) and refused.limit.spec.requests_per_minute == 4
    assert store.failopen.share(new).spec.requests_per_minute == 2  # the fallback follows the reload too


# --- a one-node Redis Cluster ---------------------------------------------------------------------------


async def test_cluster_keeps_each_limit_in_one_slot_and_rolls_back_partial_admissions(
    tmp_path: Path, stores: list[RedisStore]
) -> None:
    with running(tmp_path, cluster=True) as node:
        url = f"redis+cluster://127.0.0.1:{node.port}"
        store = await open_store(stores, url)
        assert store.cluster and not store.health.degraded
        tenant, route = limit("tenant:a", rpm=10, tpm=1000, conc=3), limit("route:chat", rpm=1)
        first = await store.try_acquire([tenant, route], 100)
        assert isinstance(first, SharedReservation) and first.concurrent
        refused = await store.try_acquire([tenant, route], 100)
        assert isinstance(refused, Refusal) and refused.limit.key == "route:chat"
        usage = {u.key: u for u in await store.remaining()}
        tenant_usage = usage["tenant:a"]
        assert tenant_usage.requests is not None and tenant_usage.requests.used == 1  # rolled back
        assert tenant_usage.tokens is not None and tenant_usage.tokens.used == pytest.approx(100, abs=2)
        assert tenant_usage.concurrent == (3, 1)
        await store.settle(first, requests=1, tokens=40)
        await store.release(first)
        usage = {u.key: u for u in await store.remaining()}
        assert usage["tenant:a"].concurrent == (3, 0)
        assert usage["tenant:a"].tokens is not None and usage["tenant:a"].tokens.used == pytest.approx(40, abs=1)
        assert not store.health.degraded
        stores.remove(store)
        await store.close()


async def test_finish_settles_and_releases_in_one_round_trip(server: RedisServer, stores: list[RedisStore]) -> None:
    metrics = Metrics()
    store = await open_store(stores, server.url, metrics=metrics)
    lim = limit(tpm=1000, conc=1)

    def adjusts() -> float:
        return metrics.registry.get_sample_value("signalbox_redis_call_seconds_count", {"op": "adjust"}) or 0.0

    reservation = await store.try_acquire([lim], 600)
    assert isinstance(reservation, SharedReservation)
    await store.finish(reservation, requests=1, tokens=100)  # refund 500 and give the lease back
    assert adjusts() == 1
    await store.finish(reservation, requests=1, tokens=0)  # once: nothing more is sent
    assert adjusts() == 1
    (usage,) = await store.remaining()
    assert usage.tokens is not None and usage.tokens.used == pytest.approx(100, abs=2)
    assert usage.concurrent == (1, 0)
    again = await store.try_acquire([lim], 0)  # the lease is gone: concurrency 1 admits again
    assert isinstance(again, SharedReservation)
    await store.finish(again, requests=1, tokens=0)  # no tokens reserved: only the lease goes back
    assert adjusts() == 2
    (usage,) = await store.remaining()
    assert usage.concurrent == (1, 0)
