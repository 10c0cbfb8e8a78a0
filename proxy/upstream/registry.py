"""Per-deployment runtime state: circuit breaker, requests in flight, pacing hold, and per-upstream load
for the retry budget. One `Registry` hangs off the Runtime (via `UpstreamClients.registry`); state is
keyed by deployment id, so a policy reload that keeps a deployment keeps its breaker and counters.

Time and randomness are injected (`clock`, `rng`), so tests drive it without sleeping. Decisions are
delegated to the pure modules (breaker, balance, budget); this module only keeps the numbers.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from proxy.policy.plan import DeploymentSpec, Plan, RetrySpec, RouteRule
from proxy.upstream import balance, budget
from proxy.upstream.breaker import Breaker, State

if TYPE_CHECKING:
    from proxy.telemetry.metrics import Metrics
    from proxy.upstream.quota import Quota


class UpstreamLoad:
    """Requests in flight to one upstream (all its deployments), and how many of them are retries."""

    __slots__ = ("active", "retrying")

    def __init__(self) -> None:
        self.active = 0
        self.retrying = 0


class DeploymentState:
    __slots__ = ("id", "spec", "breaker", "outstanding", "hold_until", "load")

    def __init__(self, spec: DeploymentSpec, load: UpstreamLoad) -> None:
        self.id = spec.id
        self.spec = spec
        self.breaker = Breaker(spec.breaker)
        self.outstanding = 0
        """Requests sent to this deployment whose response has not been fully relayed yet."""
        self.hold_until = 0.0
        """Pacing: no new dispatch before this clock time."""
        self.load = load


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
        self.loads: dict[str, UpstreamLoad] = {}
        self.metrics: Metrics | None = None
        self.quota: Quota | None = None
        """Upstream limits per attempt (the runtime wires admission's implementation in)."""

    # --- state ---------------------------------------------------------------------------------------

    def state(self, spec: DeploymentSpec) -> DeploymentState:
        found = self.deployments.get(spec.id)
        if found is None:
            load = self.loads.get(spec.upstream)
            if load is None:
                load = self.loads[spec.upstream] = UpstreamLoad()
            found = self.deployments[spec.id] = DeploymentState(spec, load)
            if self.metrics is not None:
                self.metrics.circuit_changed(spec.id, "closed", transition=False)
        elif found.spec is not spec:
            found.spec = spec  # a reload (or another route naming the same deployment)
            found.breaker.spec = spec.breaker
        return found

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
        if len(specs) == 1:  # the common case, without building lists
            only = self.state(specs[0])
            if (avoid and only.id in avoid) or (full and only.spec.upstream in full):
                return None, None
            if not only.breaker.available(now):
                return None, None
            if only.hold_until > now:
                return None, only.hold_until
            return only, None
        states = [self.state(s) for s in specs]
        ready: list[int] = []
        held: float | None = None
        for i, st in enumerate(states):
            if (avoid and st.id in avoid) or (full and st.spec.upstream in full) or not st.breaker.available(now):
                continue
            if st.hold_until > now:
                held = st.hold_until if held is None else min(held, st.hold_until)
                continue
            if st.breaker.probe_due(now):
                return st, None
            ready.append(i)
        if not ready:
            return None, held
        if tried:
            fresh = [i for i in ready if states[i].id not in tried]
            ready = fresh or ready
        weights = [s.weight for s in specs]
        outstanding = [st.outstanding for st in states]
        return states[balance.pick(route.balance, weights, outstanding, ready, self.rng.random())], None

    def reopens_in(self, route: RouteRule, now: float) -> float:
        """Seconds until the first of the route's open circuits lets a probe through."""
        waits = [max(0.0, self.state(s).breaker.reopen_at - now) for s in route.deployments]
        return min(waits, default=0.0)

    # --- one attempt -------------------------------------------------------------------------------

    def retry_allowed(self, state: DeploymentState, spec: RetrySpec) -> bool:
        load = state.load
        if budget.retry_allowed(load.active, load.retrying, spec.budget_percent, spec.budget_min):
            return True
        if self.metrics is not None:
            self.metrics.budget_exhausted(state.spec.upstream)
        return False

    def start(self, state: DeploymentState, now: float, retry: bool) -> bool:
        """An attempt begins (its backoff included); returns True if it is the circuit's half-open probe."""
        state.outstanding += 1
        state.load.active += 1
        if retry:
            state.load.retrying += 1
        breaker = state.breaker
        if breaker.state == "closed":
            return False
        changed = breaker.acquire(now)
        if changed is not None:
            self._changed(state, changed)
        return True

    def answered(self, state: DeploymentState, retry: bool) -> None:
        """The attempt has its outcome: it no longer counts as a retry in flight."""
        if retry:
            state.load.retrying -= 1

    def release(self, state: DeploymentState) -> None:
        """The attempt's response is done with (relayed, buffered, or never came)."""
        state.outstanding -= 1
        state.load.active -= 1

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
        loads = {name: {"active": u.active, "retrying": u.retrying} for name, u in sorted(self.loads.items())}
        return {"deployments": deployments, "upstreams": loads}

    async def refresh_metrics(self) -> None:
        """Scrape-time gauges: requests in flight, pacing holds and circuit state per deployment."""
        if self.metrics is None:
            return
        now = self.clock()
        for st in self.deployments.values():
            self.metrics.deployment_gauges(
                st.id, st.outstanding, max(0.0, st.hold_until - now), st.breaker.state != "closed"
            )
