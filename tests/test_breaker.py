"""The circuit breaker state machine and the per-deployment registry, on an injected clock and random source:
consecutive and ratio triggers, half-open probe, growing capped cooldown, deployment choice around open
circuits and pacing holds, and the counters a cancelled attempt must give back."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from proxy.policy.plan import (
    BreakerSpec,
    DeploymentSpec,
    Matcher,
    PacingSpec,
    RetrySpec,
    RouteRule,
    TimeoutSpec,
)
from proxy.upstream.breaker import Breaker
from proxy.upstream.registry import Registry

CONSECUTIVE = BreakerSpec(consecutive_failures=3, failure_ratio=0, cooldown=1.0, max_cooldown=8.0)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def state(b: Breaker) -> str:
    """The state as a plain string (mypy narrows `b.state` after an assert and then flags the next one)."""
    return b.state


def fail(b: Breaker, now: float, times: int = 1, probe: bool = False) -> list[str | None]:
    return [b.record(now, True, probe) for _ in range(times)]


# --- the state machine ------------------------------------------------------------------------------------


def test_opens_after_n_consecutive_failures_and_a_success_resets_the_count() -> None:
    b = Breaker(CONSECUTIVE)
    assert fail(b, 0.0, 2) == [None, None]
    assert b.record(0.1, False, False) is None and b.consecutive == 0
    assert fail(b, 0.2, 2) == [None, None] and state(b) == "closed"
    assert fail(b, 0.3) == ["open"]
    assert state(b) == "open" and b.reopen_at == pytest.approx(1.3)
    assert not b.available(1.0)


def test_half_open_probe_closes_on_success() -> None:
    b = Breaker(CONSECUTIVE)
    fail(b, 0.0, 3)
    assert b.available(1.0) and b.probe_due(1.0)
    assert b.acquire(1.0) == "half_open"
    assert not b.available(1.0), "one probe at a time"
    assert b.record(1.1, False, False) is None and state(b) == "half_open", "a straggler does not decide"
    assert b.record(1.2, False, True) == "closed"
    assert state(b) == "closed" and b.available(1.2) and b.consecutive == 0


def test_a_failed_probe_reopens_with_a_doubled_cooldown_up_to_the_cap() -> None:
    b = Breaker(CONSECUTIVE)
    fail(b, 0.0, 3)
    now, cooldowns = 0.0, []
    for _ in range(6):
        cooldowns.append(round(b.reopen_at - now, 6))
        now = b.reopen_at
        b.acquire(now)
        assert b.record(now, True, True) == "open"
    assert cooldowns == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]


def test_cooldown_starts_again_after_a_long_healthy_spell() -> None:
    b = Breaker(CONSECUTIVE)
    fail(b, 0.0, 3)
    b.acquire(1.0)
    b.record(1.0, True, True)  # second opening: 2 s
    b.acquire(3.0)
    b.record(3.0, False, True)  # closed at 3.0
    fail(b, 5.0, 3)  # soon after: the third opening, 4 s
    assert b.reopen_at - 5.0 == pytest.approx(4.0)
    b.acquire(9.0)
    b.record(9.0, False, True)  # closed at 9.0
    fail(b, 9.0 + 8.1, 3)  # healthy for longer than max_cooldown: back to 1 s
    assert b.openings == 1 and b.reopen_at - 17.1 == pytest.approx(1.0)


def test_an_abandoned_probe_lets_another_request_probe() -> None:
    b = Breaker(CONSECUTIVE)
    fail(b, 0.0, 3)
    b.acquire(1.0)
    assert not b.available(1.0)
    b.abandon()
    assert b.available(1.0) and b.probe_due(1.0)


def test_ratio_mode_needs_the_minimum_volume_within_the_window() -> None:
    spec = BreakerSpec(consecutive_failures=0, failure_ratio=0.5, min_requests=10, window=10.0)
    b = Breaker(spec)
    # 4 failures out of 8: over the ratio but under the volume.
    for i in range(8):
        assert b.record(i * 0.1, i % 2 == 0, False) is None
    # 5 of 10: opens.
    assert b.record(0.9, False, False) is None
    assert b.record(1.0, True, False) == "open"


def test_ratio_window_forgets_old_failures() -> None:
    spec = BreakerSpec(consecutive_failures=0, failure_ratio=0.5, min_requests=4, window=10.0)
    b = Breaker(spec)
    for i in range(3):
        b.record(float(i), True, False)  # three failures early on
    for i in range(20):
        b.record(20.0 + i * 0.1, False, False)  # the window moved on; only successes in it
    assert b.record(22.1, True, False) is None and state(b) == "closed"


def test_both_triggers_off_never_open() -> None:
    b = Breaker(BreakerSpec(consecutive_failures=0, failure_ratio=0))
    assert all(r is None for r in fail(b, 0.0, 1000))


# --- the registry: choosing around open circuits and pacing holds --------------------------------------------


def deployment(name: str, weight: float = 1.0, spec: BreakerSpec = CONSECUTIVE) -> DeploymentSpec:
    return DeploymentSpec(name, name, None, weight, TimeoutSpec(), spec, PacingSpec(True, 30.0))


def route(*deployments: DeploymentSpec, balance: str = "weighted") -> RouteRule:
    return RouteRule(
        name="r", index=0, paths=Matcher(("*",)), models=Matcher(("*",)), tenants=None,
        upstream=deployments[0].upstream, model_rewrite=None, timeouts=TimeoutSpec(), advertised=(),
        deployments=deployments, balance=balance,  # type: ignore[arg-type]
    )


def registry(clock: Clock, seed: int = 3) -> Registry:
    return Registry(clock=clock, rng=random.Random(seed), wall=lambda: 1_750_000_000.0)


def test_open_deployments_are_skipped_and_a_due_probe_goes_first() -> None:
    clock = Clock()
    reg = registry(clock)
    pool = route(deployment("a"), deployment("b"))
    a = reg.state(pool.deployments[0])
    for _ in range(3):
        reg.record(a, clock.now, True, False)
    assert state(a.breaker) == "open"
    chosen = {reg.choose(pool, clock.now)[0].id for _ in range(50)}  # type: ignore[union-attr]
    assert chosen == {"b"}
    clock.now += 1.0
    probe, _ = reg.choose(pool, clock.now)
    assert probe is a
    assert reg.start(a, clock.now, False, pool) is True and state(a.breaker) == "half_open"
    assert {reg.choose(pool, clock.now)[0].id for _ in range(20)} == {"b"}  # type: ignore[union-attr]
    reg.release(a)
    reg.record(a, clock.now, False, True)
    assert state(a.breaker) == "closed"


def test_every_circuit_open_means_nothing_to_choose_until_the_cooldown() -> None:
    clock = Clock()
    reg = registry(clock)
    pool = route(deployment("a"))
    a = reg.state(pool.deployments[0])
    for _ in range(3):
        reg.record(a, clock.now, True, False)
    assert reg.choose(pool, clock.now) == (None, None)
    assert reg.reopens_in(pool, clock.now) == pytest.approx(1.0)
    clock.now += 1.0
    assert reg.choose(pool, clock.now) == (a, None)


def test_pacing_holds_a_deployment_until_its_reset_capped_by_max_hold() -> None:
    clock = Clock()
    reg = registry(clock)
    pool = route(deployment("a"), deployment("b"))
    a, b = (reg.state(d) for d in pool.deployments)
    reg.hold(a, clock.now, 2.0)
    assert {reg.choose(pool, clock.now)[0].id for _ in range(20)} == {"b"}  # type: ignore[union-attr]
    reg.hold(b, clock.now, 500.0)  # capped at max_hold (30 s)
    assert reg.choose(pool, clock.now) == (None, clock.now + 2.0)
    clock.now += 2.0
    assert reg.choose(pool, clock.now) == (a, None)
    assert b.hold_until == pytest.approx(100.0 + 30.0)


def test_avoided_deployments_are_never_chosen_and_untried_ones_are_preferred() -> None:
    clock = Clock()
    reg = registry(clock)
    pool = route(deployment("a", 100.0), deployment("b", 0.01))
    assert reg.choose(pool, clock.now, avoid={"a"})[0].id == "b"  # type: ignore[union-attr]
    assert reg.choose(pool, clock.now, tried={"a"})[0].id == "b"  # type: ignore[union-attr]
    assert reg.choose(pool, clock.now, avoid={"a", "b"}) == (None, None)
    # When every usable deployment was tried, the weights decide again.
    assert reg.choose(pool, clock.now, tried={"a", "b"})[0].id == "a"  # type: ignore[union-attr]


def test_deployments_of_a_full_upstream_are_skipped_for_the_attempt() -> None:
    clock = Clock()
    reg = registry(clock)
    shared = DeploymentSpec("a/x", "a", "x", 100.0, TimeoutSpec(), CONSECUTIVE, PacingSpec(True, 30.0))
    pool = route(deployment("a", 100.0), shared, deployment("b", 0.01))
    assert {reg.choose(pool, clock.now, full={"a"})[0].id for _ in range(20)} == {"b"}  # type: ignore[union-attr]
    assert reg.choose(pool, clock.now, full={"a", "b"}) == (None, None)
    assert reg.choose(route(deployment("b")), clock.now, full={"b"}) == (None, None)  # the one-deployment path


def test_least_outstanding_spreads_in_flight_requests() -> None:
    clock = Clock()
    reg = registry(clock)
    pool = route(deployment("a"), deployment("b"), deployment("c"), balance="least_outstanding")
    picked = []
    for _ in range(6):
        state, _ = reg.choose(pool, clock.now)
        assert state is not None
        reg.start(state, clock.now, False, pool)
        picked.append(state.id)
    assert sorted(picked) == ["a", "a", "b", "b", "c", "c"]


def test_counters_come_back_to_zero_and_the_budget_counts_retries_per_route() -> None:
    clock = Clock()
    reg = registry(clock)
    pool = replace(route(deployment("a")), retry=RetrySpec(attempts=3, budget_percent=50.0, budget_min=0))
    a = reg.state(pool.deployments[0])
    assert not reg.retry_allowed(pool, a, clock.now)  # no request yet: nothing to retry
    for _ in range(4):
        reg.start(a, clock.now, False, pool)
    for _ in range(2):  # 50 % of 4 first attempts
        assert reg.retry_allowed(pool, a, clock.now)
        reg.start(a, clock.now, True, pool)
    assert not reg.retry_allowed(pool, a, clock.now)
    assert a.outstanding == 6
    for _ in range(6):
        reg.release(a)
    assert a.outstanding == 0
    snapshot = reg.snapshot()
    assert snapshot["retry_budgets"] == {"r": {"requests": 4, "retries": 2}}
    assert snapshot["deployments"][0]["circuit"] == "closed"
    clock.now += 10.0  # the window has passed: nothing counts any more
    assert reg.snapshot()["retry_budgets"] == {"r": {"requests": 0, "retries": 0}}
