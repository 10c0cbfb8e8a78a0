"""The admitted path without waiting: with the in-memory store, a request that finds everything free enters
and leaves synchronously (no coroutine per limit, settle and release in one store call). These tests run the
same scenarios through that path and through the generic one (a store that is not the in-memory one, so every
step is awaited) and check that users see the same thing: who is served in which order, and what every limit
counted, including a burst that crosses from free capacity into waiting and waiters woken by the releases of
requests that never waited."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Sequence

import pytest

from proxy.admission.limits import Refusal, Usage
from proxy.admission.local import LocalStore
from proxy.admission.store import Reservation
from proxy.call import Attempt, Call
from proxy.errors import RateLimited, UpstreamLimited
from proxy.flow.admit import Admission
from proxy.flow.scheduler import Scheduler
from proxy.flow.upstream import UpstreamQuota
from proxy.policy.plan import Limit, LimitSpec, Plan
from proxy.tasks import spawn

pytestmark = pytest.mark.timeout(30)

CLASSES = ["host", "planner", "critic", "reporter", "nightly"]
_BIG = "{requests_per_minute: 100000, tokens_per_minute: 10000000, concurrent: 1000}"
POLICY = f"""
priorities: [{", ".join(CLASSES)}]
upstreams:
  llm:
    provider: openai
    base_url: http://127.0.0.1:9/v1
    limits: {{requests_per_minute: 100000, tokens_per_minute: 10000000, concurrent: 2}}
queues:
  q: {{concurrency: 1000, max_waiting: 100, max_wait: 20s}}
tenants:
  app: {{keys: [ka], priority: critic, max_priority: host, limits: {_BIG}}}
routes:
  - name: strict
    match: {{model: "strict-*"}}
    upstream: llm
    limits: {{requests_per_minute: 3, tokens_per_minute: 10000000}}
  - name: chat
    upstream: llm
    on_limit: queue
    queue: q
    limits:
      requests_per_minute: 100000
      tokens_per_minute: 10000000
      concurrent: 1000
      per_tenant: {_BIG}
"""
NOW = 1000.0
USED = 7
"""Tokens each request's `usage` reports (its estimate is larger: every settlement refunds)."""


class Generic:
    """The in-memory store behind the plain `LimiterStore` interface (not a `LocalStore`, so the flow layer
    awaits every step), counting the calls it gets."""

    def __init__(self, inner: LocalStore) -> None:
        self.inner = inner
        self.calls: dict[str, int] = {}

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    async def try_acquire(self, limits: Sequence[Limit], tokens: int, *, headroom: float = 0.0
                          ) -> Reservation | Refusal:
        found = await self.inner.try_acquire(limits, tokens, headroom=headroom)
        self._count("taken" if isinstance(found, Reservation) else "refused")
        return found

    async def release(self, reservation: Reservation) -> None:
        self._count("release")
        await self.inner.release(reservation)

    async def settle(self, reservation: Reservation, *, requests: int, tokens: int) -> None:
        self._count("settle")
        await self.inner.settle(reservation, requests=requests, tokens=tokens)

    async def finish(self, reservation: Reservation, *, requests: int, tokens: int) -> None:
        self._count("finish")
        await self.inner.finish(reservation, requests=requests, tokens=tokens)

    async def remaining(self, keys: Iterable[str] | None = None) -> list[Usage]:
        return await self.inner.remaining(keys)


class Watched(LocalStore):
    """The in-memory store, counting the calls that went through its coroutines (the admitted path makes none)."""

    def __init__(self) -> None:
        super().__init__(clock=lambda: NOW)
        self.awaited = 0

    async def try_acquire(self, limits: Sequence[Limit], tokens: int, *, headroom: float = 0.0
                          ) -> Reservation | Refusal:
        self.awaited += 1
        return await super().try_acquire(limits, tokens, headroom=headroom)

    async def release(self, reservation: Reservation) -> None:
        self.awaited += 1
        await super().release(reservation)

    async def settle(self, reservation: Reservation, *, requests: int, tokens: int) -> None:
        self.awaited += 1
        await super().settle(reservation, requests=requests, tokens=tokens)


