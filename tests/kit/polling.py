"""One way to wait for state that lives in other tasks, processes or Redis: poll it, bounded."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import Any


async def until(check: Callable[[], Any | Awaitable[Any]], within: float = 5.0, step: float = 0.01) -> Any:
    """Poll `check` (plain or async) until it returns something truthy; return that value.

    `within` is a failure deadline, not a measurement: the test fails with the last value seen.
    """
    value: Any = None
    try:
        async with asyncio.timeout(within):
            while True:
                value = check()
                if inspect.isawaitable(value):
                    value = await value
                if value:
                    return value
                await asyncio.sleep(step)
    except TimeoutError:
        raise AssertionError(f"condition not met within {within:g}s (last value: {value!r})") from None
