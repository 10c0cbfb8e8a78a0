"""A limit's numbers (`LimitSpec`) and its rate windows: requests or tokens per second, minute, hour or
day, each its own sliding window (admission/window.py). Re-exported by plan.py, where limits live."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

RateDimension = Literal["requests", "tokens"]
RATE_UNITS: tuple[tuple[str, float], ...] = (("second", 1.0), ("minute", 60.0), ("hour", 3600.0), ("day", 86400.0))
"""The units a rate may be given in, shortest first, with their length in seconds."""
RATE_FIELDS: tuple[tuple[str, RateDimension, str, float], ...] = tuple(
    (f"{dimension}_per_{unit}", dimension, unit, seconds)
    for dimension in ("requests", "tokens")
    for unit, seconds in RATE_UNITS
)
"""(field name, dimension, unit, seconds) of every rate a `LimitSpec` can set."""


@dataclass(frozen=True, slots=True)
class Rate:
    """One sliding window of a limit: `limit` requests or tokens per `unit`."""

    dimension: RateDimension
    unit: str
    seconds: float
    limit: int

    @property
    def name(self) -> str:
        """`requests_per_minute`: the policy field, metric key suffix and admin API name."""
        return f"{self.dimension}_per_{self.unit}"


@dataclass(frozen=True, slots=True)
class LimitSpec:
    """A limit's numbers. Every rate set is its own sliding window and all of them must admit (vendors
    publish several at once, e.g. requests per minute and per day). The first three fields keep their
    place so positional construction stays valid."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    concurrent: int | None = None
    requests_per_second: int | None = None
    requests_per_hour: int | None = None
    requests_per_day: int | None = None
    tokens_per_second: int | None = None
    tokens_per_hour: int | None = None
    tokens_per_day: int | None = None

    def rates(self) -> tuple[Rate, ...]:
        """The windows this spec sets: requests first, then tokens, each shortest unit first."""
        return tuple(
            Rate(dimension, unit, seconds, value)
            for name, dimension, unit, seconds in RATE_FIELDS
            if (value := getattr(self, name)) is not None
        )

    @property
    def counts_tokens(self) -> bool:
        """Some window counts tokens: estimate, reserve and settle them."""
        return (self.tokens_per_minute is not None or self.tokens_per_second is not None
                or self.tokens_per_hour is not None or self.tokens_per_day is not None)  # per request: no generator
