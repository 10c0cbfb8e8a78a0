"""Which deployment `Registry.choose` gives the next attempt, and its pure pieces `usable` (what may take an
attempt now) and `prefer_untried` (a retry goes elsewhere first): open, due and half-open circuits, pacing
holds, exclusions after a failed attempt, full upstreams, weights and ties, on an injected clock and random
source."""

from __future__ import annotations

import random

import pytest

from proxy.policy.plan import BreakerSpec, DeploymentSpec, Matcher, PacingSpec, RouteRule, TimeoutSpec
from proxy.upstream.registry import DeploymentState, Registry, prefer_untried, usable

NOW = 100.0
BREAKER = BreakerSpec(consecutive_failures=1, failure_ratio=0, cooldown=10.0, max_cooldown=10.0)


class Fixed(random.Random):
    """A random source that returns the given numbers in turn."""

    def __init__(self, *values: float) -> None:
        super().__init__(0)
        self.values = list(values)

    def random(self) -> float:
        return self.values.pop(0)


def spec(name: str, weight: float = 1.0, upstream: str | None = None) -> DeploymentSpec:
    return DeploymentSpec(name, upstream or name, None, weight, TimeoutSpec(), BREAKER, PacingSpec(True, 60.0))


def pool(*deployments: DeploymentSpec, balance: str = "weighted") -> RouteRule:
    return RouteRule(
        name="r", index=0, paths=Matcher(("*",)), models=Matcher(("*",)), tenants=None,
        upstream=deployments[0].upstream, model_rewrite=None, timeouts=TimeoutSpec(), advertised=(),
        deployments=deployments, balance=balance,  # type: ignore[arg-type]
    )


def states(*names: str) -> list[DeploymentState]:
    return [DeploymentState(spec(n)) for n in names]


def open_circuit(st: DeploymentState, at: float = NOW) -> None:
    st.breaker.record(at, True, False)
    assert st.breaker.state == "open"


# --- usable: pure, reads the states and changes nothing -------------------------------------------------


def test_usable_lists_the_ready_ones_in_pool_order() -> None:
    a, b, c = states("a", "b", "c")
    assert usable([a, b, c], NOW, None, None) == (None, [0, 1, 2], None)


def test_an_open_circuit_is_skipped_until_due_and_then_its_probe_goes_first() -> None:
    a, b, c = states("a", "b", "c")
    open_circuit(c)
    assert usable([a, b, c], NOW + 9.9, None, None) == (None, [0, 1], None)
    assert usable([a, b, c], NOW + 10.0, None, None) == (c, [], None)  # later in the pool, still first
    assert c.breaker.state == "open" and not c.breaker.probing  # choosing is not acquiring


def test_a_half_open_circuit_is_usable_only_while_nobody_holds_its_probe() -> None:
    a, b = states("a", "b")
    open_circuit(b)
    b.breaker.acquire(NOW + 10.0)  # the probe went out
    assert b.breaker.state == "half_open"
    assert usable([a, b], NOW + 10.0, None, None) == (None, [0], None)
    b.breaker.abandon()  # the probe was cancelled: another request may probe
    assert usable([a, b], NOW + 10.0, None, None) == (b, [], None)


def test_holds_give_the_earliest_release_and_an_open_or_avoided_held_one_does_not_count() -> None:
    a, b, c, d = states("a", "b", "c", "d")
    a.hold_until, b.hold_until, c.hold_until, d.hold_until = NOW + 5, NOW + 3, NOW + 1, NOW + 2
    open_circuit(c, NOW - 1)  # held and open (not due before NOW + 9): not usable at all
    assert usable([a, b, c, d], NOW, {"d"}, None) == (None, [], NOW + 3)
    assert usable([a, b, c, d], NOW, None, None) == (None, [], NOW + 2)


def test_a_held_deployment_due_for_a_probe_waits_for_its_hold() -> None:
    a, b = states("a", "b")
    open_circuit(b, NOW - 10.0)  # due now
    b.hold_until = NOW + 4
    assert usable([a, b], NOW, None, None) == (None, [0], NOW + 4)


def test_avoided_deployments_and_full_upstreams_are_excluded() -> None:
    a, b = states("a", "b")
    shared = DeploymentState(spec("a/x", upstream="a"))
    assert usable([a, shared, b], NOW, {"a"}, None) == (None, [1, 2], None)  # avoid names a deployment
    assert usable([a, shared, b], NOW, None, {"a"}) == (None, [2], None)  # full names an upstream
    assert usable([a, shared, b], NOW, {"b"}, {"a"}) == (None, [], None)
    assert usable([a, b], NOW, set(), set()) == (None, [0, 1], None)  # empty sets exclude nothing


# --- prefer_untried: a retry goes to a deployment this call has not tried --------------------------------


