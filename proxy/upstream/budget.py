"""Retry budget arithmetic (pure), after Envoy's `retry_budget` (PROTOCOLS.md §6).

Retries in flight to one upstream may be at most `percent` of the requests active on it, with a floor of
`floor` so that light traffic can still retry. The state (active and retrying counts per upstream) lives
in the registry; this module only decides.
"""

from __future__ import annotations


def retry_allowed(active: int, retrying: int, percent: float, floor: int) -> bool:
    """May one more retry start? `active` counts the upstream's requests in flight, retries included."""
    return retrying < max(floor, int(active * percent / 100.0))
