"""tasks.Deadline: the request path's total-time guard. It cancels only the task it guards, tells its own
cancellation from a client disconnect, and never fires once cancelled."""

from __future__ import annotations

import asyncio

import pytest

from proxy.tasks import Deadline, Deadlines


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


# --- guards sharing timers (Deadlines) ------------------------------------------------------------------


async def test_a_shared_guard_expires_as_its_own_would() -> None:
    shared = Deadlines()
    guard = Deadline(0.05, shared)
    with pytest.raises(asyncio.CancelledError):
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            assert guard.expired()
            raise
        finally:
            guard.cancel()
    current = asyncio.current_task()
    assert current is not None and current.cancelling() == 0
    assert len(shared) == 0  # the slot went with its timer


async def test_guards_ending_in_one_slot_share_one_timer_which_goes_with_the_last() -> None:
    shared = Deadlines()
    guards = [Deadline(5.0, shared) for _ in range(50)]
    assert len(shared) <= 2  # 50 guards made within a slot's width of each other: one slot (two at a border)
    for guard in guards[:-1]:
        guard.cancel()
    assert len(shared) >= 1
    guards[-1].cancel()
    assert len(shared) == 0  # no timer left behind for finished requests
    await asyncio.sleep(0.02)
    assert not any(guard.expired() for guard in guards)


async def test_a_shared_guard_cancels_only_its_own_task_and_not_a_cancelled_neighbour() -> None:
    shared = Deadlines()
    outcome: dict[str, bool] = {}

    async def guarded(name: str, delay: float, cancel_early: bool) -> None:
        guard = Deadline(delay, shared)
        if cancel_early:
            guard.cancel()  # done before its deadline
            await asyncio.sleep(0.1)
            outcome[name] = False
            return
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            outcome[name] = guard.expired()
            raise
        finally:
            guard.cancel()

    loop = asyncio.get_running_loop()
    late = loop.create_task(guarded("late", 0.03, False))  # noqa: TID251 (test-local task)
    done = loop.create_task(guarded("done", 0.03, True))  # noqa: TID251 (test-local task)
    with pytest.raises(asyncio.CancelledError):
        await late
    await done  # its guard was in the same slot: it was not cancelled
    assert outcome == {"late": True, "done": False}
