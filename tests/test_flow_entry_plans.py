"""What entering the flow works out once, held to the definitions it replaces: the token estimate written in one
frame against `prompt_estimate`'s walk and the output rule; the in-memory settlement (written out) against the
generic one over another store; and the entry plans the scheduler keeps per route, tenant and kind of entry,
which a request under a reloaded policy must never take from the previous one."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_flow_precomputed import _BODY, _escaped

from proxy.admission import tokens as tok
from proxy.admission.limits import Refusal, Usage
from proxy.admission.local import LocalStore
from proxy.admission.store import Reservation
from proxy.call import Attempt, Call
from proxy.errors import RateLimited
from proxy.flow.admit import NOTHING, Admission
from proxy.flow.scheduler import Scheduler
from proxy.policy.plan import Limit, Plan, TenantRule
from proxy.policy.rates import LimitSpec
from proxy.tasks import spawn

pytestmark = pytest.mark.timeout(60)

_NAMES = ("max_completion_tokens", "max_tokens", "max_output_tokens")
_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 5000), st.floats(0, 10), st.text(max_size=3))
_PATHS = st.sampled_from(["/v1/chat/completions", "/v1/responses", "/v1/messages", "/v1/embeddings",
                          "/v1/moderations", "/v1/messages/count_tokens"])


def _reference_estimate(path: str, raw: bytes, body: dict[str, Any] | None, default: int) -> int:
    """The rule as the module states it: the walked prompt estimate, plus the first of the three maximums that
    is a non-negative JSON integer (else the default), times `n` choices (2 to 128)."""
    prompt = tok.walked_estimate(raw, body) if body is not None else math.ceil(len(raw) / tok.BYTES_PER_TOKEN)
    if body is None or path in ("/v1/embeddings", "/v1/moderations", "/v1/messages/count_tokens"):
        return prompt
    most = default
    for name in _NAMES:
        value = body.get(name)
        if type(value) is int and value >= 0:
            most = value
            break
    choices = body.get("n")
    if type(choices) is int and 1 < choices <= 128:
        most *= choices
    return prompt + most


_IMAGE = {"model": "m",
          "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "A" * 99}}]}]}
"""With `escaped`, a media part only its \\u escapes tell of."""


@settings(max_examples=500, deadline=None)
@example(_IMAGE, {"max_tokens": True, "max_output_tokens": 7}, "/v1/chat/completions", True, False, 16)
@given(_BODY, st.dictionaries(st.sampled_from([*_NAMES, "n"]), _VALUES), _PATHS, st.booleans(), st.booleans(),
       st.integers(1, 8192))
def test_the_estimate_in_one_frame_is_the_walk_plus_the_output_rule(
    body: dict[str, Any], maximums: dict[str, Any], path: str, escaped: bool, unparsed: bool, default: int
) -> None:
    body = {**body, **maximums}
    raw = _escaped(body) if escaped else json.dumps(body).encode()
    call = Call("r", None, "POST", path, "openai", 0.0)  # type: ignore[arg-type]
    call.raw_body, call.body = raw, None if unparsed else body
    assert tok.estimate(call, default) == _reference_estimate(path, raw, call.body, default)


class Generic:
    """The in-memory store behind the plain `LimiterStore` interface (not a `LocalStore`): `settle` awaits it."""

    def __init__(self, inner: LocalStore) -> None:
        self.inner = inner

    async def try_acquire(self, limits: Sequence[Limit], tokens: int, *, headroom: float = 0.0
                          ) -> Reservation | Refusal:
        return await self.inner.try_acquire(limits, tokens, headroom=headroom)

    async def release(self, reservation: Reservation) -> None:
        await self.inner.release(reservation)

    async def settle(self, reservation: Reservation, *, requests: int, tokens: int) -> None:
        await self.inner.settle(reservation, requests=requests, tokens=tokens)

    async def finish(self, reservation: Reservation, *, requests: int, tokens: int) -> None:
        await self.inner.finish(reservation, requests=requests, tokens=tokens)

    async def remaining(self, keys: Iterable[str] | None = None) -> list[Usage]:
        return await self.inner.remaining(keys)


_USAGES = st.one_of(st.none(), st.just({}), st.builds(lambda n: {"total_tokens": n}, st.integers(0, 900)),
                    st.builds(lambda a, b: {"prompt_tokens": a, "completion_tokens": b},
                              st.integers(0, 400), st.integers(0, 400)))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([0, 200, 429, 500]), max_size=2), st.sampled_from([None, "hit", "miss"]), _USAGES,
       st.sampled_from([200, 429, 502]), st.integers(0, 600), st.booleans())
def test_the_in_memory_settlement_counts_what_the_generic_one_counts(
    attempts: list[int], cache: str | None, usage: dict[str, int] | None, status: int, cost: int, concurrent: bool
) -> None:
    """`settle_now` (its totals given by the caller or looked up) and `settle` over another store: the same
    answer (capacity freed), the same counts in the store and the same token totals."""
    spec = LimitSpec(requests_per_minute=100, tokens_per_minute=100_000, concurrent=5 if concurrent else None)
    limit = Limit("route:r", "route 'r'", "", spec)

    async def settled(way: str) -> tuple[bool, list[tuple[Any, ...]], list[int]]:
        local = LocalStore(clock=lambda: 1000.0)
        admission = Admission(Generic(local) if way == "generic" else local)
        call = Call("r", None, "POST", "/v1/chat/completions", "openai", 0.0)  # type: ignore[arg-type]
        call.tenant = TenantRule("t", None)
        call.attempts = [Attempt("u", s, 0.0) for s in attempts]
        call.cache, call.usage, call.status = cache, usage, status
        reservation = local.acquire_now((limit,), cost, 0.0)
        assert isinstance(reservation, Reservation)
        if way == "generic":
            freed = await admission.settle(call, reservation)
        else:
            totals = admission.totals_of("t") if way == "now, totals held" else None
            freed = admission.settle_now(call, reservation, local, totals)
        counted = [(u.key, u.requests.used if u.requests else None, u.tokens.used if u.tokens else None,
                    u.concurrent) for u in await local.remaining()]
        return bool(freed), counted, admission.tokens.get("t", [0, 0, 0])

    results = [asyncio.run(settled(way)) for way in ("now", "now, totals held", "generic")]
    assert results[0] == results[1] == results[2]


_LIMITED = """
upstreams:
  llm: {provider: openai, base_url: "http://127.0.0.1:9/v1"}
