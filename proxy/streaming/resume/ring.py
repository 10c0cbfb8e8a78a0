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
    cursors: dict[int, int] = field(default_factory=dict)
    """Readers attached in this process now: the id of the next event each needs."""
    last_read: float = field(default_factory=time.monotonic)
    """When a reader last was attached (a reader counts as attached while it reads)."""
    response_id: str = ""
    _waiter: asyncio.Future[None] | None = None
    _room: asyncio.Future[None] | None = None
    _tokens: int = 0

    @property
    def readers(self) -> int:
        return len(self.cursors)

    def attach(self, after: int) -> int:
        """A reader starts after id `after`; returns its token."""
        self._tokens += 1
        self.cursors[self._tokens] = after + 1
        return self._tokens

    def advance(self, token: int, after: int) -> None:
        """The reader has written everything up to id `after` to its client."""
        self.cursors[token] = after + 1
        self._free()

    def leave(self, token: int, now: float) -> None:
        self.cursors.pop(token, None)
        self.last_read = now
        self._free()

    def blocked(self, size: int) -> bool:
        """Would adding `size` bytes drop an event an attached reader has not written yet? While a client is
        attached, its stream is relayed as a plain one is (it waits for the client); only a stream nobody
        reads drops its oldest events."""
        if self.size + size <= self.budget or not self.cursors or not self.events:
            return False
        return min(self.cursors.values()) <= self.first

    async def room(self, size: int) -> None:
        """Wait until `size` more bytes fit without dropping an event an attached reader still needs."""
        while self.blocked(size):
            if self._room is None:
                self._room = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._room)

    def _free(self) -> None:
        room, self._room = self._room, None
        if room is not None and not room.done():
            room.set_result(None)

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
        self._free()
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
