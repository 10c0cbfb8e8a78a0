"""Live counters of one mock server, served at `GET /mock/stats`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from aiohttp import web

from proxy.mock.content import Json


def _no_faults() -> dict[str, int]:
    return {"status": 0, "stall": 0, "drop": 0}


@dataclass(slots=True)
class MockStats:
    """Counters for tests and the benchmark; lives on the app, one per server."""

    requests_total: int = 0
    by_path: dict[str, int] = field(default_factory=dict)
    in_flight: int = 0
    max_in_flight: int = 0
    disconnects: int = 0  # the client went away before the response was complete
    faults: dict[str, int] = field(default_factory=_no_faults)

    def begin(self, path: str) -> None:
        self.requests_total += 1
        self.by_path[path] = self.by_path.get(path, 0) + 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def reset(self) -> None:
        """Zero the counters; requests still running stay counted as in flight."""
        self.requests_total, self.by_path, self.disconnects = 0, {}, 0
        self.max_in_flight, self.faults = self.in_flight, _no_faults()

    def as_json(self) -> Json:
        return dataclasses.asdict(self)


MOCK_STATS = web.AppKey("mock_stats", MockStats)
