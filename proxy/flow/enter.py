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

from proxy.admission.local import LocalStore
from proxy.admission.store import LimiterStore
from proxy.call import Call, WaitingRoom
from proxy.errors import QueueFull, QueueShed
from proxy.flow import shed
from proxy.flow.admit import estimate_tokens, rejection
from proxy.flow.board import GRANTED, Ticket
from proxy.flow.gate import Gate
from proxy.flow.take import OPEN, Blocked, Grant, Need, acquire, acquire_now, give_back
from proxy.flow.upstream import UpstreamHold
from proxy.policy.plan import Limit, LimitSet

if TYPE_CHECKING:
    from proxy.flow.scheduler import Scheduler


SLOT_ONLY = 1
"""`Entry.mode`: a batch's slot (its callers took their limits and tokens one by one)."""
HIT = 2
"""`Entry.mode`: a cache hit (own limits only, one request, no tokens, no slot, no upstream)."""


class Entry:
    __slots__ = ("scheduler", "call", "limits", "cls", "waiting", "has_slot", "mode", "grant", "gate")

    def __init__(self, scheduler: Scheduler, call: Call, limits: LimitSet | None, cls: int,
                 waiting: WaitingRoom | None, has_slot: bool, mode: int = 0) -> None:
        self.scheduler = scheduler
        self.call = call
        self.limits = limits
        self.cls = cls
        self.waiting = waiting
        self.has_slot = has_slot
        self.mode = mode
        """0, SLOT_ONLY or HIT; either of the last two reserves no tokens."""
        self.grant: Grant | None = None
        self.gate: Gate | None = None

    async def __aenter__(self) -> None:
        call, scheduler, mode = self.call, self.scheduler, self.mode
        route = call.route
        assert route is not None
        cost = 0 if mode else estimate_tokens(call, self.limits)
        own = self.limits.limits if self.limits is not None else ()
        spec = route.queue
        waits = route.on_limit == "queue" and spec is not None and mode != SLOT_ONLY
        store = scheduler.admission.store
        local = store if isinstance(store, LocalStore) else None
        if own and not waits:  # over a limit the route answers 429 at once
            await self._own_at_once(own, cost, store)
            own = ()
        # A queued call waits for one of its upstreams' limits too (not a batch's callers, not a cache hit:
        # neither goes upstream on its own).
        upstreams = route.upstream_choices if waits and route.batch is None and mode != HIT else ()
        if not self.has_slot and not own and not upstreams:
            return  # nothing to wait for in a queue (upstream limits: dispatch takes them per attempt)
        assert spec is not None
        try:
            gate = self.gate = scheduler.gate(spec, call)
            need = Need(self.has_slot, own, cost, upstreams, call.token_estimate, shed.headroom(spec, self.cls))
            # Nobody waiting and everything free: taken here and now, without suspending (in-memory store).
            outcome = gate.try_now_local(need, local) if local is not None else await gate.try_now(need)
            if isinstance(outcome, Grant):  # granted at arrival
                self._adopt(outcome, store)
                gate.admit(None)
            elif self._admitted(outcome):
                await self._wait(gate, need, outcome)
        except BaseException:
            await self._undo()
            raise

    async def _undo(self) -> None:
        """The call never got past its queue: what it took at arrival goes back (nothing was sent)."""
        grant = self.grant
        if grant is not None and grant.reservation is not None:
            reservation, grant.reservation = grant.reservation, None
            if await self.scheduler.admission.settle(self.call, reservation):
                self.scheduler.kick()

    def _admitted(self, outcome: Blocked | None) -> bool:
        """Not granted at arrival: it may wait (True); a request bigger than a limit is refused."""
        if isinstance(outcome, Blocked) and outcome.refusal.retry_after is None:  # bigger than the limit
            raise rejection(self.scheduler.admission, outcome.refusal, self.call, False)
        return True

    async def _own_at_once(self, own: tuple[Limit, ...], cost: int, store: LimiterStore) -> None:
        """A route that rejects over its limits: take them now, or the 429."""
        spec = self.call.route.queue if self.call.route is not None else None
        need = Need(False, own, cost, headroom=shed.headroom(spec, self.cls) if spec is not None else 0.0)
        local = store if isinstance(store, LocalStore) else None
        taken = acquire_now(local, need, OPEN) if local is not None else await acquire(store, need, {})
        if not isinstance(taken, Grant):
            raise rejection(self.scheduler.admission, taken.refusal, self.call, False)
        self._adopt(taken, store)

    def _adopt(self, taken: Grant, store: LimiterStore) -> None:
        grant = self.grant
        reservation = taken.reservation
        if grant is None:  # the first grant is kept as is
            self.grant = taken
        else:  # a slot after own limits taken at arrival (a route that rejects over its limits)
            grant.slot = taken.slot
            grant.waited = taken.waited
            if reservation is not None:
                grant.reservation = reservation
        if reservation is not None and reservation.tokens:
            self.scheduler.admission.count_tokens(self.call, reservation.tokens, 0, 0)
        upstream = taken.upstream
        if upstream is not None and taken.upstream_limit is not None:
            self.call.prehold = (taken.upstream_limit.key, UpstreamHold(store, upstream, self.scheduler.kick))
            taken.upstream = None  # the prehold finishes it

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
        self._adopt(taken, self.scheduler.admission.store)
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
            await give_back(self.scheduler.admission.store, taken)
            self.scheduler.kick()
            return
        if gate.board.remove(ticket):
            gate.left += 1  # the client left: a cancellation, counted by its outcome, not as a rejection
        gate.waited(gate.clock() - ticket.enqueued)

    async def __aexit__(self, *exc: object) -> None:
        call, scheduler = self.call, self.scheduler
        grant = self.grant
        store = scheduler.admission.store
        local = store if isinstance(store, LocalStore) else None
        freed = False
        hold = call.hold
        try:
            if hold is not None:  # the relayed attempt's upstream hold: its response is done with now
                call.hold = None
                if local is not None and isinstance(hold, UpstreamHold):
                    freed = hold.finish_now(call.status, call.usage, kick=False)  # kicked once below
                else:
                    await hold.finish(call.status, call.usage)
            reservation = grant.reservation if grant is not None else None
            if reservation is not None:
                assert grant is not None
                grant.reservation = None
                if local is not None:
                    freed = scheduler.admission.settle_now(call, reservation, local) or freed
                else:
                    freed = await scheduler.admission.settle(call, reservation) or freed
        finally:
            prehold = call.prehold
            if prehold is not None:  # dispatch never used it: the attempt went elsewhere, or never went
                call.prehold = None
                await prehold[1].finish(0, None, sent=False)
            if grant is not None and grant.slot and self.gate is not None:
                self.gate.release(grant, kick=not freed)
            if freed:
                scheduler.kick()  # own limits and upstream capacity are shared with other queues


def _status(gate: Gate, ticket: Ticket) -> str:
    """The heartbeat comment of a waiting stream: its place and, when known, the estimated wait."""
    eta = gate.eta_of(ticket)
    text = f"queued position={gate.board.position(ticket)}"
    if eta is not None and math.isfinite(eta):
        text += f" eta={math.ceil(eta)}s"
    return text


__all__ = ["Entry", "QueueShed"]