tenants:
  app: {keys: [ka]}
routes:
  - name: chat
    upstream: llm
    limits: {requests_per_minute: 2}
"""
_FREE = """
upstreams:
  llm: {provider: openai, base_url: "http://127.0.0.1:9/v1"}
queues:
  q: {concurrency: 10, max_waiting: 10, max_wait: 5s}
tenants:
  app: {keys: [ka]}
routes:
  - name: chat
    upstream: llm
    on_limit: queue
    queue: q
"""


def _call(plan: Plan) -> Call:
    call = Call("r", plan, "POST", "/v1/chat/completions", "openai", time.perf_counter())
    call.tenant = plan.tenants["app"]
    call.raw_body = b'{"model":"m","messages":[]}'
    call.body = {"model": "m", "messages": []}
    call.route = plan.resolve(call.path, "m", call.tenant)
    return call


async def _served(scheduler: Scheduler, plan: Plan) -> Call:
    call = _call(plan)
    async with scheduler.enter(call):
        call.attempts.append(Attempt("llm", 200, 0.0))
        call.status = 200
    return call


async def test_a_request_under_either_policy_takes_its_own_policys_entry(make_plan: Callable[[str], Plan]) -> None:
    """Requests of the previous policy still in flight and of the new one alternate: each enters as its own
    policy says (the plans are kept by route index and tenant name, which both policies share)."""
    limited, free = make_plan(_LIMITED), make_plan(_FREE)
    store = LocalStore(clock=lambda: 1000.0)
    scheduler = Scheduler(admission=Admission(store))
    await _served(scheduler, limited)  # route 'chat' counts 1 of its 2 requests
    for _ in range(3):  # the new policy: no limit, a queue slot each, given back
        await _served(scheduler, free)
    assert scheduler.queues["q"].admitted == 3 and scheduler.queues["q"].active == 0
    await _served(scheduler, limited)  # the previous policy's route still counts: 2 of 2
    with pytest.raises(RateLimited):
        await _served(scheduler, limited)
    await _served(scheduler, free)
    assert scheduler.queues["q"].admitted == 4
    scheduler.reconfigure(free)  # a reload empties the kept plans; the previous policy's route still counts
    with pytest.raises(RateLimited):
        await _served(scheduler, limited)
    assert scheduler.enter(_call(limited)) is not NOTHING


_RESERVED = """
priorities: [host, planner, nightly]
upstreams:
  llm: {provider: openai, base_url: "http://127.0.0.1:9/v1"}
queues:
  q: {concurrency: 10, max_waiting: 10, max_wait: 2s, reserve: {host: 50%}}
tenants:
  app: {keys: [ka], priority: nightly, max_priority: host}
routes:
  - name: chat
    upstream: llm
    on_limit: queue
    queue: q
    limits: {requests_per_minute: 4}
"""


async def test_a_class_asked_for_leaves_its_own_reserve_not_the_tenants_default(
    make_plan: Callable[[str], Plan]
) -> None:
    """The plan keeps the headroom of every class: a request that asks for `host` may use the half of the limit
    reserved for it, one of the tenant's default class (`nightly`) may not."""
    plan = make_plan(_RESERVED)
    scheduler = Scheduler(admission=Admission(LocalStore(clock=lambda: 1000.0)))
    for asked in (None, "nightly"):  # half of 4 requests a minute: what the lower classes may use
        call = _call(plan)
        async with scheduler.enter(call, asked):
            call.attempts.append(Attempt("llm", 200, 0.0))
    gate = scheduler.queues["q"]
    waiting = spawn(_served(scheduler, plan), name="nightly")  # a third of the default class waits
    await asyncio.sleep(0)
    assert gate.board.live == 1 and gate.admitted == 2
    host = _call(plan)
    async with scheduler.enter(host, "host"):  # admitted at once, from the reserve
        assert gate.admitted == 3 and gate.board.live == 1
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert gate.board.live == 0 and gate.active == 0
