"""Flow control as a platform team measures it: who is served first when each limit binds.

The scenario of a multi-agent app at test scale: five classes (host > planner > critic > reporter >
nightly), the built-in mock upstream, and a backlog of a few hundred concurrent calls sent lowest class
first. The backlog forms while the queue is paused (an operator's pause), then drains through one binding
constraint at a time: the queue's slots, the upstream's concurrency, a requests-per-second window, a
tokens-per-second window. A call's wait is counted from the moment the backlog starts to drain to the
moment the call leaves the queue (its arrival time in the access log plus the `x-signalbox-queue-wait-ms`
it read back): connections reach the proxy in no fixed order, so waits from arrival would measure the
network, not the scheduler. The test asserts orders and counts, never durations.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
from collections.abc import Callable
from typing import Any

import openai
import pytest

from tests.conftest import Proxy

pytestmark = pytest.mark.timeout(120)

CLASSES = ["host", "planner", "critic", "reporter", "nightly"]
PER_CLASS = 50

POLICY = """
priorities: [host, planner, critic, reporter, nightly]
upstreams:
  llm: {{provider: mock, mock: {{ttft: 5ms, output_tokens: 4}}{upstream_limits}}}
queues:
  llm: {{concurrency: {slots}, max_wait: {max_wait}, max_waiting: 2000}}
tenants:
  app: {{keys: [sk-app], priority: critic, max_priority: host}}
  nightly: {{keys: [sk-nightly], priority: nightly}}
routes:
  - {{name: chat, upstream: llm, on_limit: queue, queue: llm{route_limits}}}
"""

# Each case: one constraint binds (the others are far away).
CASES: dict[str, dict[str, Any]] = {
    "queue slots": {"slots": 6},
    "upstream concurrency": {"slots": 10_000, "upstream_limits": ", limits: {concurrent: 6}"},
    "requests per second": {"slots": 10_000, "upstream_limits": ", limits: {requests_per_second: 60}"},
    "tokens per second": {"slots": 10_000, "route_limits": ", limits: {tokens_per_second: 3000}"},
}


def scenario_policy(case: dict[str, Any], max_wait: str = "120s") -> str:
    return POLICY.format(slots=case["slots"], max_wait=max_wait, upstream_limits=case.get("upstream_limits", ""),
                         route_limits=case.get("route_limits", ""))


Outcome = tuple[str, int | None, str | None]
"""(class or request id, queue wait in ms or None, error type or None)."""
_IDS = itertools.count()


async def call(client: openai.AsyncOpenAI, cls: str, request_id: str | None = None) -> Outcome:
    try:
        raw = await client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": "plan the next step"}], max_tokens=40,
            extra_headers={"x-signalbox-priority": cls, "x-request-id": request_id or f"{cls}-{next(_IDS)}"},
        )
    except openai.APIStatusError as err:
        return cls, int(err.response.headers.get("x-signalbox-queue-wait-ms", "-1")), f"{err.status_code}"
    raw.parse()
    return cls, int(raw.headers["x-signalbox-queue-wait-ms"]), None


async def play(proxy: Proxy, clients: dict[str, openai.AsyncOpenAI]) -> tuple[list[Outcome], float]:
    """Send the backlog lowest class first into the paused queue, then resume it; the outcomes and the wall
    time the backlog started to drain."""
    state = proxy.state
    plan = state.plans.current
    gate = state.scheduler.queue(plan.queues["llm"], plan.priorities)
    gate.pause()
    tasks = []
    loop = asyncio.get_running_loop()
    for cls in reversed(CLASSES):
        client = clients["nightly" if cls == "nightly" else "app"]
        tasks += [loop.create_task(call(client, cls)) for _ in range(PER_CLASS)]
    while len(gate.board) < len(tasks):  # noqa: ASYNC110 - the backlog forms in the proxy
        await asyncio.sleep(0.02)
    resumed = time.time()
    gate.resume()
    return list(await asyncio.gather(*tasks)), resumed


def waits_by_class(proxy: Proxy, resumed: float) -> dict[str, list[float]]:
    """Seconds from the drain's start to leaving the queue, per class, for the calls that succeeded."""
    found: dict[str, list[float]] = {cls: [] for cls in CLASSES}
    for line in proxy.access_lines():
        if line["status"] == 200:
            left = line["ts"] + (line["queue_wait_ms"] or 0) / 1000
            found[line["request_id"].split("-")[0]].append(left - resumed)
    return found


