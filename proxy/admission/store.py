"""The limiter store interface: where limit counters live (in memory now, Redis for replicas next).

Every method is async so a networked store fits, and a `Reservation` is plain data (keys, window
index, amounts) so a store in another process can settle or release it: nothing here assumes the
counters live in this process.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from proxy.admission.limits import Refusal, Usage
from proxy.policy.plan import Limit

if TYPE_CHECKING:
    from proxy.admission.counters import Counters


@dataclass(slots=True)
class Reservation:
    """What one admitted request holds: settle it once with real amounts, release it once."""

    limits: tuple[Limit, ...]
    """The limits it was counted in (their `key`s name the counters)."""
    window: int
    """The minute window index the request was counted in."""
    requests: int
    tokens: int
    concurrent: bool
    """It holds a concurrency count in the limits that have `concurrent`."""
    settled: bool = False
    released: bool = False
    at: float = 0.0
    """When it was counted (the store's clock): a refund goes back to the windows, of every unit, that
    this instant fell in."""
    counters: Counters | None = None
    """The in-memory store's compiled counters it was counted in (settled there while still current)."""


class LimiterStore(Protocol):
    async def try_acquire(
        self, limits: Sequence[Limit], tokens: int, *, headroom: float = 0.0
    ) -> Reservation | Refusal:
        """All of `limits` admit one request of `tokens` tokens, and it is counted in each;
        or none counts it and the refusal with the longest wait is returned. Atomic.

        `headroom` (0 to <1) is the share of every window's limit (requests and tokens at every unit,
        and of `concurrent`) that must still be free once this request is counted: capacity kept for
        higher priority classes, across replicas when the store is shared. A request that would eat
        into it is refused like any other, with `retry_after` = when it would fit above it."""
        ...

    async def release(self, reservation: Reservation) -> None:
        """Give back the concurrency the reservation holds. Idempotent."""
        ...

    async def settle(self, reservation: Reservation, *, requests: int, tokens: int) -> None:
        """Replace the reserved amounts with the real ones (refund or charge the difference). Once;
        called for every reservation that holds tokens, even when the amounts are unchanged."""
        ...

    async def finish(self, reservation: Reservation, *, requests: int, tokens: int) -> None:
        """`settle` then `release`, in one call (one round trip for a networked store): what a request
        does once it is done."""
        ...

    async def remaining(self, keys: Iterable[str] | None = None) -> list[Usage]:
        """Snapshots of the given keys (all known keys when None)."""
        ...
