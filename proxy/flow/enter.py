"""Entering the flow and leaving it: `Entry`, the one async context manager ingress wraps around dispatch.

On the way in, a call takes everything it needs before it may be sent:
- a route with `on_limit: reject` takes its own limits at once or gets the 429, then waits in its queue
  (if the queue has slots) for a slot only;
- a route with `on_limit: queue` waits in its queue until a slot, every limit of its own and one of its
  deployments' upstream limits are free at once, handed out in the queue's order (`proxy.flow.gate`).
It never holds one of them while it waits for another. The upstream capacity taken here is handed to
dispatch for the first attempt (`call.prehold`).

On the way out (success, error or cancellation): the relayed attempt's upstream hold is finished, the own
limits settle with the real usage, the slot is released, an unused upstream hold is given back, and every
gate with waiters is told that capacity may have freed.
"""

from __future__ import annotations

import asyncio
import math
from typing import TYPE_CHECKING

from proxy.call import Call, WaitingRoom
from proxy.errors import QueueFull, QueueShed
from proxy.flow import shed
from proxy.flow.admit import estimate_tokens, rejection
from proxy.flow.board import GRANTED, Ticket
from proxy.flow.gate import Blocked, Gate, Grant, Need, acquire, give_back
from proxy.flow.upstream import UpstreamHold
from proxy.policy.plan import Limit, LimitSet, Plan, RouteRule

if TYPE_CHECKING:
    from proxy.flow.scheduler import Scheduler