class Flow:
    """A scheduler with its admission and upstream quota over one store, and the requests it served."""

    def __init__(self, plan: Plan, generic: bool) -> None:
        self.plan = plan
        self.local = Watched()
        self.store = Generic(self.local) if generic else None
        self.admission = Admission(self.store if self.store is not None else self.local)
        self.scheduler = Scheduler(admission=self.admission)
        self.quota = UpstreamQuota(self.admission, self.scheduler.kick)
        self.served: list[str] = []

    def call(self, rid: str, model: str = "m") -> Call:
        call = Call(rid, self.plan, "POST", "/v1/chat/completions", "openai", time.perf_counter())
        call.tenant = self.plan.tenants["app"]
        call.model = model
        call.raw_body = b'{"model":"%s","messages":[{"role":"user","content":"hi"}],"max_tokens":20}' % model.encode()
        call.body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}
        call.route = self.plan.resolve(call.path, model, call.tenant)
        return call

    async def request(self, rid: str, cls: str, done: asyncio.Event, model: str = "m") -> None:
        """What ingress, dispatch and the relay do with the flow layer for one answered request."""
        call = self.call(rid, model)
        async with self.scheduler.enter(call, cls):
            self.served.append(rid)
            assert call.route is not None
            limit = call.route.deployments[0].limit
            assert limit is not None
            taken = await self.quota.take(call, limit)
            assert not isinstance(taken, UpstreamLimited)
            call.hold = taken
            call.attempts.append(Attempt("llm", 200, 0.0))
            call.status = 200
            call.usage = {"total_tokens": USED}
            await done.wait()

    async def counts(self) -> dict[str, tuple[float, float, tuple[int, int] | None]]:
        """Per limit key: requests and tokens counted, and (limit, in use) of its concurrency."""
        return {
            u.key: (u.requests.used if u.requests else 0.0, u.tokens.used if u.tokens else 0.0, u.concurrent)
            for u in await self.local.remaining()
        }


async def turn() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


async def burst(flow: Flow) -> list[list[str]]:
    """Two requests find everything free and hold the upstream's two concurrent slots; then a burst of every
    class arrives, lowest first, and waits. Each holder that leaves frees one slot for the best waiter."""
    done = {f"fast{i}": asyncio.Event() for i in range(2)}
    tasks = [spawn(flow.request(rid, "nightly", done[rid]), name=rid) for rid in done]
    await turn()
    snapshots = [list(flow.served)]
    for i, cls in enumerate(reversed(CLASSES * 2)):
        rid = f"{cls}-{i}"
        done[rid] = asyncio.Event()
        tasks.append(spawn(flow.request(rid, cls, done[rid]), name=rid))
    await turn()
    snapshots.append(list(flow.served))
    while len(flow.served) < len(done) or not all(e.is_set() for e in done.values()):
        holding = [rid for rid in flow.served if not done[rid].is_set()]
        done[holding[0]].set()  # the oldest holder finishes: its upstream slot goes to the best waiter
        await turn()
        snapshots.append(list(flow.served))
    await asyncio.gather(*tasks)
    return snapshots


@pytest.mark.parametrize("generic", [False, True], ids=["in-memory", "generic"])
async def test_a_burst_crossing_into_waiting_keeps_class_order_and_counts(
    make_plan: Callable[[str], Plan], generic: bool
) -> None:
    flow = Flow(make_plan(POLICY), generic)
    snapshots = await burst(flow)
    assert snapshots[0] == ["fast0", "fast1"]  # free capacity: admitted at once
    assert snapshots[1] == ["fast0", "fast1"]  # the upstream's 2 concurrent are held: the burst waits
    # Every release by a request that never waited wakes exactly one waiter, best class first.
    assert [len(s) for s in snapshots[2:]] == list(range(3, 13)) + [12, 12]
    waited = [rid.split("-")[0] for rid in flow.served[2:]]
    assert waited == [cls for cls in CLASSES for _ in range(2)]
    counts = await flow.counts()
    # Every limit counted 12 requests of USED tokens each (estimates refunded) and holds nothing now.
    assert counts["upstream:llm"] == (12, 12 * USED, (2, 0))
    for key in ("tenant:app", "route:chat", "route:chat/tenant:app"):
        assert counts[key] == (12, 12 * USED, (1000, 0))
    gate = flow.scheduler.queues["q"]
    assert gate.active == 0 and gate.admitted == 12 and not gate.board.live
    if flow.store is None:  # the in-memory store: taken, settled and released without a coroutine
        assert flow.local.awaited == 0
    else:  # every reservation taken is finished in one store call, exactly once
        calls = flow.store.calls
        assert "settle" not in calls and "release" not in calls
        assert calls["finish"] == calls["taken"] >= 24


