"""The scheduler: every gate (named queue) by name, the one `enter(call)` the data path wraps around
dispatch, and the kick that tells gates with waiters that capacity may have freed.

A reload re-configures a gate instead of resetting it; shutdown fails every waiter; the admin API reads
the gates. The order inside a gate is `proxy.flow.board`; what a gate hands out is `proxy.flow.gate`;
entering and leaving is `proxy.flow.enter`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from proxy.admission.limits import Refusal
from proxy.admission.store import LimiterStore
from proxy.call import Call, WaitingRoom
from proxy.errors import InvalidRequest, ProxyError, RateLimited
from proxy.flow.admit import NOTHING, Admission, describe_refusal, rejection
from proxy.flow.board import Ticket
from proxy.flow.enter import Entry
from proxy.flow.entry_plan import ENTER, HIT, NO_SLOT, SLOT_ONLY, EntryPlan  # it knows this module only for types
from proxy.flow.gate import Gate
from proxy.policy.plan import Plan, QueueSpec, TenantRule
from proxy.telemetry.metrics import Metrics

PRIORITY_HEADER = "x-signalbox-priority"
_MOST_PLANS = 4096
"""Entry plans kept at once (`Scheduler.plans`)."""


def priority_of(plan: Plan, tenant: TenantRule, asked: str | None) -> int:
    """The tenant's default class, or the class the header asks for, capped at the tenant's max."""
    if not asked:
        return tenant.priority
    name = asked.strip()
    if name not in plan.priorities:
        raise InvalidRequest(
            f"unknown priority class '{name}' in {PRIORITY_HEADER}; classes: {', '.join(plan.priorities)}"
        )
    return max(plan.priorities.index(name), tenant.max_priority)


class Scheduler:
    """Every gate by name; a reload re-configures a gate instead of resetting it."""

    __slots__ = ("queues", "metrics", "clock", "reloads", "admission", "plans")

    def __init__(self, metrics: Metrics | None = None, clock: Callable[[], float] = time.monotonic,
                 admission: Admission | None = None) -> None:
        self.queues: dict[str, Gate] = {}
        self.metrics = metrics
        self.clock = clock
        self.admission = admission if admission is not None else Admission(metrics=metrics)
        self.plans: dict[tuple[int, int, int], EntryPlan] = {}
        """Entry plans by the identity of their route and tenant objects and the kind of entry, compiled on
        first use (a plan holds its route and tenant, so their ids are not reused while it is kept); each
        reload empties the lot."""
        self.reloads = False
        """Set once `reconfigure` was called: from then on only reloads change a queue's numbers, so a
        request still holding the previous plan cannot flip a queue back to old settings."""

    def store(self) -> LimiterStore:
        """Read at each use: the Redis store replaces the default one at start-up."""
        return self.admission.store

    def queue(self, spec: QueueSpec, classes: tuple[str, ...], *, newest: bool = True) -> Gate:
        gate = self.queues.get(spec.name)
        if gate is None:
            gate = self.queues[spec.name] = Gate(spec, classes, self.metrics, self.clock, self)
        elif gate.spec is not spec and newest:
            gate.configure(spec, classes)
        return gate

    def gate(self, spec: QueueSpec, call: Call) -> Gate:
        """The gate a call enters: `queue(spec, its plan's classes, newest unless a reload happened)`, looked
        up directly while the gate has this very spec (every request but the first after a reload)."""
        gate = self.queues.get(spec.name)
        if gate is not None and gate.spec is spec:
            return gate
        return self.queue(spec, call.plan.priorities, newest=not self.reloads)

    def kick(self) -> None:
        """Capacity may have freed somewhere (a release, a settlement): every gate with waiters looks."""
        for gate in self.queues.values():
            if gate.board.live:
                gate.kick()

    def shut(self, error: ProxyError) -> int:
        """Shutdown, past the drain timeout: no gate grants again, and every waiter fails with `error`
        (a waiting stream gets it as its error event). Returns how many were waiting."""
        failed = 0
        for gate in self.queues.values():
            gate.pause()
            failed += gate.fail_waiters(error, "shutdown")
        return failed

    def reconfigure(self, plan: Plan) -> None:
        """After a reload: new numbers for known gates now (a bigger one grants its waiters at once)."""
        self.reloads = True
        self.plans.clear()  # requests still under the previous plan compile theirs again
        for spec in plan.queues.values():
            if spec.name in self.queues:
                self.queue(spec, plan.priorities)
        self.kick()  # limits may have grown too

    def enter(self, call: Call, asked: str | None = None, waiting: WaitingRoom | None = None, *, slot: bool = True
              ) -> AbstractAsyncContextManager[None]:
        """Everything the call needs before dispatch (limits, a slot), taken in the queue's order; given
        back on the way out. NOTHING when the route has no limit and no queue slot."""
        plan = self.plans.get((id(call.route), id(call.tenant), ENTER if slot else NO_SLOT))
        if plan is None:
            plan = self.plan_for(call, ENTER if slot else NO_SLOT)
        if plan.nothing:
            return NOTHING
        return Entry(call, plan, priority_of(call.plan, plan.tenant, asked) if asked else plan.cls, waiting)

    def own_limits(self, call: Call, asked: str | None = None) -> AbstractAsyncContextManager[None]:
        """Only the call's own limits (tenant and route), counting one request and no tokens: a cache hit,
        which takes no slot and no upstream limit (proxy/cache/serve.py)."""
        return self._entry(call, asked, HIT)

    def slot(self, call: Call, asked: str | None = None) -> AbstractAsyncContextManager[None]:
        """Only a slot of the route's queue, in order (an embeddings batch's flush: its callers' limits
        were taken one by one)."""
        return self._entry(call, asked, SLOT_ONLY)

    def _entry(self, call: Call, asked: str | None, kind: int) -> AbstractAsyncContextManager[None]:
        plan = self.plan_for(call, kind)
        if plan.nothing:
            return NOTHING
        return Entry(call, plan, priority_of(call.plan, plan.tenant, asked), None)

    def plan_for(self, call: Call, kind: int) -> EntryPlan:
        """The entry plan of the call's route for its tenant (compiled now if it is not kept)."""
        route, tenant = call.route, call.tenant
        assert route is not None and tenant is not None
        key = (id(route), id(tenant), kind)
        plan = self.plans.get(key)
        if plan is None:
            if len(self.plans) >= _MOST_PLANS:
                self.plans.clear()  # routes × tenants × kinds of a huge policy: bounded, compiled again
            plan = self.plans[key] = EntryPlan(self, route, tenant, kind, len(call.plan.priorities))
        return plan

    def refusal_error(self, refusal: Refusal, ticket: Ticket | None, *, waited: bool,
                      call: Call | None = None) -> RateLimited:
        return rejection(self.admission, refusal, call, waited, ticket.request_id if ticket else "")

    @staticmethod
    def describe(refusal: Refusal) -> str:
        return describe_refusal(refusal)

    async def refresh_metrics(self) -> None:
        metrics = self.metrics
        if metrics is None:
            return
        metrics.queue_length.clear()  # a reload may have renamed the classes: no stale series
        for name, gate in self.queues.items():
            by_class = [0] * len(gate.classes)
            for (cls, _tenant), count in gate.board.counts().items():
                by_class[cls] += count
            for cls, count in enumerate(by_class):
                metrics.queue_length.labels(name, gate.classes[cls]).set(count)
            metrics.active_requests.labels(name).set(gate.active)
            metrics.queue_slots.labels(name).set(gate.spec.concurrency or 0)
