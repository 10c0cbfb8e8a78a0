"""Shared by the outcome, queue-status and health tests: the mock upstream on loopback, a policy over it,
reading /metrics samples by label, and raw streams a test can abandon at a chosen point."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import aiohttp
import pytest
from conftest import Proxy
from kit import samples, total

from proxy.mock.server import MockSettings, start_mock


@pytest.fixture
async def mock_url() -> AsyncIterator[str]:
    runner, url = await start_mock(MockSettings(output_tokens=6))
    yield url
    await runner.cleanup()


def policy(mock_url: str, *, route_extra: str = "", top: str = "", upstream_extra: str = "") -> str:
    """`gpt-*` → queue `chat` (4 slots); `tight-*` → queue `tight` (1 slot, 1 waiter); tenant `beta` may send
    one request a minute; a first-token limit of 400 ms on both routes."""
    return f"""
identify: {{mode: api_key}}
{top}
upstreams:
  mock: {{provider: openai, base_url: "{mock_url}/v1", api_key: sk-up{upstream_extra}}}
tenants:
  alpha: {{keys: [sk-alpha]}}
  beta: {{keys: [sk-beta], limits: {{requests_per_minute: 1}}}}
queues:
  chat: {{concurrency: 4, max_waiting: 100, max_wait: 10s}}
  tight: {{concurrency: 1, max_waiting: 1, max_wait: 10s}}
routes:
  - name: chat
    match: {{path: /v1/chat/completions, model: "gpt-*"}}
    upstream: mock
    queue: chat
    timeouts: {{first_token: 400ms}}
    {route_extra}
  - name: tight
    match: {{path: /v1/chat/completions, model: "tight-*"}}
    upstream: mock
    queue: tight
    timeouts: {{first_token: 2s}}
"""


def body(model: str = "gpt-4o", *, stream: bool = False) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "Hi"}], "stream": stream}


def auth(key: str = "sk-alpha", **mock: str) -> dict[str, str]:
    """Headers: the tenant's key and `x-mock-*` knobs (drop_after="2" → x-mock-drop-after: 2)."""
    return {"Authorization": f"Bearer {key}", **{"x-mock-" + k.replace("_", "-"): v for k, v in mock.items()}}


async def post(proxy: Proxy, payload: dict[str, Any], headers: dict[str, str]) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as session, session.post(
        proxy.v1 + "/chat/completions", json=payload, headers=headers
    ) as response:
        return response.status, await response.read()


async def metrics(proxy: Proxy) -> str:
    async with aiohttp.ClientSession() as session, session.get(proxy.url + "/metrics") as response:
        return await response.text()


def sample(text: str, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels` (0 when none)."""
    return total(samples(text), name, **labels)


def line_of(proxy: Proxy, request_id: str) -> dict[str, Any]:
    (line,) = [line for line in proxy.access_lines() if line["request_id"] == request_id]
    return line


async def idle(proxy: Proxy) -> None:
    """Every handler ended (and wrote its access line)."""
    async with asyncio.timeout(5):
        while proxy.state.in_flight:  # noqa: ASYNC110 - a plain counter in the proxy
            await asyncio.sleep(0.01)


def start(coro: Awaitable[Any]) -> asyncio.Task[Any]:
    """A request running in the background (the client side of a test)."""

    async def run() -> Any:
        return await coro

    return asyncio.get_running_loop().create_task(run())


