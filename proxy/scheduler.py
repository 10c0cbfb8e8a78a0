"""The ticket board: slots per named queue, and the order in which waiting requests get them.

Order: strict priority classes first; inside a class, deficit round robin across tenants by weight
(a tenant with 1,000 waiting requests gets its share, not the whole queue); optionally, a request
moves up one class per `ageing` waited so lower classes cannot starve. Bounded: `max_waiting`
requests (then QueueFull at once) and `max_wait` from arrival (then QueueTimeout). A waiter whose
client left is removed at once. The order itself is pure code in `proxy.fair_queue`; `Queue` adds slots and futures.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from proxy.admission.admit import NOTHING, Waiting
from proxy.call import Call
from proxy.errors import InvalidRequest, ProxyError, QueueCleared, QueueFull, QueueTimeout
from proxy.fair_queue import GONE, GRANTED, WAITING, FairQueue, Ticket
from proxy.policy.plan import Plan, QueueSpec, TenantRule
from proxy.telemetry.metrics import Metrics

PRIORITY_HEADER = "x-signalbox-priority"
_RECENT_WAITS = 1024


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


class Queue:
    """A named queue: its slots, its board, operator state and counters."""

    __slots__ = ("spec", "classes", "board", "active", "paused", "admitted", "rejected", "waits", "clock",
                 "metrics")

    def __init__(self, spec: QueueSpec, classes: tuple[str, ...], metrics: Metrics | None,
                 clock: Callable[[], float]) -> None:
        self.spec = spec
        self.classes = classes
        self.board = FairQueue(len(classes), spec.ageing)
        self.active = 0
        self.paused = False
        self.admitted = 0
        self.rejected: dict[str, int] = {}
        self.waits: deque[float] = deque(maxlen=_RECENT_WAITS)
        self.metrics = metrics
        self.clock = clock

    @property
    def slots(self) -> float:
        return self.spec.concurrency if self.spec.concurrency is not None else math.inf

    def configure(self, spec: QueueSpec, classes: tuple[str, ...]) -> None:
        """A reload: new numbers, same waiters (re-filed if the classes changed) and counters."""
        self.spec = spec
        if classes != self.classes:
            waiting = self.board.clear()
            self.board = FairQueue(len(classes), spec.ageing)
            now = self.clock()
            for ticket in waiting:
                ticket.state = WAITING
                self.board.push(ticket, now)
            self.classes = classes
        self.board.ageing = spec.ageing
        self.grant()

    def grant(self) -> None:
        """Hand free slots to the next waiters, in order."""
        if self.paused:
            return
        board = self.board
        while self.active < self.slots and board.live:
            ticket = board.pop(self.clock())
            assert ticket is not None and ticket.future is not None
            if ticket.timer is not None:
                ticket.timer.cancel()
            if ticket.future.done():  # its task was cancelled and has not cleaned up yet
                ticket.state = GONE
                self.reject("client_gone")
                continue
            ticket.state = GRANTED
            self.active += 1
            ticket.future.set_result(None)

    def release(self) -> None:
        self.active -= 1
        self.grant()

    def expire(self, ticket: Ticket) -> None:
        if not self.board.remove(ticket):
            return
        self.reject("queue_timeout")
        assert ticket.future is not None
        if not ticket.future.done():
            waited = self.clock() - ticket.enqueued
            ticket.future.set_exception(QueueTimeout(
                f"waited {waited:.1f}s in queue '{self.spec.name}' without getting a slot "
                f"({self.active} of {self.spec.concurrency} busy, {self.board.live} waiting); try again later"
            ))

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
        self.grant()

    def reject(self, reason: str, count: int = 1) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + count
        if self.metrics is not None:
            for _ in range(count):
                self.metrics.reject(reason)

    def admit(self, waited: float | None) -> None:
        """Count an admission; `waited` is None when a slot was free (no histogram sample: cheap)."""
        self.admitted += 1
        if waited is None:
            self.waits.append(0.0)
        else:
            self.waited(waited)

    def waited(self, seconds: float) -> None:
        """A wait for a slot ended, granted or not: a queue whose waiters all time out is not idle."""
        self.waits.append(seconds)
        if self.metrics is not None:
            self.metrics.queue_waited(self.spec.name, seconds)


class Scheduler:
    """Every queue by name; a reload re-configures a queue instead of resetting it."""

    __slots__ = ("queues", "metrics", "clock", "reloads")

    def __init__(self, metrics: Metrics | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.queues: dict[str, Queue] = {}
        self.metrics = metrics
        self.clock = clock
        self.reloads = False
        """Set once `reconfigure` was called: from then on only reloads change a queue's numbers, so a
        request still holding the previous plan cannot flip a queue back to old settings."""

    def queue(self, spec: QueueSpec, classes: tuple[str, ...], *, newest: bool = True) -> Queue:
        queue = self.queues.get(spec.name)
        if queue is None:
            queue = self.queues[spec.name] = Queue(spec, classes, self.metrics, self.clock)
        elif queue.spec is not spec and newest:
            queue.configure(spec, classes)
        return queue

    def shut(self, error: ProxyError) -> int:
        """Shutdown, past the drain timeout: no queue grants a slot again, and every waiter fails with
        `error` (a waiting stream gets it as its error event). Returns how many were waiting."""
        failed = 0
        for queue in self.queues.values():
            queue.pause()
            failed += queue.fail_waiters(error, "shutdown")
        return failed

    def reconfigure(self, plan: Plan) -> None:
        """After a reload: new numbers for known queues now (a bigger queue grants its waiters at once)."""
        self.reloads = True
        for spec in plan.queues.values():
            if spec.name in self.queues:
                self.queue(spec, plan.priorities)

    def slot(self, call: Call, asked: str | None = None, waiting: Waiting | None = None
             ) -> AbstractAsyncContextManager[None]:
        """A slot of the route's queue for the whole upstream exchange; NOTHING when there is none."""
        assert call.route is not None and call.tenant is not None
        spec = call.route.queue
        if spec is None or spec.concurrency is None:
            return NOTHING
        queue = self.queue(spec, call.plan.priorities, newest=not self.reloads)
        return _Slot(queue, call, priority_of(call.plan, call.tenant, asked), waiting)

    async def refresh_metrics(self) -> None:
        metrics = self.metrics
        if metrics is None:
            return
        metrics.queue_length.clear()  # a reload may have renamed the classes: no stale series
        for name, queue in self.queues.items():
            by_class = [0] * len(queue.classes)
            for (cls, _tenant), count in queue.board.counts().items():
                by_class[cls] += count
            for cls, count in enumerate(by_class):
                metrics.queue_length.labels(name, queue.classes[cls]).set(count)
            metrics.active_requests.labels(name).set(queue.active)
            metrics.queue_slots.labels(name).set(queue.spec.concurrency or 0)


