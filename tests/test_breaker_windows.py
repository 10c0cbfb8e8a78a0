"""The rolling windows dispatch keeps per request (a breaker's failure-ratio buckets, a route's retry budget)
against a plain model of what they mean: events kept with their times, counted over the window. The
windows only do their clearing work when time has moved on to a new bucket or second; these properties
hold over random times and outcomes, and a policy reload that changes the breaker is taken at once."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.policy.plan import BreakerSpec, DeploymentSpec
from proxy.upstream import budget
from proxy.upstream.breaker import _BUCKETS, Breaker
from proxy.upstream.registry import Registry

# Time steps (often 0: several events in one bucket or second; sometimes a long gap) and an outcome each.
_steps = st.lists(
    st.tuples(st.sampled_from([0.0, 0.0, 0.05, 0.3, 0.9, 1.0, 2.5, 7.0, 31.0]), st.booleans()),
    min_size=1, max_size=120,
)


def _first_opening(events: list[tuple[float, bool]], spec: BreakerSpec) -> int | None:
    """The model: the index of the failure that opens a ratio-only breaker (failures >= ratio of the
    outcomes in the last `_BUCKETS` buckets of `window / _BUCKETS` seconds, with at least min_requests;
    a window of 0 is one bucket for ever)."""
    width = spec.window / _BUCKETS if spec.window > 0 else math.inf
    for i, (now, failed) in enumerate(events):
        bucket = int(now / width)
        seen = [f for t, f in events[: i + 1] if int(t / width) > bucket - _BUCKETS]
        if failed and len(seen) >= spec.min_requests and sum(seen) >= spec.failure_ratio * len(seen):
            return i
    return None


@settings(max_examples=300, deadline=None)
@given(steps=_steps, start=st.sampled_from([0.0, 3.3, 1000.0]), window=st.sampled_from([0.0, 1.0, 10.0, 30.0]),
       min_requests=st.integers(1, 12))
def test_the_ratio_breaker_opens_where_the_window_model_says(
    steps: list[tuple[float, bool]], start: float, window: float, min_requests: int
) -> None:
    spec = BreakerSpec(consecutive_failures=0, failure_ratio=0.5, min_requests=min_requests, window=window)
    events, now = [], start
    for step, failed in steps:
        now += step
        events.append((now, failed))
    expected = _first_opening(events, spec)
    breaker = Breaker(spec)
    opened = next((i for i, (t, f) in enumerate(events) if breaker.record(t, f, False) == "open"), None)
    assert opened == expected


@settings(max_examples=300, deadline=None)
@given(steps=_steps, start=st.sampled_from([0.0, 0.5, 1000.0]))
def test_the_retry_budget_counts_what_the_last_ten_seconds_hold(steps: list[tuple[float, bool]], start: float
                                                                ) -> None:
    b = budget.RetryBudget()
    events: list[tuple[float, bool]] = []
    now = start
    for step, is_retry in steps:
        now += step
        if is_retry:
            b.retry(now)
        else:
            b.request(now)
        events.append((now, is_retry))
        kept = [r for t, r in events if int(t) > int(now) - budget.WINDOW_S]
        assert b.counts(now) == (kept.count(False), kept.count(True))


def test_a_reloaded_breaker_spec_is_counted_by_from_the_next_outcome() -> None:
    """A reload that turns the ratio trigger on (or changes its window) applies to the next outcome: the
    breaker works out what it needs of its spec when it is given one."""
    registry = Registry(clock=lambda: 100.0)
    off = DeploymentSpec(id="a", upstream="a", breaker=BreakerSpec(consecutive_failures=0, failure_ratio=0))
    state = registry.state(off)
    for _ in range(5):
        registry.record(state, 100.0, True, False)
    assert state.breaker.state == "closed"  # no trigger on
    on = DeploymentSpec(id="a", upstream="a", breaker=BreakerSpec(consecutive_failures=0, failure_ratio=0.5,
                                                                  min_requests=3, window=10.0))
    assert registry.state(on) is state and state.breaker.spec is on.breaker
    registry.record(state, 101.0, False, False)
    registry.record(state, 101.5, True, False)
    registry.record(state, 102.0, True, False)
    assert state.breaker.state == "open"  # 2 of 3 in the window, counted since the reload


def test_a_circuit_closed_by_its_probe_starts_an_empty_window() -> None:
    """The failures that opened it do not count again once a probe closed it, though their buckets are
    still within the window."""
    breaker = Breaker(BreakerSpec(consecutive_failures=0, failure_ratio=0.5, min_requests=4, window=10.0,
                                  cooldown=5.0))
    assert [breaker.record(0.5, True, False) for _ in range(4)] == [None, None, None, "open"]
    assert breaker.acquire(6.0) == "half_open"
    assert breaker.record(6.0, False, True) == "closed"
    assert [breaker.record(6.2, True, False) for _ in range(3)] == [None, None, None]  # 3 outcomes: under 4
    assert breaker.record(6.3, True, False) == "open"