def test_prefer_untried_keeps_order_and_falls_back_to_all_when_all_were_tried() -> None:
    a, b, c = states("a", "b", "c")
    assert prefer_untried([a, b, c], [0, 1, 2], {"b"}) == [0, 2]
    assert prefer_untried([a, b, c], [1, 2], {"a"}) == [1, 2]
    assert prefer_untried([a, b, c], [0, 2], {"a", "c"}) == [0, 2]


# --- choose: the pieces together, with the registry's state and random source -----------------------------


def test_weights_split_the_unit_interval_in_pool_order() -> None:
    route = pool(spec("a", 1.0), spec("b", 3.0))
    reg = Registry(clock=lambda: NOW, rng=Fixed(0.0, 0.249, 0.25, 0.999))
    assert [reg.choose(route, NOW)[0].id for _ in range(4)] == ["a", "a", "b", "b"]  # type: ignore[union-attr]


def test_least_outstanding_ties_are_broken_by_the_random_number() -> None:
    route = pool(spec("a"), spec("b"), spec("c", 2.0), balance="least_outstanding")
    reg = Registry(clock=lambda: NOW, rng=Fixed(0.0, 0.5, 0.99, 0.0))
    a, b, c = (reg.state(s) for s in route.deployments)
    a.outstanding, b.outstanding, c.outstanding = 1, 2, 2  # loads 1, 2, 1: a and c tie
    assert [reg.choose(route, NOW)[0].id for _ in range(3)] == ["a", "c", "c"]  # type: ignore[union-attr]
    b.outstanding = 0
    assert reg.choose(route, NOW)[0] is b


def test_a_retry_after_a_failed_attempt_goes_elsewhere_then_back() -> None:
    route = pool(spec("a", 100.0), spec("b", 0.01), spec("c", 0.01))
    reg = Registry(clock=lambda: NOW, rng=Fixed(0.0, 0.0, 0.0, 0.99))
    assert reg.choose(route, NOW)[0].id == "a"  # type: ignore[union-attr]
    assert reg.choose(route, NOW, tried={"a"})[0].id == "b"  # type: ignore[union-attr]
    assert reg.choose(route, NOW, avoid={"a", "b"}, tried={"a", "b"})[0].id == "c"  # type: ignore[union-attr]
    assert reg.choose(route, NOW, tried={"a", "b", "c"})[0].id == "a"  # type: ignore[union-attr]
    assert reg.choose(route, NOW, avoid={"a", "b", "c"}) == (None, None)


def test_every_usable_one_held_gives_the_earliest_release_and_open_ones_give_none() -> None:
    route = pool(spec("a"), spec("b"), spec("c"))
    reg = Registry(clock=lambda: NOW, rng=Fixed())
    a, b, c = (reg.state(s) for s in route.deployments)
    reg.hold(a, NOW, 7.0)
    reg.hold(b, NOW, 3.0)
    open_circuit(c)
    assert reg.choose(route, NOW) == (None, NOW + 3.0)
    reg.record(a, NOW, True, False)
    reg.record(b, NOW, True, False)
    assert reg.choose(route, NOW) == (None, None)
    assert reg.choose(route, NOW + 10.0) == (a, None)  # all due: the first probe in pool order


@pytest.mark.parametrize("avoid", [None, set(), {"other"}])
def test_one_deployment_path_agrees_with_the_pool_path(avoid: set[str] | None) -> None:
    single, double = pool(spec("a")), pool(spec("a"), spec("z"))
    reg = Registry(clock=lambda: NOW, rng=Fixed(*[0.0] * 8))
    a, z = reg.state(double.deployments[0]), reg.state(double.deployments[1])
    open_circuit(z, NOW - 1000.0)
    z.breaker.acquire(NOW)  # z's probe is out: z is not usable, so both routes come down to a
    for check in range(4):
        assert reg.choose(single, NOW, avoid) == reg.choose(double, NOW, avoid), check
        if check == 0:
            a.hold_until = NOW + 2.0
        elif check == 1:
            open_circuit(a)
        elif check == 2:
            a.hold_until = 0.0


def test_a_reloaded_spec_replaces_the_old_one_and_keeps_the_circuit() -> None:
    reg = Registry(clock=lambda: NOW, rng=Fixed(0.0, 0.0))
    old = pool(spec("a"), spec("b"))
    a = reg.state(old.deployments[0])
    open_circuit(a)
    heavier = spec("a", 50.0)
    new = pool(heavier, spec("b"))
    assert reg.choose(new, NOW)[0].id == "b"  # type: ignore[union-attr]  # a's circuit is still open
    assert reg.deployments["a"] is a and a.spec is heavier and a.breaker.spec is heavier.breaker
    reg.record(a, NOW + 10.0, False, True)  # the probe succeeded
    assert reg.choose(new, NOW + 10.0)[0] is a  # weight 50 against 1 with 0.0: a
