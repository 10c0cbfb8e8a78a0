"""tasks.Deadline: the request path's total-time guard. It cancels only the task it guards, tells its own
cancellation from a client disconnect, and never fires once cancelled."""

from __future__ import annotations

import asyncio

import pytest

from proxy.tasks import Deadline


async def test_expiry_is_reported_as_ours() -> None:
    guard = Deadline(0.05)
    with pytest.raises(asyncio.CancelledError):
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            assert guard.expired()
            raise
        finally:
            guard.cancel()
    current = asyncio.current_task()
    assert current is not None and current.cancelling() == 0  # our request was taken back


async def test_a_foreign_cancel_is_not_an_expiry() -> None:
    outcome: list[bool] = []

    async def guarded() -> None:
        guard = Deadline(5.0)
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            outcome.append(guard.expired())
            raise
        finally:
            guard.cancel()

    task = asyncio.get_running_loop().create_task(guarded())  # noqa: TID251 (test-local task)
    await asyncio.sleep(0.01)
    task.cancel()  # what aiohttp does when the client disconnects
    with pytest.raises(asyncio.CancelledError):
        await task
    assert outcome == [False]


async def test_cancelled_guard_never_fires() -> None:
    guard = Deadline(0.02)
    guard.cancel()
    await asyncio.sleep(0.06)  # would raise CancelledError if the timer had fired
    assert not guard.expired()
