"""The only place background tasks are created: spawn() keeps a strong reference and names the task.

asyncio keeps only weak references to tasks, so a fire-and-forget task can be garbage collected
mid-flight; every long-lived task in Signalbox goes through here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class TaskSet:
    """Owns a set of tasks: holds references until they finish, cancels what is left on close."""

    __slots__ = ("_tasks",)

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, T], *, name: str) -> asyncio.Task[T]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def __len__(self) -> int:
        return len(self._tasks)

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


_detached = TaskSet()


def spawn(coro: Coroutine[Any, Any, T], *, name: str) -> asyncio.Task[T]:
    """Start a task that is referenced until it ends (for tasks owned by no component)."""
    return _detached.spawn(coro, name=name)


RESOLUTION = 0.01
"""The length of a `Deadlines` slot: a shared guard fires at most this late."""


class Deadline:
    """Cancel the current task after `delay` seconds: asyncio.timeout's job for the request path, at a
    fraction of its cost (asyncio.timeout in 3.11 is a Python state machine that cost ~10 µs per request
    here, measured with py-spy). With `shared`, the guard takes no timer of its own: it joins the shared
    slot it ends in (`Deadlines`). Use `expired()` in `except CancelledError` to tell our own cancellation
    from a client that went away, and `cancel()` in `finally`."""

    __slots__ = ("_task", "_handle", "_fired", "_shared", "_slot")

    def __init__(self, delay: float, shared: Deadlines | None = None) -> None:
        task = asyncio.current_task()  # (raises without a running loop, as get_running_loop does)
        assert task is not None, "Deadline needs a running task"
        self._task = task
        self._fired = False
        self._shared = shared
        self._handle: asyncio.TimerHandle | None
        if shared is None:
            self._handle = task.get_loop().call_later(delay, self._expire)
            self._slot = 0
        else:
            self._handle = None
            self._slot = shared.add(self, delay)

    def _expire(self) -> None:
        self._handle = self._shared = None
        self._fired = True
        self._task.cancel()

    def cancel(self) -> None:
        """The guarded work ended (or moved under other limits): the guard must not fire."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        shared = self._shared
        if shared is not None:
            self._shared = None
            shared.remove(self, self._slot)

    def expired(self) -> bool:
        """True when the CancelledError being handled is ours alone (and takes our cancel request back);
        False when someone else (a client disconnect) cancelled the task too or instead."""
        if not self._fired:
            return False
        self._fired = False
        return self._task.uncancel() == 0


class Deadlines:
    """Deadline guards that share timers: the guards ending in the same RESOLUTION slot have one timer,
    started with the slot's first guard and cancelled with its last. At a few thousand requests a second
    that is one timer per dozens of requests instead of a call_later and a cancel each (about 1 % of a
    request's CPU, counted with callgrind); a guard fires at most RESOLUTION late. One per app (Runtime)."""

    __slots__ = ("_slots", "_timers")

    def __init__(self) -> None:
        self._slots: dict[int, set[Deadline]] = {}
        """The guards of each slot (a slot's timer is in `_timers` under the same number)."""
        self._timers: dict[int, asyncio.TimerHandle] = {}

    def __len__(self) -> int:
        """Slots with a timer pending."""
        return len(self._slots)

    def add(self, guard: Deadline, delay: float) -> int:
        """`guard` fires at the end of the slot `delay` seconds from now falls in; returns that slot."""
        loop = asyncio.get_running_loop()
        slot = int((loop.time() + delay) / RESOLUTION) + 1
        members = self._slots.get(slot)
        if members is None:
            # call_later, not call_at: uvloop's call_at is call_later behind one more Python-level call.
            self._timers[slot] = loop.call_later(slot * RESOLUTION - loop.time(), self._fire, slot)
            self._slots[slot] = {guard}
        else:
            members.add(guard)
        return slot

    def remove(self, guard: Deadline, slot: int) -> None:
        members = self._slots.get(slot)
        if members is None:
            return
        members.discard(guard)
        if not members:
            del self._slots[slot]
            self._timers.pop(slot).cancel()

    def _fire(self, slot: int) -> None:
        self._timers.pop(slot, None)
        members = self._slots.pop(slot, None)
        if members is not None:
            for guard in members:
                guard._expire()
