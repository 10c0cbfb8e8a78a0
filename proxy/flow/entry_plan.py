"""What entering the flow needs that is the same for every request of one route, tenant and kind of entry
(`EntryPlan`): worked out on the first such request under a policy and kept by the scheduler, so an
admitted request reads a few flags instead of deriving them from the route, its limits and its queue.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from proxy.flow import shed
from proxy.policy.plan import Limit, LimitSet, RouteRule, TenantRule

if TYPE_CHECKING:
    from proxy.flow.admit import Admission
    from proxy.flow.gate import Gate
    from proxy.flow.scheduler import Scheduler

ENTER = 0
"""`Scheduler.enter`: own limits, a queue slot, one of the upstreams' limits when it waits in a queue."""
SLOT_ONLY = 1
"""`Scheduler.slot`: a batch's slot (its callers took their limits and tokens one by one)."""
HIT = 2
"""`Scheduler.own_limits`: a cache hit (own limits only, one request, no tokens, no slot, no upstream)."""
NO_SLOT = 3
"""`Scheduler.enter(slot=False)`: an embeddings call, whose batch takes the slot."""


class EntryPlan:
    """One route's entry for one tenant, as `Entry` takes it."""

    __slots__ = ("scheduler", "admission", "kick", "gate", "route", "tenant", "nothing", "at_once", "own",
                 "slot", "spec", "upstreams", "queues", "estimates", "tokens", "default_max_tokens", "cls",
                 "headroom", "totals")

    def __init__(self, scheduler: Scheduler, route: RouteRule, tenant: TenantRule, kind: int, classes: int) -> None:
        self.scheduler = scheduler
        self.admission: Admission = scheduler.admission
        self.kick = scheduler.kick
        self.route = route
        self.tenant = tenant
        self.gate: Gate | None = None
        """The queue's gate, once looked up (`Entry` checks it still has this plan's `spec`). Gates are kept
        by queue name for good, so it is always the same object once set."""
        limits = route.limit_sets.get(tenant.name) if route.limit_sets and kind != SLOT_ONLY else None
        spec = self.spec = route.queue
        self.slot = kind in (ENTER, SLOT_ONLY) and spec is not None and spec.concurrency is not None
        self.nothing = limits is None and not self.slot and (kind in (HIT, SLOT_ONLY) or not route.upstream_limited)
        """The route asks nothing of this entry: `NOTHING` stands in for it."""
        self._queue(route, limits, kind)
        self._tokens(route, limits, kind)
        self.cls = tenant.priority
        """The tenant's default class."""
        # Every class `priority_of` can give: the policy's, the tenant's default and the highest it may ask.
        classes = max(classes, tenant.priority + 1, tenant.max_priority + 1)
        self.headroom = tuple(shed.headroom(spec, cls) if spec is not None else 0.0 for cls in range(classes))
        """By class: the share of each limit a request of that class must leave free in the queue."""

    def _queue(self, route: RouteRule, limits: LimitSet | None, kind: int) -> None:
        waits = route.on_limit == "queue" and route.queue is not None and kind != SLOT_ONLY
        own: tuple[Limit, ...] = limits.limits if limits is not None else ()
        self.at_once = () if waits else own
        """Own limits taken at arrival or refused with a 429 (a route that rejects over its limits)."""
        self.own = own if waits else ()
        """Own limits taken in the queue's order."""
        # A queued call waits for one of its upstreams' limits too (not a batch's callers, not a cache hit:
        # neither goes upstream on its own).
        self.upstreams = route.upstream_choices if waits and route.batch is None and kind != HIT else ()
        self.queues = self.slot or bool(self.own) or bool(self.upstreams)
        """Something to take in the queue (else upstream limits, if any, are dispatch's, per attempt)."""

    def _tokens(self, route: RouteRule, limits: LimitSet | None, kind: int) -> None:
        tokens = limits is not None and limits.tokens
        self.estimates = kind in (ENTER, NO_SLOT) and (tokens or route.upstream_tokens)
        """A token limit applies (own or upstream): estimate the call's tokens and ask for its usage."""
        self.tokens = self.estimates and tokens
        """The own limits count the estimate (else they count no tokens)."""
        self.default_max_tokens = route.default_max_tokens
        self.totals = self.admission.totals_of(self.tenant.name) if limits is not None else None
        """The tenant's [reserved, settled, refunded] token totals (`Admission.tokens`)."""
