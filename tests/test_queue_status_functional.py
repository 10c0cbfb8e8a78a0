"""GET /admin/queues under load from the mock upstream (seed 004): totals by outcome, exact; wait and processing
times present and ordered; utilisation while every slot is busy; the last minute's rate against the tightest
shared limit; an estimated wait per class. And the detailed health view: an open circuit or an unreachable
Redis degrades it while /readyz stays ready."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from conftest import Proxy, closed_port
from kit import until
from outcome_helpers import auth, body, idle, mock_url, policy, post, start
from test_admin_functional import serve_admin

pytestmark = pytest.mark.timeout(30)
__all__ = ["mock_url", "serve_admin"]  # the fixtures

StartProxy = Callable[..., Awaitable[Proxy]]
LIMITS = "limits: {requests_per_minute: 1000, tokens_per_minute: 100000}"


async def abandon_stream(proxy: Proxy) -> None:
    """A stream whose client leaves after the status line (the mock waits 3 s before its first event)."""
    async with aiohttp.ClientSession() as session:
        response = await session.post(proxy.v1 + "/chat/completions", json=body(stream=True),
                                      headers=auth(ttft_ms="3000"))
        assert response.status == 200
        response.close()


async def test_queue_status_counts_outcomes_and_times_under_load(
    start_proxy: StartProxy, mock_url: str, serve_admin: Any
) -> None:
    proxy = await start_proxy(policy(mock_url, route_extra=LIMITS))
    admin = await serve_admin(proxy)
    gate = proxy.state.scheduler
    jobs = [post(proxy, body(), auth(ttft_ms="300")) for _ in range(10)]  # 10 on 4 slots: some wait
    jobs += [post(proxy, body(), auth(status="500")) for _ in range(2)]
    jobs += [post(proxy, body(), auth(stall_ms="3000"))]  # over the route's first_token: a timeout
    running = [start(job) for job in jobs]
    await until(lambda: "chat" in gate.queues and gate.queues["chat"].active == 4 and gate.queues["chat"].board.live)
    status, busy = await admin.call("GET", "/admin/queues/chat")
    assert status == 200 and busy["name"] == "chat"
    assert busy["utilisation"] == 1.0 and busy["active"] == 4 and busy["waiting"] >= 1
    assert set(busy["estimated_wait_s"]) == set(gate.queues["chat"].classes)
    await abandon_stream(proxy)
    statuses = sorted(s for s, _ in await asyncio.gather(*running))
    assert statuses == [200] * 10 + [500, 500, 504]
    assert (await post(proxy, body(), auth("sk-beta")))[0] == 200
    assert (await post(proxy, body(), auth("sk-beta")))[0] == 429  # beta's one a minute
    await idle(proxy)

    status, listing = await admin.call("GET", "/admin/queues")
    (chat,) = [q for q in listing["queues"] if q["name"] == "chat"]
    assert chat["totals"] == {
        "finished": 16, "processed": 15, "succeeded": 11, "failed": 2, "failed_upstream": 2, "failed_proxy": 0,
        "timed_out": 1, "cancelled": 1, "rejected": 1, "rejected_by_reason": {"rate_limit": 1},
    }
    assert chat["utilisation"] == 0.0 and chat["active"] == 0
    processing, wait = chat["processing_ms"], chat["wait_ms"]
    assert processing["samples"] == 15 and wait["samples"] == 15  # the refused one never queued
    assert 0 < processing["p50"] <= processing["p95"] and processing["avg"] > 0
    assert 0 < wait["avg"] and wait["p50"] <= wait["p95"]
    assert processing["p95"] >= 300  # the mock took 0.3 s (a lower bound: what the upstream spent)
    rate = chat["rate"]
    assert rate["window_s"] == 60 and rate["requests"] == 15 and rate["tokens"] > 0
    assert rate["requests_limit"] == {
        "limit": "route:chat/requests_per_minute", "max_per_minute": 1000.0, "ratio": 0.015,
    }
    assert rate["tokens_limit"]["limit"] == "route:chat/tokens_per_minute"
    assert rate["tokens_limit"]["ratio"] == round(rate["tokens"] / 100000, 3)
    (tight,) = [q for q in listing["queues"] if q["name"] == "tight"]
    assert tight["totals"]["finished"] == 0 and tight["processing_ms"]["samples"] == 0
    assert tight["rate"]["requests_limit"] is None


# --- health ------------------------------------------------------------------------------------------------


async def details(admin: Any) -> tuple[int, dict[str, Any]]:
    return await admin.call("GET", "/healthz/details", token=None)  # readable without the admin token


async def readyz(proxy: Proxy) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.get(proxy.url + "/readyz") as response:
        return response.status, await response.json()


def check(body: dict[str, Any], prefix: str) -> dict[str, Any]:
    (found,) = [c for c in body["checks"] if c["name"].startswith(prefix)]
    return found


async def test_an_open_circuit_degrades_health_while_readyz_stays_ready(
    start_proxy: StartProxy, mock_url: str, serve_admin: Any
) -> None:
    breaker = ", breaker: {consecutive_failures: 2, cooldown: 30s}"
    proxy = await start_proxy(policy(mock_url, upstream_extra=breaker))
    admin = await serve_admin(proxy)
    status, healthy = await details(admin)
    assert status == 200 and healthy["status"] == "healthy"
    assert {c["state"] for c in healthy["checks"]} == {"healthy"}
    assert check(healthy, "circuit:")["circuit"] == "closed"

    for _ in range(2):
        assert (await post(proxy, body(), auth(status="500")))[0] == 500
    status, degraded = await details(admin)
    assert status == 200 and degraded["status"] == "degraded"
    circuit = check(degraded, "circuit:")
    assert circuit["state"] == "degraded" and circuit["circuit"] == "open" and circuit["upstream"] == "mock"
    assert check(degraded, "limiter_store")["state"] == "healthy"
    ready_status, ready = await readyz(proxy)
    assert ready_status == 200 and ready["ready"] is True and ready["health"] == "degraded"


async def test_redis_down_degrades_health(start_proxy: StartProxy, mock_url: str, serve_admin: Any) -> None:
    state = f'state: {{backend: redis, url: "redis://127.0.0.1:{closed_port()}/0", timeout: 200ms, ' \
            "breaker: {failures: 1, cooldown: 30s}}"
    proxy = await start_proxy(policy(mock_url, top=state))
    admin = await serve_admin(proxy)
    assert (await post(proxy, body(), auth("sk-beta")))[0] == 200  # a limit to count: Redis is asked, fails open
    status, health = await details(admin)
    assert status == 200 and health["status"] == "degraded"
    store = check(health, "limiter_store")
    assert store["state"] == "degraded" and store["backend"] == "redis" and store["degraded"] is True
    ready_status, ready = await readyz(proxy)
    assert ready_status == 200 and ready["ready"] is True


async def test_a_full_queue_degrades_and_draining_is_unhealthy(
    start_proxy: StartProxy, mock_url: str, serve_admin: Any
) -> None:
    proxy = await start_proxy(policy(mock_url))
    admin = await serve_admin(proxy)
    queues = proxy.state.scheduler.queues
    holder = start(post(proxy, body("tight-1"), auth(ttft_ms="800")))
    await until(lambda: "tight" in queues and queues["tight"].active == 1)
    waiter = start(post(proxy, body("tight-1"), auth()))
    await until(lambda: len(queues["tight"].board) == 1)
    _, full = await details(admin)
    tight = check(full, "queue:tight")
    assert full["status"] == "degraded" and tight["state"] == "degraded" and tight["saturation"] == 1.0
    assert check(full, "queue:chat")["state"] == "healthy"
    assert [(await holder)[0], (await waiter)[0]] == [200, 200]
    assert (await details(admin))[1]["status"] == "healthy"
    proxy.state.draining = True
    status, draining = await details(admin)
    assert status == 503 and draining["status"] == "unhealthy" and check(draining, "process")["state"] == "unhealthy"