class Entry:
    __slots__ = ("scheduler", "call", "limits", "cls", "waiting", "has_slot", "slot_only", "grant", "gate")

    def __init__(self, scheduler: Scheduler, call: Call, limits: LimitSet | None, cls: int,
                 waiting: WaitingRoom | None, has_slot: bool, *, slot_only: bool = False) -> None:
        self.scheduler = scheduler
        self.call = call
        self.limits = limits
        self.cls = cls
        self.waiting = waiting
        self.has_slot = has_slot
        self.slot_only = slot_only
        self.grant: Grant | None = None
        self.gate: Gate | None = None

    async def __aenter__(self) -> None:
        call, scheduler = self.call, self.scheduler
        route = call.route
        assert route is not None
        admission = scheduler.admission
        cost = 0 if self.slot_only else estimate_tokens(call, self.limits)
        own = self.limits.limits if self.limits is not None else ()
        waits = route.on_limit == "queue" and route.queue is not None and not self.slot_only
        self.grant = Grant()
        if own and not waits:  # over a limit the route answers 429 at once
            reserve = shed.headroom(route.queue, self.cls) if route.queue is not None else 0.0
            taken = await acquire(scheduler.store(), Need(False, own, cost, headroom=reserve), {})
            if not isinstance(taken, Grant):
                raise rejection(admission, taken.refusal, call, False)
            self._adopt(taken)
            own = ()
        upstreams = scheduler.upstream_limits(route, call.plan) if waits and route.batch is None else ()
        if not self.has_slot and not own and not upstreams:
            return  # nothing to wait for in a queue (upstream limits: dispatch takes them per attempt)
        try:
            await self._queue(own, cost, upstreams)
        except BaseException:
            await self._undo()
            raise

    async def _queue(self, own: tuple[Limit, ...], cost: int, upstreams: tuple[Limit, ...]) -> None:
        call, scheduler = self.call, self.scheduler
        route = call.route
        assert route is not None
        spec = route.queue
        assert spec is not None
        gate = self.gate = scheduler.queue(spec, call.plan.priorities, newest=not scheduler.reloads)
        need = Need(self.has_slot, own, cost, upstreams, call.token_estimate, shed.headroom(spec, self.cls))
        outcome = await gate.try_now(need)
        if isinstance(outcome, Grant):
            self._adopt(outcome)
            gate.admit(None)
            return
        if isinstance(outcome, Blocked) and outcome.refusal.retry_after is None:
            raise rejection(scheduler.admission, outcome.refusal, call, False)  # bigger than the limit: never fits
        await self._wait(gate, need, outcome)

    async def _undo(self) -> None:
        """The call never got past its queue: what it took at arrival goes back (nothing was sent)."""
        grant = self.grant
        if grant is not None and grant.reservation is not None:
            reservation, grant.reservation = grant.reservation, None
            if await self.scheduler.admission.settle(self.call, reservation):
                self.scheduler.kick()

    def _adopt(self, taken: Grant) -> None:
        grant = self.grant
        assert grant is not None
        grant.slot = taken.slot
        grant.waited = taken.waited
        if taken.reservation is not None:
            grant.reservation = taken.reservation
            if taken.reservation.tokens:
                self.scheduler.admission.count_tokens(self.call, taken.reservation.tokens, 0, 0)
        if taken.upstream is not None and taken.upstream_limit is not None:
            store = self.scheduler.store()
            self.call.prehold = (taken.upstream_limit.key, UpstreamHold(store, taken.upstream, self.scheduler.kick))

    async def _wait(self, gate: Gate, need: Need, first: Grant | Blocked | None) -> None:
        call, spec = self.call, gate.spec
        if gate.board.live >= spec.max_waiting:
            gate.reject("queue_full")
            raise QueueFull(
                f"queue '{spec.name}' is full ({gate.board.live} requests waiting, max_waiting "
                f"{spec.max_waiting}); retrying now would not help",
                should_retry=False,
            )
        self._shed_for(gate)
        assert call.tenant is not None
        now = gate.clock()
        ticket = Ticket(call.tenant.name, self.cls, weight=call.tenant.weight, request_id=call.request_id,
                        model=call.model, stream=call.stream, now=now)
        ticket.need = need
        if isinstance(first, Blocked):
            ticket.blocked = first.refusal
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Grant] = loop.create_future()
        ticket.future = future
        gate.board.push(ticket, now)
        ticket.timer = loop.call_later(max(0.0, spec.max_wait - call.elapsed()), gate.expire, ticket)
        gate.kick()
        begun = False
        try:
            if self.waiting is not None:
                begun = True
                await self.waiting.begin(lambda: _status(gate, ticket))
            taken = await future
        except BaseException:
            await self._left(gate, ticket)
            raise
        finally:
            if begun and self.waiting is not None:
                self.waiting.end()
        self._adopt(taken)
        call.queue_wait = taken.waited
        gate.admit(taken.waited)
        call.mark("slot")

    def _shed_for(self, gate: Gate) -> None:
        """Past the queue's shedding threshold the lowest class waiting goes first: a waiter of a class
        below this call's is pushed out, or, when there is none, this call is refused."""
        spec = gate.spec
        if not shed.over(spec, gate.board.live, gate.eta_at_back(self.cls)):
            return
        eta = gate.eta_at_back(len(gate.classes) - 1)
        victim = gate.board.last_of_lowest(self.cls)
        error = shed.refusal(spec, gate.board.live, eta)
        gate.reject("queue_shed")
        if victim is None:
            raise error
        if victim.timer is not None:
            victim.timer.cancel()
        gate.board.remove(victim)
        if victim.future is not None and not victim.future.done():
            victim.future.set_exception(error)

    async def _left(self, gate: Gate, ticket: Ticket) -> None:
        """The wait ended without the call going on (timed out, cleared, shed, the client left)."""
        if ticket.timer is not None:
            ticket.timer.cancel()
        future = ticket.future
        self.call.queue_wait = gate.clock() - ticket.enqueued
        if ticket.state == GRANTED and future is not None and future.done() and not future.cancelled() \
                and future.exception() is None:
            taken: Grant = future.result()  # granted just as the client left: pass everything on
            gate.release(taken)
            await give_back(self.scheduler.store(), taken)
            self.scheduler.kick()
            return
        if gate.board.remove(ticket):
            gate.left += 1  # the client left: a cancellation, counted by its outcome, not as a rejection
        gate.waited(gate.clock() - ticket.enqueued)

    async def __aexit__(self, *exc: object) -> None:
        call, scheduler = self.call, self.scheduler
        grant = self.grant
        freed = False
        hold = call.hold
        try:
            if hold is not None:  # the relayed attempt's upstream hold: its response is done with now
                call.hold = None
                await hold.finish(call.status, call.usage)
            if grant is not None and grant.reservation is not None:
                freed = await scheduler.admission.settle(call, grant.reservation)
                grant.reservation = None
        finally:
            prehold = call.prehold
            if prehold is not None:  # dispatch never used it: the attempt went elsewhere, or never went
                call.prehold = None
                await prehold[1].finish(0, None, sent=False)
            if grant is not None and grant.slot and self.gate is not None:
                self.gate.release(grant, kick=not freed)
            if freed:
                scheduler.kick()  # own limits and upstream capacity are shared with other queues


def upstream_limits(route: RouteRule, plan: Plan) -> tuple[Limit, ...]:
    """The upstream limits one of which the call must find free: one per distinct upstream of the route's
    pool and of its fallbacks' pools (dispatch may send it to any of them); none when one of those
    deployments has no upstream limit (it can always go there)."""
    found: dict[str, Limit] = {}
    rules = [route] + [plan.routes_by_name[name] for name in route.fallbacks if name in plan.routes_by_name]
    for rule in rules:
        for deployment in rule.deployments:
            if deployment.limit is None:
                return ()
            found.setdefault(deployment.limit.key, deployment.limit)
    return tuple(found.values())


def _status(gate: Gate, ticket: Ticket) -> str:
    """The heartbeat comment of a waiting stream: its place and, when known, the estimated wait."""
    eta = gate.eta_of(ticket)
    text = f"queued position={gate.board.position(ticket)}"
    if eta is not None and math.isfinite(eta):
        text += f" eta={math.ceil(eta)}s"
    return text


__all__ = ["Entry", "QueueShed", "upstream_limits"]
