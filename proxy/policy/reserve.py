"""Queue reserves (`queues.NAME.reserve: {host: 20%, planner: 10%}`): checked against the priority classes
at load, compiled into the headroom each class must leave free in every limit (`QueueSpec.headroom`).

Pure; the loader passes its `add(loc, message)` so every problem carries the file:line of the entry.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from proxy.policy.schema import Policy

Loc = tuple[str | int, ...]


def check(policy: Policy, add: Callable[[Loc, str], None]) -> None:
    """Every reserve names a class of `priorities` that has a class below it (a reserve is what the classes
    below leave free; the lowest class has nobody below to leave it)."""
    classes = policy.priorities
    for name, queue in policy.queues.items():
        for cls in queue.reserve:
            loc: Loc = ("queues", name, "reserve", cls)
            if cls not in classes:
                add(loc, f"unknown priority class '{cls}' (priorities: {', '.join(classes)})")
            elif cls == classes[-1]:
                add(loc, f"'{cls}' is the lowest priority class: no class below it would leave its reserve "
                         "free; reserve for the classes above the ones that must yield")


def headroom(reserve: dict[str, float], classes: Sequence[str]) -> tuple[float, ...]:
    """By class index (0 the highest): the share of each limit a request of that class must leave free,
    the sum of the reserves of the classes strictly above it. () when nothing is reserved."""
    if not any(reserve.values()):
        return ()
    out: list[float] = []
    above = 0.0
    for cls in classes:
        out.append(above / 100)
        above += reserve.get(cls, 0.0)
    return tuple(out)
