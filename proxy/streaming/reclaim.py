"""Gives the memory of a burst of ended streams back to the operating system.

Why by hand: CPython frees a closed stream's objects into glibc's heap, which keeps them (the top of the
heap is returned only when it is free, and arenas fragment), so a process that once held 1,000 stalled
streams stayed ~90 MiB above its baseline after they were gone. `malloc_trim(0)` (glibc, through ctypes;
a no-op elsewhere) hands the free pages back. It walks the heap (a few ms), so it runs only after
TRIM_AFTER streams have ended since the last trim, once the loop has been calm for TRIM_DELAY, and at
most every TRIM_INTERVAL.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
import time
from collections.abc import Callable

TRIM_AFTER = 256
"""Streams ended since the last trim that make one worth it."""
TRIM_DELAY = 2.0
"""Seconds after the last of them ended (a burst usually ends together)."""
TRIM_INTERVAL = 10.0
"""Least seconds between two trims."""

log = logging.getLogger("signalbox.memory")


def _glibc_trim() -> Callable[[], object] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)


def due(ended: int, idle_for: float, since_last: float) -> bool:
    """Trim now? `ended`: streams ended since the last trim; `idle_for`: seconds since the newest ended."""
    return ended >= TRIM_AFTER and idle_for >= TRIM_DELAY and since_last >= TRIM_INTERVAL


class Reclaimer:
    """Counts ended streams; after a burst, collects garbage and trims the heap."""

    __slots__ = ("ended", "last_end", "last_trim", "_trim", "_clock", "_timer")

    def __init__(
        self, trim: Callable[[], object] | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._trim = trim if trim is not None else _glibc_trim()
        self._clock = clock
        self.ended = 0
        self.last_end = 0.0
        self.last_trim = -TRIM_INTERVAL
        self._timer: asyncio.TimerHandle | None = None

    def stream_ended(self) -> None:
        self.ended += 1
        self.last_end = self._clock()
        if self.ended >= TRIM_AFTER and self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(TRIM_DELAY, self._check)

    def _check(self) -> None:
        self._timer = None
        now = self._clock()
        if due(self.ended, now - self.last_end, now - self.last_trim):
            self.run(now)
            return
        wait = max(self.last_end + TRIM_DELAY, self.last_trim + TRIM_INTERVAL) - now
        self._timer = asyncio.get_running_loop().call_later(max(wait, 0.1), self._check)

    def run(self, now: float) -> None:
        self.ended = 0
        self.last_trim = now
        gc.collect()  # the streams' cycles (tasks, frames, futures) first, so their memory is free to return
        if self._trim is not None:
            self._trim()
        log.debug("memory trimmed after a burst of ended streams")


RECLAIMER = Reclaimer()
"""The process's one reclaimer (the heap is per process)."""
