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


class Deadline:
    """Cancel the current task after `delay` seconds: asyncio.timeout's job for the request path, at a
    fraction of its cost (one timer handle; asyncio.timeout in 3.11 is a Python state machine that cost
    ~10 µs per request here, measured with py-spy). Use `expired()` in `except CancelledError` to tell
    our own cancellation from a client that went away, and `cancel()` in `finally`."""

    __slots__ = ("_task", "_handle", "_fired")

    def __init__(self, delay: float) -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)
        assert task is not None, "Deadline needs a running task"
        self._task = task
        self._fired = False
        self._handle: asyncio.TimerHandle | None = loop.call_later(delay, self._expire)

    def _expire(self) -> None:
        self._handle = None
        self._fired = True
        self._task.cancel()

    def cancel(self) -> None:
        """The guarded work ended (or moved under other limits): the timer must not fire."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def expired(self) -> bool:
        """True when the CancelledError being handled is ours alone (and takes our cancel request back);
        False when someone else (a client disconnect) cancelled the task too or instead."""
        if not self._fired:
            return False
        self._fired = False
        return self._task.uncancel() == 0
