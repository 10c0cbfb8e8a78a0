"""A named queue as one gate: every capacity a waiting request needs is handed out here, in one order.

A ticket waits on the board (`proxy.flow.board`: class, then tenant by weighted deficit round robin,
then arrival) and leaves only when everything it needs is free at once: a slot of this queue, every
limit of its own (tenant, route, route per tenant: requests, tokens and concurrency), and, for a route
with upstream limits, one deployment's upstream limit. A pass walks the board in order and gives the
capacity to the best ticket that can use it; a limit that refused a ticket is closed to every ticket after
it in the same pass (the capacity it is owed is not given to someone behind it), while a ticket refused by
a limit of its own blocks nobody else and keeps its place.

Passes run when capacity may have freed: a slot released, a reservation settled or released anywhere
(the scheduler kicks every gate with waiters), a reload, a resume, and, for rate windows, one timer per
gate at the soonest instant a refusing window admits again. No waiter polls. Taking the capacity from
the limiter store, all or nothing, is `proxy.flow.take`.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from proxy.admission.limits import Refusal
from proxy.admission.local import LocalStore
from proxy.admission.store import LimiterStore
from proxy.errors import ProxyError, QueueCleared, QueueTimeout
from proxy.flow import estimate
from proxy.flow.board import GONE, GRANTED, WAITING, FairQueue, Ticket
from proxy.flow.take import OPEN, Blocked, Grant, Need, acquire, acquire_now, give_back, give_back_now
from proxy.policy.plan import QueueSpec
from proxy.tasks import spawn
from proxy.telemetry.metrics import Metrics

if TYPE_CHECKING:
    from proxy.flow.scheduler import Scheduler

_RECENT_WAITS = 1024
RECHECK = 0.5
"""A remote store (Redis) frees capacity that other replicas release unseen: look again this often."""


class Gate:
    """A named queue: its slots, its board, operator state and counters."""

    __slots__ = ("spec", "classes", "board", "active", "paused", "admitted", "rejected", "left", "waits", "clock",
                 "metrics", "scheduler", "departures", "slots", "_timer", "_timer_at", "_running", "_again")

    def __init__(self, spec: QueueSpec, classes: tuple[str, ...], metrics: Metrics | None,
                 clock: Callable[[], float], scheduler: Scheduler | None = None) -> None:
        self.spec = spec
        self.slots = _slots(spec)
        """The queue's concurrency (inf: no slots), kept with `spec`."""
        self.classes = classes
        self.board = FairQueue(len(classes), spec.ageing)
        self.active = 0
        self.paused = False
        self.admitted = 0
        self.rejected: dict[str, int] = {}
        self.left = 0
        """Waiters whose client left: cancellations, not rejections (not in signalbox_rejections_total)."""
        self.waits: deque[float] = deque(maxlen=_RECENT_WAITS)
        self.metrics = metrics
        self.clock = clock
        self.scheduler = scheduler
        self.departures: deque[float] = deque(maxlen=estimate.SAMPLES)
        """When recent tickets left the queue (granted): the departure rate behind each estimate."""
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._running = False
        self._again = False

    def configure(self, spec: QueueSpec, classes: tuple[str, ...]) -> None:
        """A reload: new numbers, same waiters (re-filed if the classes changed) and counters."""
        self.spec = spec
        self.slots = _slots(spec)
        if classes != self.classes:
            waiting = self.board.clear()
            self.board = FairQueue(len(classes), spec.ageing)
            now = self.clock()
            for ticket in waiting:
                ticket.state = WAITING
                self.board.push(ticket, now)
            self.classes = classes
        self.board.ageing = spec.ageing
        self.kick()

    # --- the pass ---------------------------------------------------------------------------------

    def kick(self) -> None:
        """Capacity may have freed: run a pass soon (one at a time; a kick during a pass runs another)."""
        if not self.board.live or self.paused:
            return
        if self._running:
            self._again = True
            return
        self._running = True
        spawn(self._passes(), name=f"gate-{self.spec.name}")

    async def _passes(self) -> None:
        try:
            while True:
                self._again = False
                await self._pass()
                if not self._again:
                    return
        finally:
            self._running = False

    def _store(self) -> LimiterStore | None:
        return self.scheduler.store() if self.scheduler is not None else None

    async def _pass(self) -> None:
        closed: dict[str, Refusal] = {}
        soonest = math.inf
        store = self._store()
        while self.board.live and not self.paused:
            slot_free = self.active < self.slots
            if not slot_free:
                break  # every ticket waits for a slot first (a slot-less one: a batch caller, rarely here)

            def ok(ticket: Ticket, slot_free: bool = slot_free) -> bool:
                need: Need = ticket.need
                if need.slot and not slot_free:
                    ticket.blocked = None
                    return False
                for limit in need.limits:
                    if limit.key in closed:
                        ticket.blocked = closed[limit.key]
                        return False
                if need.upstreams and all(u.key in closed for u in need.upstreams):
                    ticket.blocked = closed[need.upstreams[0].key]
                    return False
                return True

            ticket = self.board.peek(self.clock(), ok)
            if ticket is None:
                break
            outcome = await acquire(store, ticket.need, closed)
            if isinstance(outcome, Blocked):
                ticket.blocked = outcome.refusal
                for key in outcome.keys:
                    closed[key] = outcome.refusal
                if outcome.refusal.retry_after is None:  # bigger than the limit: it never fits
                    self._fail_one(ticket, outcome.refusal)
                    continue
                if outcome.refusal.exact or not isinstance(store, LocalStore):
                    wait = outcome.refusal.retry_after
                    if not isinstance(store, LocalStore):
                        wait = min(wait, RECHECK)
                    soonest = min(soonest, self.clock() + wait)
                continue
            if ticket.state != WAITING or ticket.future is None or ticket.future.done():
                await give_back(store, outcome)  # it left while its capacity was being secured
                if self.board.remove(ticket):  # its task was cancelled and has not cleaned up yet
                    self.left += 1
                continue
            self.board.take(ticket)
            self._grant(ticket, outcome)
        if self.board.live and soonest < math.inf:
            self._wake_at(soonest)

    def _grant(self, ticket: Ticket, grant: Grant) -> None:
        if ticket.timer is not None:
            ticket.timer.cancel()
        now = self.clock()
        grant.slot = ticket.need.slot
        if grant.slot:
            self.active += 1
        grant.waited = now - ticket.enqueued
        self.departures.append(now)
        assert ticket.future is not None
        ticket.future.set_result(grant)

    def _fail_one(self, ticket: Ticket, refusal: Refusal) -> None:
        if ticket.timer is not None:
            ticket.timer.cancel()
        if self.board.remove(ticket) and ticket.future is not None and not ticket.future.done():
            assert self.scheduler is not None
            ticket.future.set_exception(self.scheduler.refusal_error(refusal, ticket, waited=False))

    def _wake_at(self, at: float) -> None:
        """One timer per gate: the soonest instant a refusing rate window admits again."""
        if self._timer is not None and self._timer_at <= at:
            return
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        self._timer_at = at
        self._timer = loop.call_at(loop.time() + max(0.0, at - self.clock()), self._woken)

    def _woken(self) -> None:
        self._timer, self._timer_at = None, math.inf
        self.kick()

    # --- entering and leaving ---------------------------------------------------------------------

    async def try_now(self, need: Need) -> Grant | Blocked | None:
        """The fast path: nobody waits and everything is free, so take it now. None: must queue behind
        others (or paused, or no slot); Blocked: a limit refused (the route may reject or queue)."""
        if self.paused or self.board.live or (need.slot and self.active >= self.slots):
            return None
        return self._took(need, await acquire(self._store(), need, {}))

    def try_now_local(self, need: Need, store: LocalStore) -> Grant | Blocked | None:
        """`try_now` over the in-memory store, synchronously: when nobody waits and everything is free,
        entering takes no await, no future, no task and no timer."""
        slot = need.slot
        if self.paused or self.board.live or (slot and self.active >= self.slots):
            return None
        outcome = acquire_now(store, need, OPEN)
        if isinstance(outcome, Grant):  # `_took`, inlined: every admitted request passes here
            outcome.slot = slot
            if slot:
                self.active += 1
            self.departures.append(self.clock())
        return outcome

    def _took(self, need: Need, outcome: Grant | Blocked) -> Grant | Blocked:
        if isinstance(outcome, Grant):
            outcome.slot = need.slot
            if need.slot:
                self.active += 1
            self.departures.append(self.clock())
        return outcome

    def release(self, grant: Grant, *, kick: bool = True) -> None:
        """A granted ticket is done with its slot (`kick=False`: the caller kicks every gate itself)."""
        if grant.slot:
            grant.slot = False
            self.active -= 1
            if kick:
                self.kick()

    def expire(self, ticket: Ticket) -> None:
        if not self.board.remove(ticket):
            return
        self.reject("queue_timeout")
        assert ticket.future is not None
        if not ticket.future.done():
            ticket.future.set_exception(self.timeout_error(ticket))

    def timeout_error(self, ticket: Ticket) -> QueueTimeout:
        """The queue's max_wait ran out: say what the ticket was still waiting for."""
        waited = self.clock() - ticket.enqueued
        spec = self.spec
        cause = self.cause(ticket)
        retry = ticket.blocked.retry_after if isinstance(ticket.blocked, Refusal) else None
        return QueueTimeout(
            f"waited {waited:.1f}s in queue '{spec.name}' (its max_wait is {spec.max_wait:g}s) without being "
            f"admitted: {cause}; try again later",
            retry_after=retry if retry is not None else self.eta_of(ticket),
        )

    def cause(self, ticket: Ticket) -> str:
        blocked = ticket.blocked
        if isinstance(blocked, Refusal):
            assert self.scheduler is not None
            return "still waiting for " + self.scheduler.describe(blocked)
        if ticket.need is not None and ticket.need.slot and self.active >= self.slots:
            return f"all {self.spec.concurrency} slots were busy ({self.board.live} waiting)"
        return f"{max(0, self.board.position(ticket) - 1)} requests were ahead of it"

    def eta_of(self, ticket: Ticket) -> float | None:
        """Seconds this ticket may still wait: its place over the recent departure rate, or over the refill
        rate of the limit that binds it."""
        rate = estimate.departure_rate(self.departures, self.clock())
        refill = estimate.refill_rate(ticket.blocked) if isinstance(ticket.blocked, Refusal) else None
        return estimate.eta(self.board.position(ticket), rate, refill)

    def eta_at_back(self, cls: int) -> float | None:
        """The estimated wait of a request of class `cls` arriving now (behind everyone of its class or above)."""
        ahead = sum(self.board.classes[c].live for c in range(min(cls + 1, len(self.board.classes))))
        return estimate.eta(ahead + 1, estimate.departure_rate(self.departures, self.clock()), None)

    def clear(self) -> int:
        """Fail every waiting request with QueueCleared (503, x-should-retry: false); returns how many."""
        return self.fail_waiters(QueueCleared(
            f"queue '{self.spec.name}' was cleared by an operator; the request was not sent upstream",
            should_retry=False,
        ), "queue_cleared")

    def fail_waiters(self, error: ProxyError, reason: str) -> int:
        """Fail every waiting request with `error` (counted as `reason`); returns how many."""
        tickets = self.board.clear()
        for ticket in tickets:
            if ticket.timer is not None:
                ticket.timer.cancel()
            if ticket.future is not None and not ticket.future.done():
                ticket.future.set_exception(error)
        if tickets:
            self.reject(reason, len(tickets))
        return len(tickets)

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        self.kick()

    def reject(self, reason: str, count: int = 1) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + count
        if self.metrics is not None:
            for _ in range(count):
                self.metrics.reject(reason)

    def admit(self, waited: float | None) -> None:
        """Count an admission; `waited` is None when nothing had to wait (no histogram sample: cheap)."""
        self.admitted += 1
        if waited is None:
            self.waits.append(0.0)
        else:
            self.waited(waited)

    def waited(self, seconds: float) -> None:
        """A wait ended, granted or not: a queue whose waiters all time out is not idle."""
        self.waits.append(seconds)
        if self.metrics is not None:
            self.metrics.queue_waited(self.spec.name, seconds)


def _slots(spec: QueueSpec) -> float:
    return spec.concurrency if spec.concurrency is not None else math.inf


Queue = Gate
"""The admin API's name for it."""


__all__ = ["GONE", "GRANTED", "OPEN", "WAITING", "Blocked", "Gate", "Grant", "Need", "Queue", "Ticket", "acquire",
           "acquire_now", "give_back", "give_back_now"]