@pytest.fixture
def clients(async_openai: Callable[..., openai.AsyncOpenAI]) -> Callable[[Proxy], dict[str, openai.AsyncOpenAI]]:
    def make(proxy: Proxy) -> dict[str, openai.AsyncOpenAI]:
        return {"app": async_openai(proxy, key="sk-app", timeout=60.0),
                "nightly": async_openai(proxy, key="sk-nightly", timeout=60.0)}

    return make


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
async def test_every_binding_constraint_serves_the_classes_in_order(
    case: str, start_proxy: Callable[..., Any], clients: Callable[[Proxy], dict[str, openai.AsyncOpenAI]]
) -> None:
    proxy = await start_proxy(scenario_policy(CASES[case]))
    outcomes, resumed = await play(proxy, clients(proxy))
    assert [error for _, _, error in outcomes if error] == []
    waits = waits_by_class(proxy, resumed)
    assert all(len(waits[cls]) == PER_CLASS for cls in CLASSES)
    for higher, lower in zip(CLASSES, CLASSES[1:], strict=False):
        assert statistics.median(waits[higher]) < statistics.median(waits[lower]), (higher, lower)
        assert max(waits[higher]) < max(waits[lower]), (higher, lower)


async def test_when_waits_run_out_no_higher_class_fails_while_a_lower_one_succeeds(
    start_proxy: Callable[..., Any], clients: Callable[[Proxy], dict[str, openai.AsyncOpenAI]]
) -> None:
    proxy = await start_proxy(scenario_policy({"slots": 10_000,
                                               "upstream_limits": ", limits: {requests_per_second: 60}"},
                                              max_wait="2s"))
    outcomes, _ = await play(proxy, clients(proxy))
    failed = {cls for cls, _, error in outcomes if error}
    succeeded = {cls for cls, _, error in outcomes if error is None}
    assert failed and succeeded  # the limit binds: some wait out their max_wait
    assert {error for _, _, error in outcomes if error} == {"429"}
    rank = CLASSES.index
    # Every class above the lowest class with a success was served whole; none below it got anything.
    assert max(rank(c) for c in succeeded) <= min(rank(c) for c in failed)


# --- head-of-line blocking, hand-over to dispatch, shedding -------------------------------------------------

SHARED = """
priorities: [host, planner, critic, reporter, nightly]
upstreams:
  llm: {{provider: mock, mock: {{output_tokens: 4}}{upstream}}}
queues:
  q: {{concurrency: {slots}, max_wait: 60s{extra}}}
tenants:
  a: {{keys: [sk-a], priority: critic, max_priority: host{a_limits}}}
  b: {{keys: [sk-b], priority: critic, max_priority: host}}
routes:
  - {{name: chat, upstream: llm, on_limit: queue, queue: q}}
"""


def shared_policy(slots: int = 4, upstream: str = "", extra: str = "", a_limits: str = "") -> str:
    return SHARED.format(slots=slots, upstream=upstream, extra=extra, a_limits=a_limits)


