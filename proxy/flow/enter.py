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

from proxy.admission import tokens as tok
from proxy.admission.local import LocalStore
from proxy.admission.store import LimiterStore
from proxy.call import Call, WaitingRoom
from proxy.errors import QueueFull, QueueShed
from proxy.flow import shed
from proxy.flow.admit import rejection
from proxy.flow.board import GRANTED, Ticket
from proxy.flow.entry_plan import EntryPlan
from proxy.flow.gate import Gate
from proxy.flow.take import OPEN, Blocked, Grant, Need, acquire, acquire_now, give_back
from proxy.flow.upstream import UpstreamHold
from proxy.policy.plan import Limit


class Entry:
    """One request's way in and out; what its route, tenant and kind of entry ask is its `plan`."""

    __slots__ = ("call", "plan", "cls", "waiting", "grant")

    def __init__(self, call: Call, plan: EntryPlan, cls: int, waiting: WaitingRoom | None) -> None:
        self.call = call
        self.plan = plan
        self.cls = cls
        self.waiting = waiting
        self.grant: Grant | None = None

    async def __aenter__(self) -> None:
        call, plan = self.call, self.plan
        cost = 0
        if plan.estimates:  # a token limit applies (own or upstream)
            cost = call.token_estimate = tok.estimate(call, plan.default_max_tokens)
            call.want_usage = True  # each attempt decides whether to ask a stream for it (outgoing.send)
            if not plan.tokens:
                cost = 0  # only an upstream limit counts them
        store = plan.admission.store
        if plan.at_once:  # over a limit the route answers 429 at once
            await self._own_at_once(plan.at_once, cost, store)
        if not plan.queues:
            return  # nothing to wait for in a queue (upstream limits: dispatch takes them per attempt)
        spec = plan.spec
        assert spec is not None
        try:
            gate = plan.gate
            if gate is None or gate.spec is not spec:  # first use, or a reload re-configured the queue since
                gate = plan.gate = plan.scheduler.gate(spec, call)  # the same object every time (by name)
            need = Need(plan.slot, plan.own, cost, plan.upstreams, call.token_estimate, plan.headroom[self.cls])
            # Nobody waiting and everything free: taken here and now, without suspending (in-memory store).
            if isinstance(store, LocalStore):
                outcome = gate.try_now_local(need, store)
            else:
                outcome = await gate.try_now(need)
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
            if await self.plan.admission.settle(self.call, reservation):
                self.plan.scheduler.kick()

    def _admitted(self, outcome: Blocked | None) -> bool:
        """Not granted at arrival: it may wait (True); a request bigger than a limit is refused."""
        if isinstance(outcome, Blocked) and outcome.refusal.retry_after is None:  # bigger than the limit
            raise rejection(self.plan.admission, outcome.refusal, self.call, False)
        return True

    async def _own_at_once(self, own: tuple[Limit, ...], cost: int, store: LimiterStore) -> None:
        """A route that rejects over its limits: take them now, or the 429."""
        need = Need(False, own, cost, headroom=self.plan.headroom[self.cls])
        local = store if isinstance(store, LocalStore) else None
        taken = acquire_now(local, need, OPEN) if local is not None else await acquire(store, need, {})
        if not isinstance(taken, Grant):
            raise rejection(self.plan.admission, taken.refusal, self.call, False)
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
            totals = self.plan.totals
            assert totals is not None  # tokens reserved in own limits, whose tenant's totals the plan holds
            totals[0] += reservation.tokens
        upstream = taken.upstream
        if upstream is not None and taken.upstream_limit is not None:
            self.call.prehold = (taken.upstream_limit.key, UpstreamHold(store, upstream, self.plan.kick))
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
        self._adopt(taken, self.plan.admission.store)
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
            await give_back(self.plan.admission.store, taken)
            self.plan.scheduler.kick()
            return
        if gate.board.remove(ticket):
            gate.left += 1  # the client left: a cancellation, counted by its outcome, not as a rejection
        gate.waited(gate.clock() - ticket.enqueued)

    async def __aexit__(self, *exc: object) -> None:
        call, plan, grant = self.call, self.plan, self.grant
        store = plan.admission.store
        freed = False
        hold = call.hold
        try:
            if hold is not None:  # the relayed attempt's upstream hold: its response is done with now
                call.hold = None
                if isinstance(hold, UpstreamHold) and isinstance(store, LocalStore):
                    freed = hold.finish_now(call.status, call.usage, kick=False)  # kicked once below
                else:
                    await hold.finish(call.status, call.usage)
            if grant is not None and grant.reservation is not None:
                reservation, grant.reservation = grant.reservation, None
                if isinstance(store, LocalStore):
                    freed = plan.admission.settle_now(call, reservation, store, plan.totals) or freed
                else:
                    freed = await plan.admission.settle(call, reservation) or freed
        finally:
            if call.prehold is not None:
                await self._unused_prehold()
            if grant is not None and grant.slot and plan.gate is not None:  # the gate that gave the slot
                plan.gate.release(grant, kick=not freed)
            if freed:
                plan.kick()  # own limits and upstream capacity are shared with other queues

    async def _unused_prehold(self) -> None:
        """Dispatch never used the upstream capacity the queue secured: the attempt went elsewhere, or never
        went. It is given back."""
        prehold = self.call.prehold
        if prehold is not None:
            self.call.prehold = None
            await prehold[1].finish(0, None, sent=False)


def _status(gate: Gate, ticket: Ticket) -> str:
    """The heartbeat comment of a waiting stream: its place and, when known, the estimated wait."""
    eta = gate.eta_of(ticket)
    text = f"queued position={gate.board.position(ticket)}"
    if eta is not None and math.isfinite(eta):
        text += f" eta={math.ceil(eta)}s"
    return text


__all__ = ["Entry", "QueueShed"]
