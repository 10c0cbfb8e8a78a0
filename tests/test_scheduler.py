"""The scheduler: pure ordering (strict classes, weighted fairness across tenants, ageing, removal) with
a fake clock, then the async slot life cycle (grant on release, bounds, pause/resume/clear, cancellation)
on a real event loop without sockets."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.call import Call
from proxy.errors import InvalidRequest, QueueCleared, QueueFull, QueueTimeout
from proxy.flow.board import GONE, FairQueue, Ticket
from proxy.flow.scheduler import Scheduler, priority_of
from proxy.policy.plan import Plan
from proxy.telemetry.metrics import Metrics

pytestmark = pytest.mark.timeout(20)


def drain(queue: FairQueue, now: float = 0.0) -> list[Ticket]:
    out = []
    while (ticket := queue.pop(now)) is not None:
        out.append(ticket)
    return out


# --- pure ordering -------------------------------------------------------------------------------


def test_strict_priority_classes_first() -> None:
    q = FairQueue(3)
    low, mid, high = Ticket("a", 2), Ticket("a", 1), Ticket("b", 0)
    for t in (low, mid, high):
        q.push(t, 0.0)
    assert drain(q) == [high, mid, low]


def test_fifo_within_a_tenant() -> None:
    q = FairQueue(1)
    tickets = [Ticket("a", 0, request_id=str(i)) for i in range(5)]
    for t in tickets:
        q.push(t, 0.0)
    assert drain(q) == tickets


def test_a_flooding_tenant_does_not_starve_a_single_request() -> None:
    q = FairQueue(1)
    for i in range(1000):
        q.push(Ticket("flood", 0, request_id=f"f{i}"), 0.0)
    lone = Ticket("lone", 0, request_id="lone")
    q.push(lone, 0.0)
    first_two = [q.pop(0.0), q.pop(0.0)]
    assert lone in first_two
    assert len(q) == 999


def test_weights_share_the_queue_in_proportion() -> None:
    q = FairQueue(1)
    for i in range(100):
        q.push(Ticket("heavy", 0, weight=2.0, request_id=f"h{i}"), 0.0)
        q.push(Ticket("light", 0, weight=1.0, request_id=f"l{i}"), 0.0)
    served = Counter(t.tenant for t in (q.pop(0.0) for _ in range(30)) if t is not None)
    assert served == {"heavy": 20, "light": 10}


def test_fractional_weights_still_alternate_fairly() -> None:
    q = FairQueue(1)
    for i in range(50):
        q.push(Ticket("a", 0, weight=0.5, request_id=f"a{i}"), 0.0)
        q.push(Ticket("b", 0, weight=1.5, request_id=f"b{i}"), 0.0)
    served = Counter(t.tenant for t in (q.pop(0.0) for _ in range(40)) if t is not None)
    assert served == {"a": 10, "b": 30}


def test_removed_tickets_are_never_served_and_counts_stay_right() -> None:
    q = FairQueue(2)
    tickets = [Ticket("a", i % 2, request_id=str(i)) for i in range(200)]
    for t in tickets:
        q.push(t, 0.0)
    for t in tickets[::3]:
        assert q.remove(t)
    assert not q.remove(tickets[0])  # already gone
    assert len(q) == 200 - len(tickets[::3])
    assert sum(q.counts().values()) == len(q)
    served = drain(q)
    assert set(served).isdisjoint(tickets[::3])
    assert len(served) == 200 - len(tickets[::3])
    assert q.counts() == {}


def test_ageing_moves_a_waiting_request_up_a_class_per_interval() -> None:
    q = FairQueue(3, ageing=10.0)
    old = Ticket("batchy", 2, request_id="old")
    q.push(old, 0.0)
    for i in range(100):
        q.push(Ticket("vip", 0, request_id=f"v{i}"), 24.0)
    # At t=25 it has waited 25 s: two classes up, so it competes in the top class by round robin.
    first_two = [q.pop(25.0), q.pop(25.0)]
    assert old in first_two and old.cls == 0


def test_without_ageing_the_low_class_waits_for_every_higher_request() -> None:
    q = FairQueue(3)
    old = Ticket("batchy", 2)
    q.push(old, 0.0)
    for _ in range(100):
        q.push(Ticket("vip", 0), 24.0)
    assert drain(q, 1000.0)[-1] is old


def test_position_is_one_for_the_head_and_counts_the_round_robin() -> None:
    q = FairQueue(2)
    flood = [Ticket("flood", 1) for _ in range(10)]
    for t in flood:
        q.push(t, 0.0)
    lone = Ticket("lone", 1)
    q.push(lone, 0.0)
    assert q.position(flood[0]) == 1
    assert q.position(lone) == 2
    assert q.position(flood[9]) == 11
    high = Ticket("x", 0)
    q.push(high, 0.0)
    assert q.position(high) == 1 and q.position(lone) == 3


def test_clear_returns_every_waiting_ticket() -> None:
    q = FairQueue(2)
    tickets = [Ticket(f"t{i % 3}", i % 2) for i in range(10)]
    for t in tickets:
        q.push(t, 0.0)
    q.remove(tickets[4])
    cleared = q.clear()
    assert sorted(map(id, cleared)) == sorted(id(t) for t in tickets if t is not tickets[4])
    assert len(q) == 0 and q.pop(0.0) is None and all(t.state == GONE for t in tickets)


@settings(max_examples=200, deadline=None)
@given(
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("push"), st.integers(0, 2), st.sampled_from("abcd")),
            st.tuples(st.just("pop"), st.just(0), st.just("")),
            st.tuples(st.just("remove"), st.integers(0, 50), st.just("")),
        ),
        max_size=120,
    ),
    ageing=st.sampled_from([None, 5.0]),
)
def test_order_invariants(ops: list[tuple[str, int, str]], ageing: float | None) -> None:
    """Property: never serve a class while a higher one waits; each ticket leaves exactly once."""
    q = FairQueue(3, ageing=ageing)
    pushed: list[Ticket] = []
    left: set[int] = set()
    now = 0.0
    for op, number, tenant in ops:
        now += 1.0
        if op == "push":
            ticket = Ticket(tenant, number, weight=1.0 + (ord(tenant) % 2))
            q.push(ticket, now)
            pushed.append(ticket)
        elif op == "pop":
            ticket_or_none = q.pop(now)
            if ticket_or_none is None:
                assert len(q) == 0
                continue
            assert id(ticket_or_none) not in left
            assert all(t.cls >= ticket_or_none.cls for t in q.tickets())
            left.add(id(ticket_or_none))
        elif pushed:
            victim = pushed[number % len(pushed)]
            if q.remove(victim):
                assert id(victim) not in left
                left.add(id(victim))
        assert len(q) == len(pushed) - len(left) == sum(q.counts().values())
    rest = drain(q, now)
    assert len(left) + len(rest) == len(pushed)
    assert left.isdisjoint(map(id, rest))


# --- priority from the tenant and the header ---------------------------------------------------------

POLICY = """
priorities: [critical, standard, batch]
queues:
  q: {{concurrency: {concurrency}, max_waiting: {max_waiting}, max_wait: {max_wait}}}
