"""Per-deployment runtime state (circuit breaker, requests in flight, pacing hold) and per-route retry
budgets. One `Registry` hangs off the Runtime (via `UpstreamClients.registry`); state is keyed by
deployment id and route name, so a policy reload that keeps them keeps their breakers and counters.

Time and randomness are injected (`clock`, `rng`), so tests drive it without sleeping. Decisions are
delegated to the pure modules (breaker, balance, budget); this module keeps the numbers, plus the two pure
steps of choosing that read a `DeploymentState` (`usable`, `prefer_untried`).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from proxy.policy.plan import DeploymentSpec, Plan, RouteRule
from proxy.upstream import balance
from proxy.upstream.breaker import Breaker, State
from proxy.upstream.budget import RetryBudget

if TYPE_CHECKING:
    from proxy.telemetry.metrics import Metrics
    from proxy.upstream.quota import Quota


class DeploymentState:
    __slots__ = ("id", "spec", "breaker", "outstanding", "hold_until")

    def __init__(self, spec: DeploymentSpec) -> None:
        self.id = spec.id
        self.spec = spec
        self.breaker = Breaker(spec.breaker)
        self.outstanding = 0
        """Requests sent to this deployment whose response has not been fully relayed yet."""
        self.hold_until = 0.0
        """Pacing: no new dispatch before this clock time."""


def usable(
    states: list[DeploymentState], now: float, avoid: set[str] | None, full: set[str] | None
) -> tuple[DeploymentState | None, list[int], float | None]:
    """Which of a pool's deployments can take the next attempt now (pure: reads the states, changes nothing).

    Returns (a deployment whose circuit is due for a probe, [], None) as soon as one is found, since a probe
    goes first (so a recovered deployment closes quickly); else (None, the indices of the ready ones, the
    earliest pacing hold among the usable-but-held ones or None).
    """
    ready: list[int] = []
    held: float | None = None
    for i, st in enumerate(states):
        if (avoid and st.id in avoid) or (full and st.spec.upstream in full) or not st.breaker.available(now):
            continue  # avoided after an attempt, its upstream over its own limits, or its circuit open
        if st.hold_until > now:
            held = st.hold_until if held is None else min(held, st.hold_until)
            continue
        if st.breaker.probe_due(now):
            return st, [], None
        ready.append(i)
    return None, ready, held


def prefer_untried(states: list[DeploymentState], ready: list[int], tried: set[str]) -> list[int]:
    """The ready indices not tried yet by this call; all of them when every one was (a retry may go back)."""
    return [i for i in ready if states[i].id not in tried] or ready


class Registry:
    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.clock = clock
        self.wall = wall
        """The wall clock, for HTTP dates and RFC 3339 reset timestamps."""
        self.rng = rng or random.Random()
        self.deployments: dict[str, DeploymentState] = {}
        self.budgets: dict[str, RetryBudget] = {}
        """Per route name: the calls that came in on it pay for their retries (fallbacks included)."""
        self.metrics: Metrics | None = None
        self.quota: Quota | None = None
        """Upstream limits per attempt (the runtime wires admission's implementation in)."""

    # --- state ---------------------------------------------------------------------------------------

    def state(self, spec: DeploymentSpec) -> DeploymentState:
        found = self.deployments.get(spec.id)
        if found is None:
            found = self.deployments[spec.id] = DeploymentState(spec)
            if self.metrics is not None:
                self.metrics.circuit_changed(spec.id, "closed", transition=False)
        elif found.spec is not spec:
            found.spec = spec  # a reload (or another route naming the same deployment)
            found.breaker.configure(spec.breaker)
        return found

    def _states(self, specs: tuple[DeploymentSpec, ...]) -> list[DeploymentState]:
        """`state()` of each spec, with its dict look-up inline: this runs for every request to a pool, and
        the method call per deployment cost more than the look-up (new or reloaded specs take `state()`)."""
        get = self.deployments.get
        states: list[DeploymentState] = []
        for spec in specs:
            found = get(spec.id)
            if found is None or found.spec is not spec:
                found = self.state(spec)
            states.append(found)
        return states

    def configure(self, plan: Plan) -> None:
        """Create state for every deployment of the plan; forget deployments no route names any more."""
        keep: set[str] = set()
        for route in plan.routes:
            for spec in route.deployments:
                self.state(spec)
                keep.add(spec.id)
        for gone in [d for d, s in self.deployments.items() if d not in keep and s.outstanding == 0]:
            del self.deployments[gone]
            if self.metrics is not None:
                self.metrics.forget_deployment(gone)
        for name in [n for n in self.budgets if n not in plan.routes_by_name]:
            del self.budgets[name]

    # --- choosing ------------------------------------------------------------------------------------

    def choose(
        self,
        route: RouteRule,
        now: float,
        avoid: set[str] | None = None,
        tried: set[str] | None = None,
        full: set[str] | None = None,
    ) -> tuple[DeploymentState | None, float | None]:
        """A deployment for the next attempt, or (None, until) when every usable one is held by pacing
        until `until`, or (None, None) when none is usable (circuits open, or all avoided or full).

        Usable: circuit closed or due for a probe, not held, not in `avoid`, its upstream not in `full`
        (over its own limits for this attempt). A due probe goes first (so a recovered deployment closes
        quickly); deployments not in `tried` are preferred for a retry."""
        specs = route.deployments
        if len(specs) == 1:  # the common case, inline and without building lists
            spec = specs[0]
            only = self.deployments.get(spec.id)
            if only is None or only.spec is not spec:
                only = self.state(spec)
            if (avoid and only.id in avoid) or (full and only.spec.upstream in full):
                return None, None
            breaker = only.breaker
            if breaker.state != "closed" and not breaker.available(now):
                return None, None
            if only.hold_until > now:
                return None, only.hold_until
            return only, None
        states = self._states(specs)
        probe, ready, held = usable(states, now, avoid, full)
        if probe is not None:
            return probe, None
        if not ready:
            return None, held
        if tried:
            ready = prefer_untried(states, ready, tried)
        weights = [s.weight for s in specs]
        outstanding = [st.outstanding for st in states]
        return states[balance.pick(route.balance, weights, outstanding, ready, self.rng.random())], None

    def reopens_in(self, route: RouteRule, now: float) -> float:
        """Seconds until the first of the route's open circuits lets a probe through."""
        waits = [max(0.0, self.state(s).breaker.reopen_at - now) for s in route.deployments]
        return min(waits, default=0.0)

    # --- one attempt -------------------------------------------------------------------------------

    def budget(self, route: RouteRule) -> RetryBudget:
        found = self.budgets.get(route.name)
        if found is None:
            found = self.budgets[route.name] = RetryBudget()
        return found

    def retry_allowed(self, route: RouteRule, state: DeploymentState, now: float) -> bool:
        """May a call that came in on `route` retry (on `state`) now? Its route's budget decides."""
        spec = route.retry
        if self.budget(route).allows(now, spec.budget_percent, spec.budget_min):
            return True
        if self.metrics is not None:
            self.metrics.budget_exhausted(state.spec.upstream)
        return False

    def start(self, state: DeploymentState, now: float, retry: bool, route: RouteRule) -> bool:
        """An attempt begins (its backoff included), counted in the budget of `route` (the call's own);
        returns True if it is the circuit's half-open probe."""
        state.outstanding += 1
        budget = self.budgets.get(route.name) or self.budget(route)
        if retry:
            budget.retry(now)
        else:
            budget.request(now)
        breaker = state.breaker
        if breaker.state == "closed":
            return False
        changed = breaker.acquire(now)
        if changed is not None:
            self._changed(state, changed)
        return True

    def release(self, state: DeploymentState) -> None:
        """The attempt's response is done with (relayed, buffered, or never came)."""
        state.outstanding -= 1

    def record(self, state: DeploymentState, now: float, failed: bool, probe: bool) -> None:
        changed = state.breaker.record(now, failed, probe)
        if changed is not None:
            self._changed(state, changed)

    def abandon(self, state: DeploymentState, probe: bool) -> None:
        """A cancelled attempt has no outcome: a probe it held goes back."""
        if probe:
            state.breaker.abandon()

    def hold(self, state: DeploymentState, now: float, seconds: float) -> None:
        """Pacing: no new dispatch to this deployment for `seconds` (capped by its max_hold)."""
        pacing = state.spec.pacing
        if pacing.enabled and seconds > 0:
            state.hold_until = max(state.hold_until, now + min(seconds, pacing.max_hold))

    def _changed(self, state: DeploymentState, to: State) -> None:
        if self.metrics is not None:
            self.metrics.circuit_changed(state.id, to)

    # --- operators -----------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """For GET /admin/upstreams."""
        now = self.clock()
        deployments = []
        for st in sorted(self.deployments.values(), key=lambda s: s.id):
            b = st.breaker
            deployments.append({
                "deployment": st.id,
                "upstream": st.spec.upstream,
                "model": st.spec.model,
                "circuit": b.state if b.state != "open" or now < b.reopen_at else "open (probe due)",
                "consecutive_failures": b.consecutive,
                "openings": b.openings,
                "reopens_in_s": round(b.reopen_at - now, 3) if b.state == "open" and now < b.reopen_at
                else None,
                "outstanding": st.outstanding,
                "pacing_hold_s": round(st.hold_until - now, 3) if st.hold_until > now else None,
            })
        budgets = {
            name: dict(zip(("requests", "retries"), b.counts(now), strict=True))
            for name, b in sorted(self.budgets.items())
        }
        return {"deployments": deployments, "retry_budgets": budgets}

    async def refresh_metrics(self) -> None:
        """Scrape-time gauges: requests in flight, pacing holds and circuit state per deployment."""
        if self.metrics is None:
            return
        now = self.clock()
        for st in self.deployments.values():
            self.metrics.deployment_gauges(
                st.id, st.outstanding, max(0.0, st.hold_until - now), st.breaker.state != "closed"
            )