async def test_a_tenant_over_its_own_rate_holds_up_nobody_else(
    start_proxy: Callable[..., Any], async_openai: Callable[..., openai.AsyncOpenAI]
) -> None:
    proxy = await start_proxy(shared_policy(a_limits=", limits: {requests_per_minute: 2}"))
    a, b = async_openai(proxy, key="sk-a", timeout=60.0), async_openai(proxy, key="sk-b")
    loop = asyncio.get_running_loop()
    first = [await call(a, "critic") for _ in range(2)]  # a's budget for this minute
    assert [error for _, _, error in first] == [None, None]
    stuck = [loop.create_task(call(a, "critic")) for _ in range(3)]
    gate = proxy.state.scheduler.queues["q"]
    while len(gate.board) < 3:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    served = await asyncio.gather(*[call(b, "critic") for _ in range(10)])
    assert [error for _, _, error in served] == [None] * 10  # b went past a's waiters, same class
    assert len(gate.board) == 3 and not any(t.done() for t in stuck)  # a's keep their places
    head = min(gate.board.tickets(), key=gate.board.position)
    assert "tenant 'a' (allows 2 requests per minute)" in gate.cause(head)  # what the admin API says it waits for
    eta = gate.eta_of(head)
    assert eta is not None and eta > 0  # the refill rate of a's window bounds the estimate
    for task in stuck:
        task.cancel()
    await asyncio.gather(*stuck, return_exceptions=True)


async def test_the_upstream_capacity_taken_in_the_queue_is_the_one_dispatch_uses(
    start_proxy: Callable[..., Any], async_openai: Callable[..., openai.AsyncOpenAI]
) -> None:
    proxy = await start_proxy(shared_policy(upstream=", limits: {requests_per_minute: 5, concurrent: 2}"))
    client = async_openai(proxy, key="sk-b")
    outcomes = await asyncio.gather(*[call(client, "critic") for _ in range(5)])
    assert [error for _, _, error in outcomes] == [None] * 5
    usage = {u.key: u for u in await proxy.state.admission.store.remaining()}["upstream:llm"]
    assert usage.requests is not None and usage.requests.used == 5  # counted once each, not twice
    assert usage.concurrent == (2, 0)  # every hold given back


async def test_shedding_refuses_the_lowest_class_first(
    start_proxy: Callable[..., Any], async_openai: Callable[..., openai.AsyncOpenAI]
) -> None:
    proxy = await start_proxy(shared_policy(slots=1, extra=", shed: {waiting: 6}"))
    client = async_openai(proxy, key="sk-a", timeout=60.0)
    plan = proxy.state.plans.current
    gate = proxy.state.scheduler.queue(plan.queues["q"], plan.priorities)
    gate.pause()
    loop = asyncio.get_running_loop()
    order = ["nightly"] * 3 + ["reporter"] * 3 + ["host"] * 4 + ["planner"] * 2
    tasks = []
    for cls in order:
        tasks.append(loop.create_task(call(client, cls)))
        while not tasks[-1].done() and len(gate.board) + sum(t.done() for t in tasks) < len(tasks):  # noqa: ASYNC110
            await asyncio.sleep(0.005)
    gate.resume()
    outcomes = await asyncio.gather(*tasks)
    shed = [cls for cls, _, error in outcomes if error == "429"]
    # 12 arrivals past a threshold of 6: the 6 extra pushed out the 3 nightly, then the 3 reporters.
    assert sorted(shed) == ["nightly"] * 3 + ["reporter"] * 3
    assert gate.rejected.get("queue_shed") == 6


async def test_a_request_shed_with_no_lower_class_waiting_is_refused_itself_with_an_estimate(
    start_proxy: Callable[..., Any], async_openai: Callable[..., openai.AsyncOpenAI]
) -> None:
    proxy = await start_proxy(shared_policy(slots=1, extra=", shed: {waiting: 2}"))
    client = async_openai(proxy, key="sk-a", timeout=60.0)
    plan = proxy.state.plans.current
    gate = proxy.state.scheduler.queue(plan.queues["q"], plan.priorities)
    gate.pause()
    loop = asyncio.get_running_loop()
    waiting = [loop.create_task(call(client, "host")) for _ in range(2)]
    while len(gate.board) < 2:  # noqa: ASYNC110
        await asyncio.sleep(0.005)
    with pytest.raises(openai.RateLimitError) as refused:
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}],
                                             extra_headers={"x-signalbox-priority": "nightly"})
    headers = refused.value.response.headers
    assert headers["x-should-retry"] == "true" and int(headers["retry-after"]) >= 1
    assert "shedding" in refused.value.message
    gate.resume()
    assert [error for _, _, error in await asyncio.gather(*waiting)] == [None, None]
