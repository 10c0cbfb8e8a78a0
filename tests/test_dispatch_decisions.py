"""Dispatch's decisions without sockets: what an attempt's outcome means for its pool (judge.py, pure, with
the clock's reading and the random source passed in), and what an attempt's lease gives back on each way
out (lease.py, with a registry on an injected clock and a recording upstream hold)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Mapping
from typing import Any

import pytest

from proxy.call import Call
from proxy.errors import InvalidRequest, UpstreamUnreachable
from proxy.policy.plan import DeploymentSpec, Plan, RetrySpec, RouteRule
from proxy.upstream import judge, retry
from proxy.upstream.lease import Lease
from proxy.upstream.registry import Registry

NOW = 1_000.0
ON = RetrySpec(attempts=3, timeouts=True)  # retries timeouts too
DEFAULT = RetrySpec(attempts=3)


class Draws:
    """A random source that says how often it was asked."""

    def __init__(self, *values: float) -> None:
        self.values = list(values)
        self.calls = 0

    def __call__(self) -> float:
        self.calls += 1
        return self.values.pop(0)


# --- judging one attempt ---------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 201, 204, 302, 400, 401, 404, 422, 501])
def test_answers_that_are_relayed(status: int) -> None:
    assert judge.judge(status, None, False, None, ON) == "relay"


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504, 529])
def test_answers_that_are_retried(status: int) -> None:
    assert judge.judge(status, None, False, None, ON) == "retry"
    assert judge.judge(status, None, True, None, ON) == "retry"  # the deadline bounds errors, not answers


def test_the_upstreams_x_should_retry_decides_for_an_error_status() -> None:
    assert judge.judge(503, None, False, "false", ON) == "relay"
    assert judge.judge(409, None, False, "true", ON) == "retry"
    assert judge.judge(400, None, False, "true", ON) == "relay"


def test_an_error_without_an_answer_retries_as_configured_or_is_raised() -> None:
    assert judge.judge(0, "connect_error", False, None, DEFAULT) == "retry"
    assert judge.judge(0, "timeout", False, None, DEFAULT) == "raise"  # timeouts: off by default
    assert judge.judge(0, "timeout", False, None, ON) == "retry"
    assert judge.judge(0, "connect_error", False, None, RetrySpec(connect_errors=False)) == "raise"


def test_a_timeout_bounded_by_the_deadline_stops_the_pool_even_when_timeouts_retry() -> None:
    assert judge.judge(0, "timeout", True, None, ON) == "stop"
    assert judge.judge(0, "timeout", True, None, DEFAULT) == "stop"
    assert judge.judge(0, "connect_error", True, None, ON) == "retry"  # connecting is not the deadline's


# --- when a deployment may be tried again ----------------------------------------------------------------


def test_without_a_hint_the_next_try_is_after_a_jittered_backoff_from_now() -> None:
    draws = Draws(0.5, 0.5, 0.5)
    got = [judge.ready_at(n, None, ON, NOW, draws) for n in range(3)]
    assert got == [NOW + 0.5 * 0.25, NOW + 0.5 * 0.5, NOW + 0.5 * 1.0]
    assert draws.calls == 3


def test_a_seeded_random_source_gives_the_same_retry_times() -> None:
    def times(seed: int) -> list[float | None]:
        rng = random.Random(seed)
        return [judge.ready_at(n, None, ON, NOW, rng.random) for n in range(6)]

    assert times(7) == times(7)
    assert times(7) != times(8)
    assert all(t is not None and NOW <= t < NOW + ON.backoff_max for t in times(7))


def test_a_hint_replaces_the_backoff_and_a_long_one_means_not_again_in_this_pool() -> None:
    draws = Draws(0.9)
    assert judge.ready_at(0, 1.5, ON, NOW, draws) == NOW + 1.5
    assert draws.calls == 1  # drawn as before the split, so seeded sequences did not change
    long = Draws()
    assert judge.ready_at(0, ON.max_retry_after + 0.1, ON, NOW, long) is None
    assert long.calls == 0


def test_a_retry_waits_for_its_deployment_but_never_to_the_deadline() -> None:
    assert judge.retry_wait(None, NOW, NOW + 10) == 0.0
    assert judge.retry_wait(NOW - 3, NOW, NOW + 10) == 0.0  # ready already
    assert judge.retry_wait(NOW + 2, NOW, NOW + 10) == 2.0
    assert judge.retry_wait(NOW + 10, NOW, NOW + 10) is None  # would end at the deadline
    assert judge.retry_wait(None, NOW, NOW) is None  # no time left at all


# --- when no deployment can be chosen --------------------------------------------------------------------


def test_a_pacing_hold_that_ends_soon_is_waited_out_here() -> None:
    assert judge.blocked(NOW + 1.5, False, ON, NOW, NOW + 60) == ("wait", 1.5)
    assert judge.blocked(NOW + 1.5, True, ON, NOW, NOW + 60) == ("wait", 1.5)  # then the limits get a new look


def test_a_long_hold_or_one_past_the_deadline_is_reported_with_its_end() -> None:
    far = NOW + ON.max_retry_after + 1
    assert judge.blocked(far, False, ON, NOW, NOW + 60) == ("held", far)
    assert judge.blocked(NOW + 1.5, False, ON, NOW, NOW + 1) == ("held", NOW + 1.5)


def test_upstream_limits_and_open_circuits() -> None:
    assert judge.blocked(None, True, ON, NOW, NOW + 60) == ("limited", 0.0)
    assert judge.blocked(NOW + 100, True, ON, NOW, NOW + 60) == ("limited", 0.0)
    assert judge.blocked(None, False, ON, NOW, NOW + 60) == ("unavailable", 0.0)


# --- what an attempt's lease gives back ------------------------------------------------------------------


class Hold:
    """An upstream hold that records how it was finished."""

    def __init__(self) -> None:
        self.finished: list[tuple[int, Mapping[str, Any] | None, bool]] = []

    async def finish(self, status: int, usage: Mapping[str, Any] | None, *, sent: bool = True) -> None:
        self.finished.append((status, usage, sent))


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def pool(make_plan: Callable[[str], Plan]) -> tuple[Plan, RouteRule, DeploymentSpec]:
    plan = make_plan(
        """