upstreams:
  u: {{provider: openai, base_url: "http://127.0.0.1:9/v1"}}
tenants:
  a: {{keys: [ka], weight: 1}}
  b: {{keys: [kb], priority: batch, max_priority: standard}}
  vip: {{keys: [kv], priority: standard, max_priority: critical, weight: 3}}
routes:
  - name: chat
    upstream: u
    queue: q
"""


@pytest.fixture
def plan_for(make_plan: Callable[[str], Plan]) -> Callable[..., Plan]:
    def build(concurrency: int = 1, max_waiting: int = 100, max_wait: str = "5s") -> Plan:
        return make_plan(POLICY.format(concurrency=concurrency, max_waiting=max_waiting, max_wait=max_wait))

    return build


def test_priority_of_header_and_caps(plan_for: Callable[..., Plan]) -> None:
    plan = plan_for()
    a, b, vip = plan.tenants["a"], plan.tenants["b"], plan.tenants["vip"]
    assert (a.priority, b.priority, vip.priority) == (1, 2, 1)
    assert vip.weight == 3 and a.weight == 1
    assert priority_of(plan, a, None) == 1
    assert priority_of(plan, a, "batch") == 2  # lower: always allowed
    assert priority_of(plan, a, "critical") == 1  # higher than allowed: capped at the tenant's max
    assert priority_of(plan, b, "standard") == 1  # b's max_priority allows standard
    assert priority_of(plan, vip, "critical") == 0
    with pytest.raises(InvalidRequest, match="unknown priority class 'urgent'.*critical, standard, batch"):
        priority_of(plan, a, "urgent")


# --- the async slot -------------------------------------------------------------------------------


def call_for(plan: Plan, tenant: str, rid: str = "") -> Call:
    call = Call(rid or tenant, plan, "POST", "/v1/chat/completions", "openai", time.perf_counter())
    call.tenant = plan.tenants[tenant]
    call.route = plan.routes[0]
    call.model = "m"
    return call


async def hold(sched: Scheduler, call: Call, log: list[str], release: asyncio.Event) -> None:
    async with sched.slot(call):
        log.append(call.request_id)
        await release.wait()


def start(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
    return asyncio.get_running_loop().create_task(coro)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_waiter_gets_the_slot_when_it_frees(plan_for: Callable[..., Plan]) -> None:
    plan = plan_for(concurrency=1)
    sched = Scheduler(Metrics())
    log: list[str] = []
    gate1, gate2 = asyncio.Event(), asyncio.Event()
    first = start(hold(sched, call_for(plan, "a", "r1"), log, gate1))
    await settle()
    second = start(hold(sched, call_for(plan, "a", "r2"), log, gate2))
    await settle()
    queue = sched.queues["q"]
    assert log == ["r1"] and queue.active == 1 and len(queue.board) == 1
    gate1.set()
    await first
    await settle()
    assert log == ["r1", "r2"] and queue.active == 1 and len(queue.board) == 0
    gate2.set()
    await second
    assert queue.active == 0 and queue.admitted == 2


async def test_bounds_full_and_timeout(plan_for: Callable[..., Plan]) -> None:
    plan = plan_for(concurrency=1, max_waiting=1, max_wait="200ms")
    metrics = Metrics()
    sched = Scheduler(metrics)
    gate = asyncio.Event()
    log: list[str] = []
    holder = start(hold(sched, call_for(plan, "a", "r1"), log, gate))
    await settle()
    waiter = start(hold(sched, call_for(plan, "a", "r2"), log, gate))
    await settle()
    with pytest.raises(QueueFull) as full:
        async with sched.slot(call_for(plan, "b", "r3")):
            pass
    assert full.value.should_retry is False and "max_waiting 1" in full.value.message
    with pytest.raises(QueueTimeout, match=r"waited 0\.\d+s in queue 'q'"):
        await asyncio.wait_for(waiter, 2)
    queue = sched.queues["q"]
    assert queue.rejected == {"queue_full": 1, "queue_timeout": 1} and len(queue.board) == 0
    # The timed-out wait is a wait: a queue whose waiters all time out must not look idle.
    assert metrics.registry.get_sample_value("signalbox_queue_wait_seconds_count", {"queue": "q"}) == 1
    holder_wait, timed_out = queue.waits  # the holder found a free slot; the waiter's wait is recorded
    assert holder_wait == 0.0 and timed_out > 0.0
    gate.set()
    await holder
    assert queue.active == 0


async def test_queue_length_drops_the_classes_a_reload_renamed(
    plan_for: Callable[..., Plan], make_plan: Callable[[str], Plan]
) -> None:
    plan = plan_for(concurrency=1)
    metrics = Metrics()
    sched = Scheduler(metrics)
    gate = asyncio.Event()
    log: list[str] = []
    tasks = [start(hold(sched, call_for(plan, "a", f"r{i}"), log, gate)) for i in range(3)]
    await settle()
    await sched.refresh_metrics()
    waiting = {"queue": "q", "priority": "standard"}
    assert metrics.registry.get_sample_value("signalbox_queue_length", waiting) == 2
    renamed = make_plan(POLICY.replace("[critical, standard, batch]", "[gold, silver, bronze]")
                        .replace("priority: batch, max_priority: standard", "priority: bronze")
                        .replace("priority: standard, max_priority: critical", "priority: silver")
                        .format(concurrency=1, max_waiting=100, max_wait="5s"))
    sched.reconfigure(renamed)
    await sched.refresh_metrics()
    assert metrics.registry.get_sample_value("signalbox_queue_length", waiting) is None
    assert metrics.registry.get_sample_value("signalbox_queue_length", {"queue": "q", "priority": "silver"}) == 2
    gate.set()
    await asyncio.gather(*tasks)


async def test_cancelled_waiter_is_removed_and_never_runs(plan_for: Callable[..., Plan]) -> None:
    plan = plan_for(concurrency=1)
    sched = Scheduler(Metrics())
    gate = asyncio.Event()
    log: list[str] = []
    holder = start(hold(sched, call_for(plan, "a", "r1"), log, gate))
    await settle()
    gone = start(hold(sched, call_for(plan, "b", "r2"), log, gate))
    await settle()
    queue = sched.queues["q"]
    assert len(queue.board) == 1
    gone.cancel()
    await settle()
    assert len(queue.board) == 0 and queue.rejected == {} and queue.left == 1
    gate.set()
    await holder
    assert log == ["r1"] and queue.active == 0


async def test_cancelled_just_after_the_grant_passes_the_slot_on(plan_for: Callable[..., Plan]) -> None:
    plan = plan_for(concurrency=1)
    sched = Scheduler(Metrics())
    log: list[str] = []
    gate3 = asyncio.Event()
    mine = sched.slot(call_for(plan, "a", "r1"))
    await mine.__aenter__()
    unlucky = start(hold(sched, call_for(plan, "a", "r2"), log, asyncio.Event()))
    third = start(hold(sched, call_for(plan, "b", "r3"), log, gate3))
    await settle()
    await mine.__aexit__(None, None, None)  # grants r2 (a's lane is first) without yielding...
    unlucky.cancel()  # ...and r2 is cancelled before it could run
    await settle()
    queue = sched.queues["q"]
    assert log == ["r3"] and queue.active == 1
    gate3.set()
    await third
    assert queue.active == 0 and unlucky.cancelled()


async def test_pause_keeps_requests_waiting_and_resume_grants(plan_for: Callable[..., Plan]) -> None:
    plan = plan_for(concurrency=2)
    sched = Scheduler(Metrics())
    log: list[str] = []
    gate = asyncio.Event()
    running = start(hold(sched, call_for(plan, "a", "r1"), log, gate))
    await settle()
    queue = sched.queues["q"]
    queue.pause()
    paused = [
        start(hold(sched, call_for(plan, "b", f"p{i}"), log, gate))
        for i in range(3)
    ]
    await settle()
    assert log == ["r1"] and len(queue.board) == 3  # a free slot, but paused
    queue.resume()
    await settle()
    assert log == ["r1", "p0"] and len(queue.board) == 2
    gate.set()
    await asyncio.wait_for(asyncio.gather(running, *paused), 2)
    assert log == ["r1", "p0", "p1", "p2"] and queue.active == 0


async def test_clear_fails_every_waiter_with_503_no_retry(plan_for: Callable[..., Plan]) -> None:
    plan = plan_for(concurrency=1)
    sched = Scheduler(Metrics())
    log: list[str] = []
    gate = asyncio.Event()
    running = start(hold(sched, call_for(plan, "a", "r1"), log, gate))
    await settle()
    waiters = [
        start(hold(sched, call_for(plan, "b", f"w{i}"), log, gate))
        for i in range(4)
    ]
    await settle()
    queue = sched.queues["q"]
    assert queue.clear() == 4
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, QueueCleared) and r.status == 503 and r.should_retry is False for r in results)
    assert "cleared by an operator" in str(results[0])
    gate.set()
    await running
    assert log == ["r1"] and queue.active == 0 and queue.rejected == {"queue_cleared": 4}


async def test_reload_reconfigures_the_queue_and_grants_new_slots(plan_for: Callable[..., Plan]) -> None:
    plan = plan_for(concurrency=1)
    sched = Scheduler(Metrics())
    log: list[str] = []
    gate = asyncio.Event()
    tasks = [
        start(hold(sched, call_for(plan, "a", f"r{i}"), log, gate))
        for i in range(3)
    ]
    await settle()
    assert log == ["r0"]
    bigger = plan_for(concurrency=3)
    sched.queue(bigger.routes[0].queue, bigger.priorities)  # type: ignore[arg-type]
    await settle()
    assert log == ["r0", "r1", "r2"]
    gate.set()
    await asyncio.gather(*tasks)


async def test_after_a_reload_an_old_plan_request_does_not_flip_the_queue_back(
    plan_for: Callable[..., Plan]
) -> None:
    old, new = plan_for(concurrency=1), plan_for(concurrency=4)
    sched = Scheduler(Metrics())
    async with sched.slot(call_for(old, "a")):
        pass
    sched.reconfigure(new)
    assert sched.queues["q"].spec.concurrency == 4
    async with sched.slot(call_for(old, "a")):  # arrived before the reload, reaches the queue after it
        assert sched.queues["q"].spec.concurrency == 4


async def test_route_without_queue_pays_nothing(make_plan: Callable[[str], Plan]) -> None:
    plan = make_plan("""
    upstreams: {u: {provider: openai, base_url: "http://127.0.0.1:9/v1"}}
    tenants: {a: {keys: [ka]}}
    routes: [{name: chat, upstream: u}]
    """)
    sched = Scheduler()
    cm1, cm2 = sched.slot(call_for(plan, "a")), sched.slot(call_for(plan, "a"))
    assert cm1 is cm2  # the shared no-op
    async with cm1:
        pass
    assert sched.queues == {}
