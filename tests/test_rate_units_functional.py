"""Rate units end to end: a tenant limited per second and per day, called through the proxy on loopback
with the official openai SDK; the 429s carry the Retry-After and x-ratelimit-* of the window that binds,
and the admin API lists every window of the limit."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import openai
import pytest
from conftest import Proxy
from test_admin_functional import serve_admin
from test_admission_functional import Gated, chat, gated, policy

pytestmark = pytest.mark.timeout(30)
__all__ = ["gated", "serve_admin"]  # fixtures shared with the admission and admin tests

StartProxy = Callable[..., Awaitable[Proxy]]
MakeAsync = Callable[..., openai.AsyncOpenAI]


async def test_a_tenant_limited_per_second_and_per_day_is_refused_by_each_in_turn(
    start_proxy: StartProxy, async_openai: MakeAsync, gated: Gated, serve_admin: Any
) -> None:
    proxy = await start_proxy(policy(gated, tenants="limits: {requests_per_second: 2, requests_per_day: 5}"))
    alpha = async_openai(proxy)
    admitted, by_second, by_day = 0, [], None
    for _ in range(40):
        try:
            await chat(alpha)
        except openai.RateLimitError as refused:
            headers = refused.response.headers
            if headers["x-ratelimit-limit-requests"] == "5":
                by_day = headers
                break
            by_second.append(headers)
            await asyncio.sleep(int(headers["retry-after-ms"]) / 1000)
        else:
            admitted += 1
    assert admitted == 5 and len(gated.seen) == 5
    assert by_second, "a burst faster than 2 a second was never refused by the second"
    for headers in by_second:  # the second's window binds: its own numbers, a wait under two seconds
        assert headers["x-ratelimit-limit-requests"] == "2"
        assert headers["x-ratelimit-remaining-requests"] == "0"
        assert 0 < int(headers["retry-after-ms"]) <= 2000
    assert by_day is not None, "the sixth request of the day was admitted"
    assert by_day["x-ratelimit-remaining-requests"] == "0"
    assert int(by_day["retry-after"]) > 3600  # the day has to slide, however quiet the second is
    await chat(async_openai(proxy, key="sk-beta"))  # another tenant is not affected
    status, body = await (await serve_admin(proxy)).call("GET", "/admin/queues")
    assert status == 200
    (alpha_limit,) = [entry for entry in body["limits"] if entry["key"] == "tenant:alpha"]
    assert alpha_limit["requests_per_day"]["limit"] == 5 and alpha_limit["requests_per_day"]["remaining"] == 0
    assert alpha_limit["requests_per_second"]["limit"] == 2
    assert "requests_per_minute" not in alpha_limit