async def test_the_in_memory_and_the_generic_path_give_the_same_results(make_plan: Callable[[str], Plan]) -> None:
    plan = make_plan(POLICY)
    fast, generic = Flow(plan, False), Flow(plan, True)
    assert await burst(fast) == await burst(generic)
    assert fast.served == generic.served
    assert await fast.counts() == await generic.counts()
    # The tokens each tenant reserved, settled and had refunded (signalbox_tokens_total), the same whether
    # a request's own limits and its upstream's were settled in one pass (in-memory) or one by one.
    reserved, settled, refunded = fast.admission.tokens["app"]
    assert settled == 12 * USED and reserved == settled + refunded > settled
    assert fast.admission.tokens == generic.admission.tokens


@pytest.mark.parametrize("generic", [False, True], ids=["in-memory", "generic"])
async def test_a_route_that_rejects_counts_only_what_it_admits(
    make_plan: Callable[[str], Plan], generic: bool
) -> None:
    flow = Flow(make_plan(POLICY), generic)
    done = asyncio.Event()
    done.set()
    for i in range(3):
        await flow.request(f"s{i}", "critic", done, model="strict-1")
    with pytest.raises(RateLimited) as refused:
        await flow.request("s3", "critic", done, model="strict-1")
    assert "route 'strict' (tenant 'app') allows 3 requests per minute" in refused.value.message
    counts = await flow.counts()
    assert counts["route:strict"] == (3, 3 * USED, None)
    assert counts["upstream:llm"] == (3, 3 * USED, (2, 0))
    assert flow.served == ["s0", "s1", "s2"]
    if flow.store is None:
        assert flow.local.awaited == 0
    else:
        assert flow.store.calls == {"taken": 6, "refused": 1, "finish": 6}


def test_finish_is_settle_then_release_in_one_call() -> None:
    spec = LimitSpec(requests_per_minute=10, tokens_per_minute=1000, concurrent=2)
    limits = (Limit("tenant:a", "tenant 'a'", "a", spec), Limit("route:r", "route 'r'", "", spec))
    one, two = LocalStore(clock=lambda: NOW), LocalStore(clock=lambda: NOW)
    for amounts in ((1, 40), (0, 0), (1, 300)):  # refunded, given back (never sent), charged more
        a, b = one.acquire_now(limits, 100), two.acquire_now(limits, 100)
        assert isinstance(a, Reservation) and isinstance(b, Reservation)
        one.finish_now(a, *amounts)
        two.settle_now(b, *amounts)
        two.release_now(b)
        one.finish_now(a, 1, 999)  # once: a second finish changes nothing
    assert [(u.key, u.windows, u.concurrent) for u in asyncio.run(one.remaining())] == \
        [(u.key, u.windows, u.concurrent) for u in asyncio.run(two.remaining())]
    (usage, _) = asyncio.run(one.remaining())
    assert usage.requests is not None and usage.requests.used == 2
    assert usage.tokens is not None and usage.tokens.used == 340
    assert usage.concurrent == (2, 0)


def test_a_refused_key_undoes_what_the_others_counted() -> None:
    roomy = Limit("tenant:a", "tenant 'a'", "a", LimitSpec(requests_per_minute=10, tokens_per_minute=1000,
                                                          concurrent=5))
    tight = Limit("route:r", "route 'r'", "", LimitSpec(tokens_per_minute=150))
    store = LocalStore(clock=lambda: NOW)
    assert isinstance(store.acquire_now((roomy, tight), 100), Reservation)
    refused = store.acquire_now((roomy, tight), 100)
    assert isinstance(refused, Refusal) and refused.limit is tight and refused.dimension == "tokens"
    usage = {u.key: u for u in asyncio.run(store.remaining())}
    assert usage["tenant:a"].requests is not None and usage["tenant:a"].requests.used == 1
    assert usage["tenant:a"].tokens is not None and usage["tenant:a"].tokens.used == 100
    assert usage["tenant:a"].concurrent == (5, 1)
    assert usage["route:r"].tokens is not None and usage["route:r"].tokens.used == 100
