"""What one upstream attempt holds, given back on every way out of it.

An attempt counts as outstanding on its deployment (least-outstanding balancing, the admin API), may be
its circuit's half-open probe, and may hold a place in its upstream's limit (`Hold`). `async with
Lease(...)` gives all of it back when the attempt ends without an answer to relay, whatever ended it: a
retriable answer (after its body was read), an error, a cancelled call (the client left) or a request
that could not be built. An answer to relay is handed over instead (`keep`): the caller releases it once
the response is relayed (dispatch.Sent).
"""

from __future__ import annotations

import time
from types import TracebackType

from proxy.call import Attempt, Call, Hold
from proxy.errors import InvalidRequest
from proxy.upstream.registry import DeploymentState, Registry


class Lease:
    """No `__slots__`: what an attempt fills in as it goes is a class default until then, so a lease costs
    five stores to make."""

    started = 0.0
    """perf_counter() when the request went out (0: it never did)."""
    status = 0
    """The answer's status (0: none came)."""
    settled = False
    """The outcome is recorded (the call's attempts, the circuit): nothing left to give back for it."""
    _kept = False

    def __init__(self, registry: Registry, state: DeploymentState, call: Call, hold: Hold | None, probe: bool
                 ) -> None:
        self.registry = registry
        self.state = state
        self.call = call
        self.hold = hold
        self.probe = probe
        """The attempt is its circuit's half-open probe: one without an outcome gives the probe back."""

    async def __aenter__(self) -> Lease:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._kept:
            return
        registry, state = self.registry, self.state
        registry.release(state)
        if kind is not None and not self.settled:  # cancelled, or a request we cannot build
            registry.abandon(state, self.probe)
            if self.started:
                self.call.attempts.append(Attempt(state.id, 0, time.perf_counter() - self.started, "cancelled"))
            if self.hold is not None:
                await self._finish(0, sent=bool(self.started) and not issubclass(kind, InvalidRequest))
            return
        if self.hold is not None:  # an error answer or none: the request counts in the upstream's limit
            await self._finish(self.status, sent=True)

    def keep(self) -> Hold | None:
        """The answer is relayed: the caller takes the deployment's count and the hold over."""
        self._kept = True
        return self.hold

    async def _finish(self, status: int, sent: bool) -> None:
        hold = self.hold
        assert hold is not None
        self.hold = None
        if self.call.hold is hold:
            self.call.hold = None
        await hold.finish(status, None, sent=sent)