class _Slot:
    __slots__ = ("queue", "call", "cls", "waiting", "held")

    def __init__(self, queue: Queue, call: Call, cls: int, waiting: Waiting | None) -> None:
        self.queue = queue
        self.call = call
        self.cls = cls
        self.waiting = waiting
        self.held = False

    async def __aenter__(self) -> None:
        queue, call = self.queue, self.call
        if not queue.paused and not queue.board.live and queue.active < queue.slots:
            queue.active += 1
            self.held = True
            queue.admit(None)
            return
        spec = queue.spec
        if queue.board.live >= spec.max_waiting:
            queue.reject("queue_full")
            raise QueueFull(
                f"queue '{spec.name}' is full ({queue.board.live} requests waiting, max_waiting "
                f"{spec.max_waiting}); retrying now would not help",
                should_retry=False,
            )
        assert call.tenant is not None
        now = queue.clock()
        ticket = Ticket(call.tenant.name, self.cls, weight=call.tenant.weight, request_id=call.request_id,
                        model=call.model, stream=call.stream, now=now)
        loop = asyncio.get_running_loop()
        ticket.future = loop.create_future()
        queue.board.push(ticket, now)
        ticket.timer = loop.call_later(max(0.0, spec.max_wait - call.elapsed()), queue.expire, ticket)
        begun = False
        try:
            if self.waiting is not None:
                begun = True
                await self.waiting.begin(lambda: f"queued position={queue.board.position(ticket)}")
            await ticket.future
        except BaseException:
            if ticket.timer is not None:
                ticket.timer.cancel()
            if ticket.state == GRANTED:
                queue.release()  # granted just as we were cancelled: pass the slot on
            else:
                if queue.board.remove(ticket):
                    queue.reject("client_gone")
                queue.waited(queue.clock() - ticket.enqueued)  # timed out, cleared, or the client left
            raise
        finally:
            if begun and self.waiting is not None:
                self.waiting.end()
        self.held = True
        queue.admit(queue.clock() - ticket.enqueued)
        call.mark("slot")

    async def __aexit__(self, *exc: object) -> None:
        if self.held:
            self.held = False
            self.queue.release()
