"""Every request is recorded once, by what the client finally got, in the metric and in the access log alike:
the proxy on loopback in front of the mock upstream (real OpenAI wire format), clients that succeed, fail,
time out, get refused or leave at chosen points. And the times: TTFT and processing count from dispatch, so a
queue wait stays out of them."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import aiohttp
import openai
import pytest
from conftest import Proxy
from kit import until
from outcome_helpers import auth, body, idle, line_of, metrics, mock_url, policy, post, sample, start

pytestmark = pytest.mark.timeout(30)
__all__ = ["mock_url"]  # the fixture

StartProxy = Callable[..., Awaitable[Proxy]]
MakeAsync = Callable[..., openai.AsyncOpenAI]


def requests_total(text: str, route: str, status: str, outcome: str) -> float:
    return sample(text, "signalbox_requests_total", route=route, status=status, outcome=outcome)


async def test_a_success_is_ok(start_proxy: StartProxy, async_openai: MakeAsync, mock_url: str) -> None:
    proxy = await start_proxy(policy(mock_url))
    answer = await async_openai(proxy).chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "Hi"}], extra_headers={"x-request-id": "r-ok"}
    )
    assert answer.parse().choices[0].message.content
    await idle(proxy)
    line = line_of(proxy, "r-ok")
    assert (line["status"], line["outcome"], line["reason"]) == (200, "ok", None)
    assert line["processing_ms"] is not None and line["ttft_ms"] is None  # not a stream
    assert requests_total(await metrics(proxy), "chat", "200", "ok") == 1


async def test_a_stream_failing_midway_is_an_upstream_error_with_its_status_line(
    start_proxy: StartProxy, mock_url: str
) -> None:
    proxy = await start_proxy(policy(mock_url))
    status, data = await post(proxy, body(stream=True), {**auth(drop_after="2"), "x-request-id": "r-cut"})
    assert status == 200 and data.count(b"data: ") == 3 and b'"error"' in data  # two events, then the error
    await idle(proxy)
    line = line_of(proxy, "r-cut")
    assert (line["status"], line["outcome"], line["reason"]) == (200, "upstream_error", "upstream_unreachable")
    assert line["ttft_ms"] is not None  # it had started
    text = await metrics(proxy)
    assert requests_total(text, "chat", "200", "upstream_error") == 1
    assert requests_total(text, "chat", "200", "ok") == 0  # the old books counted it as a success


async def test_an_upstream_error_answer_is_an_upstream_error(start_proxy: StartProxy, mock_url: str) -> None:
    proxy = await start_proxy(policy(mock_url))
    status, _ = await post(proxy, body(), {**auth(status="503"), "x-request-id": "r-503"})
    assert status == 503
    await idle(proxy)
    line = line_of(proxy, "r-503")
    assert (line["status"], line["outcome"], line["reason"]) == (503, "upstream_error", "upstream_503")
    assert requests_total(await metrics(proxy), "chat", "503", "upstream_error") == 1


async def abandon(proxy: Proxy, request_id: str, events: int, **mock: str) -> None:
    """Open a stream, read its status line and `events` events, then close the connection."""
    async with aiohttp.ClientSession() as session:
        response = await session.post(
            proxy.v1 + "/chat/completions", json=body(stream=True), headers={**auth(**mock), "x-request-id": request_id}
        )
        assert response.status == 200
        for _ in range(events):
            await response.content.readuntil(b"\n\n")
        response.close()  # the client leaves
    await idle(proxy)


@pytest.mark.parametrize("events", [0, 1], ids=["before-first-event", "after-first-event"])
async def test_a_stream_the_client_abandons_is_cancelled_with_499(
    start_proxy: StartProxy, mock_url: str, events: int
) -> None:
    proxy = await start_proxy(policy(mock_url))
    # The mock sends its headers at once, then waits ttft before the first event and token_delay between events.
    await abandon(proxy, "r-gone", events, ttft_ms="0" if events else "3000", token_delay_ms="3000")
    line = line_of(proxy, "r-gone")
    assert (line["status"], line["outcome"], line["reason"]) == (499, "cancelled", "client_gone")
    assert line["client_gone"] is True and (line["events"] or 0) == events
    text = await metrics(proxy)
    assert requests_total(text, "chat", "499", "cancelled") == 1
    assert requests_total(text, "chat", "200", "ok") == 0


async def test_a_timeout_is_timeout(start_proxy: StartProxy, mock_url: str) -> None:
    proxy = await start_proxy(policy(mock_url))
    status, _ = await post(proxy, body(), {**auth(stall_ms="3000"), "x-request-id": "r-slow"})  # over first_token
    assert status == 504
    await idle(proxy)
    line = line_of(proxy, "r-slow")
    assert (line["status"], line["outcome"], line["reason"]) == (504, "timeout", "upstream_timeout")
    assert requests_total(await metrics(proxy), "chat", "504", "timeout") == 1


async def test_a_rate_limit_429_is_rejected_with_its_reason(start_proxy: StartProxy, mock_url: str) -> None:
    proxy = await start_proxy(policy(mock_url))
    assert (await post(proxy, body(), auth("sk-beta")))[0] == 200  # beta may send one a minute
    status, _ = await post(proxy, body(), {**auth("sk-beta"), "x-request-id": "r-limited"})
    assert status == 429
    await idle(proxy)
    line = line_of(proxy, "r-limited")
    assert (line["status"], line["outcome"], line["reason"]) == (429, "rejected", "rate_limit")
    assert line["processing_ms"] is None  # never dispatched
    text = await metrics(proxy)
    assert requests_total(text, "chat", "429", "rejected") == 1
    assert sample(text, "signalbox_rejections_total", reason="rate_limit") == 1


async def test_a_full_queue_429_is_rejected_with_its_reason(start_proxy: StartProxy, mock_url: str) -> None:
    proxy = await start_proxy(policy(mock_url))
    queue = proxy.state.scheduler

    holder = start(post(proxy, body("tight-1"), auth(ttft_ms="1500")))  # holds the one slot
    await until(lambda: "tight" in queue.queues and queue.queues["tight"].active == 1)
    waiter = start(post(proxy, body("tight-1"), auth()))  # the one place in line
    await until(lambda: len(queue.queues["tight"].board) == 1)
    status, _ = await post(proxy, body("tight-1"), {**auth(), "x-request-id": "r-full"})
    assert status == 429
    assert [(await holder)[0], (await waiter)[0]] == [200, 200]
    await idle(proxy)
    line = line_of(proxy, "r-full")
    assert (line["status"], line["outcome"], line["reason"]) == (429, "rejected", "queue_full")
    text = await metrics(proxy)
    assert requests_total(text, "tight", "429", "rejected") == 1
    assert requests_total(text, "tight", "200", "ok") == 2


async def test_a_waiter_that_leaves_is_cancelled_not_rejected(start_proxy: StartProxy, mock_url: str) -> None:
    proxy = await start_proxy(policy(mock_url))
    queues = proxy.state.scheduler.queues
    holder = start(post(proxy, body("tight-1"), auth(ttft_ms="1000")))
    await until(lambda: "tight" in queues and queues["tight"].active == 1)
    leaving = start(post(proxy, body("tight-1"), {**auth(), "x-request-id": "r-left"}))
    await until(lambda: len(queues["tight"].board) == 1)
    leaving.cancel()
    await asyncio.gather(leaving, return_exceptions=True)
    assert (await holder)[0] == 200
    await idle(proxy)
    line = line_of(proxy, "r-left")
    assert (line["status"], line["outcome"], line["reason"]) == (499, "cancelled", "client_gone")
    text = await metrics(proxy)
    assert requests_total(text, "tight", "499", "cancelled") == 1
    assert 'reason="client_gone"' not in text.split("signalbox_rejections_total", 1)[-1].split("# HELP", 1)[0]


async def test_ttft_and_processing_count_from_dispatch_not_from_arrival(
    start_proxy: StartProxy, mock_url: str
) -> None:
    proxy = await start_proxy(policy(mock_url))
    queues = proxy.state.scheduler.queues
    holder = start(post(proxy, body("tight-1"), auth(ttft_ms="800")))  # holds the slot 0.8 s
    await until(lambda: "tight" in queues and queues["tight"].active == 1)
    status, data = await post(proxy, body("tight-1", stream=True), {**auth(), "x-request-id": "r-waited"})
    assert status == 200 and data.endswith(b"data: [DONE]\n\n")
    assert (await holder)[0] == 200
    await idle(proxy)
    line = line_of(proxy, "r-waited")
    assert line["outcome"] == "ok" and line["queue_wait_ms"] > 0
    # It waited behind the held slot; from dispatch the mock answered at once.
    assert line["ttft_ms"] < line["queue_wait_ms"]
    assert line["ttft_ms"] <= line["processing_ms"] <= line["duration_ms"]
    assert line["queue_wait_ms"] + line["processing_ms"] <= line["duration_ms"] + 0.1
    text = await metrics(proxy)
    ttft_sum = sample(text, "signalbox_time_to_first_token_seconds_sum", route="tight")
    wait_sum = sample(text, "signalbox_queue_wait_seconds_sum", queue="tight")
    assert sample(text, "signalbox_time_to_first_token_seconds_count", route="tight") == 1
    assert 0 < ttft_sum < wait_sum
    assert sample(text, "signalbox_processing_seconds_count", route="tight") == 2
    assert sample(text, "signalbox_queue_wait_seconds_bucket", queue="tight", le="1800.0") >= 1
