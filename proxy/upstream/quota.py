"""The port through which dispatch takes upstream limits per attempt. Implemented on the admission side
(`proxy/admission/upstream.py`: the limiter store, the token estimate, the 429's wording) and wired by
the runtime onto the registry, so the upstream side never imports admission."""

from __future__ import annotations

from typing import Protocol

from proxy.call import Call, Hold
from proxy.errors import UpstreamLimited
from proxy.policy.plan import Limit


class Quota(Protocol):
    async def take(self, call: Call, limit: Limit) -> Hold | UpstreamLimited:
        """Count one attempt of `call` in its upstream's `limit` (a hold to finish once), or the refusal."""
        ...

    async def wait(self, call: Call, soonest: UpstreamLimited, left: float, waited: bool) -> None:
        """Nothing could be sent: sleep until the soonest refusal may have passed (the route waits, within
        `left` seconds of its deadline) and return to look again, or raise the 429."""
        ...