upstreams:
  up: {provider: openai, base_url: "http://127.0.0.1:9/v1", api_key: sk-test-upstream}
tenants:
  t: {keys: [sk-tenant-key]}
routes:
  - name: chat
    match: {model: "*"}
    upstream: up
"""
    )
    route = plan.routes_by_name["chat"]
    return plan, route, route.deployments[0]


def _lease(pool: tuple[Plan, RouteRule, DeploymentSpec], *, probe_due: bool = False
           ) -> tuple[Lease, Registry, Hold, Call]:
    plan, route, spec = pool
    registry = Registry(clock=Clock(), rng=random.Random(1))
    state = registry.state(spec)
    if probe_due:  # an open circuit whose cooldown is over: the next attempt is its probe
        state.breaker.state, state.breaker.reopen_at = "open", NOW - 1
    hold = Hold()
    call = Call(request_id="r", plan=plan, method="POST", path="/v1/chat/completions", protocol="openai",
                started=0.0)
    call.route, call.hold = route, hold
    probe = registry.start(state, NOW, False, route)
    return Lease(registry, state, call, hold, probe), registry, hold, call


async def test_a_retriable_answer_gives_everything_back_with_its_status(
    pool: tuple[Plan, RouteRule, DeploymentSpec],
) -> None:
    lease, registry, hold, call = _lease(pool)
    state = lease.state
    async with lease:
        assert state.outstanding == 1
        lease.started, lease.status, lease.settled = 1.0, 503, True
    assert state.outstanding == 0
    assert hold.finished == [(503, None, True)]  # the request counts in the upstream's limit
    assert call.hold is None and call.attempts == []


async def test_an_error_without_an_answer_gives_everything_back_and_propagates(
    pool: tuple[Plan, RouteRule, DeploymentSpec],
) -> None:
    lease, registry, hold, call = _lease(pool)
    with pytest.raises(UpstreamUnreachable):
        async with lease:
            lease.started, lease.settled = 1.0, True
            raise UpstreamUnreachable("no")
    assert lease.state.outstanding == 0
    assert hold.finished == [(0, None, True)]


async def test_a_cancelled_attempt_gives_its_probe_back_and_says_whether_it_was_sent(
    pool: tuple[Plan, RouteRule, DeploymentSpec],
) -> None:
    lease, registry, hold, call = _lease(pool, probe_due=True)
    breaker = lease.state.breaker
    assert lease.probe and breaker.probing
    with pytest.raises(asyncio.CancelledError):
        async with lease:  # cancelled during the backoff wait: nothing went out
            raise asyncio.CancelledError
    assert not breaker.probing  # another request may probe
    assert lease.state.outstanding == 0
    assert hold.finished == [(0, None, False)]  # never sent: the upstream's limit gets its request back
    assert call.attempts == []


async def test_a_call_cancelled_while_its_request_was_out_records_the_attempt(
    pool: tuple[Plan, RouteRule, DeploymentSpec],
) -> None:
    lease, registry, hold, call = _lease(pool)
    with pytest.raises(asyncio.CancelledError):
        async with lease:
            lease.started = 1.0
            raise asyncio.CancelledError
    assert [(a.status, a.error) for a in call.attempts] == [(0, "cancelled")]
    assert hold.finished == [(0, None, True)]


async def test_a_request_that_cannot_be_built_was_not_sent(pool: tuple[Plan, RouteRule, DeploymentSpec]) -> None:
    lease, registry, hold, call = _lease(pool)
    with pytest.raises(InvalidRequest):
        async with lease:
            lease.started = 1.0
            raise InvalidRequest("untranslatable")
    assert hold.finished == [(0, None, False)]


async def test_an_answer_to_relay_is_handed_over_not_released(pool: tuple[Plan, RouteRule, DeploymentSpec]) -> None:
    lease, registry, hold, call = _lease(pool)
    async with lease:
        lease.started, lease.status, lease.settled = 1.0, 200, True
        kept = lease.keep()
    assert kept is hold and hold.finished == []
    assert lease.state.outstanding == 1  # until the relay is done (Sent.done)
    assert call.hold is hold  # admission's exit finishes it with the response's usage
    registry.release(lease.state)
    assert lease.state.outstanding == 0


def test_retry_module_still_owns_the_classification() -> None:
    # judge builds on retry.py: a status the retry list leaves out is relayed whatever the judge is asked.
    spec = RetrySpec(attempts=3, statuses=frozenset({503}))
    assert not retry.status_retriable(500, spec)
    assert judge.judge(500, None, False, None, spec) == "relay"
    assert judge.judge(503, None, False, None, spec) == "retry"


# --- what the plan works out for every request -------------------------------------------------------------


@pytest.mark.parametrize(
    ("identify", "passthrough", "dropped"),
    [
        ("", False, frozenset()),  # api_key: the key header is dropped anyway (a credential)
        ("identify: {mode: header, header: X-Team}\n", False, frozenset({"x-team"})),
        ("identify: {mode: passthrough, header: X-Team}\n", True, frozenset({"x-team"})),
    ],
)
def test_the_identify_flags_are_worked_out_with_the_plan(
    make_plan: Callable[[str], Plan], identify: str, passthrough: bool, dropped: frozenset[str]
) -> None:
    plan = make_plan(
        identify
        + """
upstreams:
  up: {provider: openai, base_url: "http://127.0.0.1:9/v1", api_key: sk-test-upstream}
tenants:
  t: {keys: [sk-tenant-key]}
routes:
  - {name: chat, match: {model: "*"}, upstream: up}
"""
    )
    assert plan.identify.passthrough_auth is passthrough
    assert plan.identify.drop_upstream == dropped
