"""Single flight, per process: while one request fetches an answer, identical requests wait for it
instead of each going upstream. The leader stores the answer before it lets the others look again."""

from __future__ import annotations

import asyncio
import contextlib


class Flights:
    __slots__ = ("_open",)

    def __init__(self) -> None:
        self._open: dict[str, asyncio.Future[None]] = {}

    def waiting(self, key: str) -> asyncio.Future[None] | None:
        """The fetch in flight for `key`, if any."""
        return self._open.get(key)

    def lead(self, key: str) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._open[key] = future
        return future

    def land(self, key: str, future: asyncio.Future[None]) -> None:
        """The leader is done (stored, not storable, failed or cancelled): the followers look again."""
        if self._open.get(key) is future:
            del self._open[key]
        if not future.done():
            future.set_result(None)

    def __len__(self) -> int:
        return len(self._open)


async def follow(future: asyncio.Future[None], limit: float) -> None:
    """Wait for a leader, at most `limit` seconds (then the follower goes its own way). Shielded: a
    follower whose client leaves does not cancel the leader's future."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(future), limit)
