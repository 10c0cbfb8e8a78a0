"""One resumable stream's events in this process: a byte-bounded ring of numbered, `id:`-stamped SSE blocks
that any number of readers follow from an id, whatever transport they write to (SSE today).

The producer appends; when the ring holds more than its budget the oldest events go (the newest always
stay), and a reader whose next event went is told so (`Dropped`) instead of getting a gap. Readers wait on
one shared future per ring, resolved by the next append or the end, so a live tail costs no polling.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from itertools import islice

from proxy.errors import Protocol

MAX_BATCH = 256
"""Most events one read returns (a reader that fell far behind catches up in bounded bites)."""


class Dropped(Exception):
    """The events a reader asked for are no longer buffered (the buffer was full)."""

    reason = "dropped"


class StoreDown(Dropped):
    """The shared store (Redis) failed while a reader read from it."""

    reason = "store"


class Unknown(Exception):
    """No stream by that id (never existed, expired, or another tenant's)."""


@dataclass(frozen=True, slots=True)
class Meta:
    """What a stream is: who may read it and how its errors are written."""

    id: str
    tenant: str
    protocol: Protocol
    """openai | anthropic: the client protocol its events (and a reader's errors) are in."""
    path: str
    route: str = ""
    ttl: float = 300.0


@dataclass(slots=True)
class Batch:
    """What one read returns: events numbered `first`, `first + 1`, ... (possibly none), and whether the
    stream has ended with them (nothing will follow)."""

    first: int
    events: list[bytes]
    ended: bool


@dataclass(slots=True)
class Ring:
    meta: Meta
    budget: int
    """Bytes of events kept (the route's `resumable.buffer`)."""
    ttl: float
    events: deque[bytes] = field(default_factory=deque)
    first: int = 0
    """The id of `events[0]` (or of the next event when empty)."""
    size: int = 0
    ended: bool = False
    readers: int = 0
    """Readers attached in this process now."""
    last_read: float = field(default_factory=time.monotonic)
    """When a reader last was attached (a reader counts as attached while it reads)."""
    response_id: str = ""
    _waiter: asyncio.Future[None] | None = None

    @property
    def next(self) -> int:
        return self.first + len(self.events)

    def append(self, event: bytes) -> int:
        """Add one stamped event; returns the bytes dropped from the front to stay within the budget."""
        self.events.append(event)
        self.size += len(event)
        dropped = self.trim(self.budget)
        self._wake()
        return dropped

    def trim(self, budget: int) -> int:
        """Drop the oldest events until at most `budget` bytes remain (the newest event always stays)."""
        dropped = 0
        events = self.events
        while self.size > budget and len(events) > 1:
            gone = len(events.popleft())
            self.size -= gone
            dropped += gone
            self.first += 1
        return dropped

    def end(self) -> None:
        self.ended = True
        self._wake()

    def release(self) -> int:
        """Forget every event (the stream expired); returns the bytes freed."""
        freed = self.size
        self.first += len(self.events)
        self.events.clear()
        self.size = 0
        self.ended = True
        self._wake()
        return freed

    def take(self, after: int) -> Batch | None:
        """The events after id `after` that are here now, None when there are none yet and more may come;
        raises Dropped when the next one is gone."""
        start = after + 1
        if start < self.first:
            raise Dropped(f"events after id {after} are no longer buffered")
        if start < self.next:
            offset = start - self.first
            return Batch(start, list(islice(self.events, offset, offset + MAX_BATCH)), False)
        if self.ended:
            return Batch(start, [], True)
        return None

    async def read(self, after: int, wait: float) -> Batch:
        """The events after `after`, waiting up to `wait` seconds for one (then an empty batch)."""
        found = self.take(after)
        if found is not None:
            return found
        if self._waiter is None:
            self._waiter = asyncio.get_running_loop().create_future()
        waiter = self._waiter
        try:
            async with asyncio.timeout(wait):
                await asyncio.shield(waiter)  # shared by every reader: one reader's timeout must not cancel it
        except TimeoutError:
            return Batch(after + 1, [], False)
        found = self.take(after)
        return found if found is not None else Batch(after + 1, [], False)

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def watched(self, now: float) -> bool:
        """Has a reader been attached within the last `ttl`?"""
        return self.readers > 0 or now - self.last_read < self.ttl
