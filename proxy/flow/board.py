"""The ticket board's order, pure: strict priority classes first; inside a class, deficit round robin across
tenants by weight (a tenant with 1,000 waiting requests gets its share, not the whole queue); optionally a
ticket moves up one class per `ageing` waited so lower classes cannot starve. Time is passed in; no I/O,
no futures: `proxy.flow.gate.Gate` adds slots, limits and waiting around it.

Two ways out: `pop` (the next ticket, whatever it needs) and `peek` + `take` (the best ticket a predicate
accepts: a lane whose head is blocked by a limit of its own is passed over for this turn, keeps its place
and its deficit, and blocks nobody else).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncio

WAITING, GRANTED, GONE = 0, 1, 2


class Ticket:
    """One waiting request: what the order needs, plus what the admin API shows (never content)."""

    __slots__ = (
        "request_id", "tenant", "weight", "model", "stream", "cls", "seq", "enqueued", "moved", "state",
        "future", "timer", "need", "blocked",
    )

    def __init__(
        self, tenant: str, cls: int, *, weight: float = 1.0, request_id: str = "", model: str = "",
        stream: bool = False, now: float = 0.0,
    ) -> None:
        self.request_id = request_id
        self.tenant = tenant
        self.weight = weight
        self.model = model
        self.stream = stream
        self.cls = cls
        self.seq = 0
        self.enqueued = now
        self.moved = now
        self.state = WAITING
        self.future: asyncio.Future[Any] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.need: Any = None
        """What the gate must find free for this ticket (opaque here)."""
        self.blocked: Any = None
        """Why it was last passed over (the gate's business; shown when it times out)."""


class _Lane:
    """One tenant's waiting tickets inside one class. Removed tickets are dropped lazily."""

    __slots__ = ("tenant", "weight", "items", "live", "deficit", "next_seq")

    def __init__(self, tenant: str, weight: float) -> None:
        self.tenant = tenant
        self.weight = weight
        self.items: deque[Ticket] = deque()
        self.live = 0
        self.deficit = 0.0
        self.next_seq = 0


class _Class:
    __slots__ = ("lanes", "ring", "live", "arrivals")

    def __init__(self) -> None:
        self.lanes: dict[str, _Lane] = {}
        self.ring: deque[_Lane] = deque()
        self.live = 0
        self.arrivals: deque[Ticket] = deque()
        """Tickets in order of entering this class (only kept when ageing is on)."""


class FairQueue:
    """Pure ordering: push, pop the next, remove; time is passed in."""

    __slots__ = ("classes", "ageing", "live")

    def __init__(self, classes: int, ageing: float | None = None) -> None:
        self.classes = [_Class() for _ in range(classes)]
        self.ageing = ageing
        self.live = 0

    def __len__(self) -> int:
        return self.live

    def push(self, ticket: Ticket, now: float, front: bool = False) -> None:
        ticket.cls = min(max(ticket.cls, 0), len(self.classes) - 1)
        klass = self.classes[ticket.cls]
        lane = klass.lanes.get(ticket.tenant)
        if lane is None:
            lane = klass.lanes[ticket.tenant] = _Lane(ticket.tenant, ticket.weight)
            klass.ring.append(lane)
            if len(klass.ring) == 1:
                lane.deficit = lane.weight  # a lane gets its quantum whenever it becomes the head
        if front and lane.items:
            ticket.seq = lane.items[0].seq - 1
            lane.items.appendleft(ticket)
        else:
            ticket.seq = lane.next_seq
            lane.next_seq += 1
            lane.items.append(ticket)
        lane.live += 1
        klass.live += 1
        self.live += 1
        ticket.moved = now
        if self.ageing is not None and ticket.cls > 0:
            klass.arrivals.append(ticket)

    def pop(self, now: float) -> Ticket | None:
        if not self.live:
            return None
        if self.ageing is not None:
            self._age(now)
        for index, klass in enumerate(self.classes):
            if klass.live:
                return self._pop_from(klass, index)
        return None

    def _pop_from(self, klass: _Class, index: int) -> Ticket:
        ring = klass.ring
        while True:
            lane = ring[0]
            if lane.deficit >= 1.0:
                items = lane.items
                ticket = items.popleft()
                while ticket.state != WAITING or ticket.cls != index:
                    ticket = items.popleft()  # stale: removed or aged into another class
                lane.deficit -= 1.0
                ticket.state = GRANTED
                self._unlink(klass, lane)
                return ticket
            # The head's turn is over: it goes to the back, the next lane gets its quantum.
            ring.rotate(-1)
            ring[0].deficit += ring[0].weight

    def peek(self, now: float, ok: Callable[[Ticket], bool]) -> Ticket | None:
        """The ticket `pop` would return among those `ok` accepts, left in place (`take` it once its
        capacity is secured). Only a lane's head is asked: inside one tenant and class, arrival order is
        strict. A refused lane is rotated past like a lane whose turn is over, its deficit kept."""
        if not self.live:
            return None
        if self.ageing is not None:
            self._age(now)
        for index, klass in enumerate(self.classes):
            if klass.live:
                ticket = self._peek_in(klass, index, ok)
                if ticket is not None:
                    return ticket
        return None

    def _peek_in(self, klass: _Class, index: int, ok: Callable[[Ticket], bool]) -> Ticket | None:
        ring = klass.ring
        refused: set[int] = set()
        while len(refused) < len(ring):
            lane = ring[0]
            head = _head(lane, index)
            if id(lane) in refused or not ok(head):
                refused.add(id(lane))
            elif lane.deficit >= 1.0:
                return head
            ring.rotate(-1)
            head_lane = ring[0]
            # A lane passed over while blocked banks at most one quantum: no burst once it is unblocked.
            head_lane.deficit = min(head_lane.deficit + head_lane.weight, head_lane.weight + 1.0)
        return None

    def take(self, ticket: Ticket) -> None:
        """Take out a ticket `peek` returned (still waiting): it is served, its lane charged one turn."""
        klass = self.classes[ticket.cls]
        lane = klass.lanes[ticket.tenant]
        if lane.items and lane.items[0] is ticket:
            lane.items.popleft()
        else:
            lane.items.remove(ticket)
        lane.deficit = max(0.0, lane.deficit - 1.0)
        ticket.state = GRANTED
        self._unlink(klass, lane)

    def _unlink(self, klass: _Class, lane: _Lane) -> None:
        lane.live -= 1
        klass.live -= 1
        self.live -= 1
        if not lane.live:
            ring = klass.ring
            was_head = ring[0] is lane
            ring.remove(lane)
            del klass.lanes[lane.tenant]
            if was_head and ring:
                ring[0].deficit += ring[0].weight

    def last_of_lowest(self, below: int) -> Ticket | None:
        """The newest waiting ticket of the lowest class under class `below` (None if none): what
        class-aware shedding pushes out first."""
        for index in range(len(self.classes) - 1, below, -1):
            klass = self.classes[index]
            if not klass.live:
                continue
            newest: Ticket | None = None
            for lane in klass.ring:
                for ticket in reversed(lane.items):
                    if ticket.state == WAITING and ticket.cls == index:
                        if newest is None or ticket.enqueued > newest.enqueued:
                            newest = ticket
                        break
            if newest is not None:
                return newest
        return None

    def remove(self, ticket: Ticket) -> bool:
        """Take a waiting ticket out (client gone, timed out). False if it was not waiting."""
        if ticket.state != WAITING:
            return False
        ticket.state = GONE
        self._detach(ticket)
        return True

    def _detach(self, ticket: Ticket) -> None:
        klass = self.classes[ticket.cls]
        lane = klass.lanes[ticket.tenant]
        self._unlink(klass, lane)
        if lane.live and len(lane.items) > 2 * lane.live + 16:
            # Bound the garbage that lazy removal leaves behind.
            cls = ticket.cls
            kept = (t for t in lane.items if t.state == WAITING and t.cls == cls and t is not ticket)
            lane.items = deque(kept)

    def _age(self, now: float) -> None:
        assert self.ageing is not None
        for index in range(1, len(self.classes)):
            arrivals = self.classes[index].arrivals
            while arrivals:
                ticket = arrivals[0]
                if ticket.state != WAITING or ticket.cls != index:
                    arrivals.popleft()
                    continue
                levels = math.floor((now - ticket.moved) / self.ageing)
                if levels < 1:
                    break
                arrivals.popleft()
                self._detach(ticket)
                ticket.cls = max(0, index - levels)
                self.push(ticket, now, front=True)

    def clear(self) -> list[Ticket]:
        """Take every waiting ticket out; returns them."""
        out = list(self.tickets())
        for ticket in out:
            ticket.state = GONE
        self.classes = [_Class() for _ in self.classes]
        self.live = 0
        return out

    def tickets(self) -> Iterator[Ticket]:
        """Waiting tickets, class by class, lane by lane (not the exact service order)."""
        for index, klass in enumerate(self.classes):
            for lane in klass.ring:
                yield from (t for t in lane.items if t.state == WAITING and t.cls == index)

    def counts(self) -> dict[tuple[int, str], int]:
        return {(i, lane.tenant): lane.live for i, k in enumerate(self.classes) for lane in k.ring}

    def position(self, ticket: Ticket) -> int:
        """Approximate 1-based place in line: every higher class, then what the round robin serves
        from other tenants before this ticket's round (lanes ahead in the ring get one more round)."""
        if ticket.state != WAITING:
            return 0
        ahead = sum(k.live for k in self.classes[: ticket.cls])
        klass = self.classes[ticket.cls]
        lane = klass.lanes[ticket.tenant]
        rank = min(max(0, ticket.seq - lane.items[0].seq), lane.live - 1)
        rounds = math.floor(rank / lane.weight)
        before = True
        for other in klass.ring:
            if other is lane:
                before = False
                continue
            ahead += min(other.live, math.ceil((rounds + before) * other.weight))
        return ahead + rank + 1


def _head(lane: _Lane, index: int) -> Ticket:
    """A lane's first live ticket (dropping the stale ones before it)."""
    items = lane.items
    while items[0].state != WAITING or items[0].cls != index:
        items.popleft()
    return items[0]
