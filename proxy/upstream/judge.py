"""Dispatch's decisions (pure): what one attempt's outcome means for the pool, when a deployment may be
tried again, and what to do when no deployment can be chosen. The clock's reading and the random
source are passed in, so tests drive every branch without sockets or sleeping.

Built on retry.py's classification (which statuses and errors retry, backoff, hints): this module
turns them into the next step of one pool's loop in dispatch.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from proxy.policy.plan import RetrySpec
from proxy.upstream import retry

Verdict = Literal["relay", "retry", "stop", "raise"]
"""relay: the answer goes to the client; retry: another attempt in this pool; stop: the pool gives up
because the deadline, not the deployment, ran out; raise: the error goes to the client as it is."""
Blocked = Literal["wait", "limited", "unavailable", "held"]
"""No deployment could be chosen. wait: a pacing hold ends soon enough to wait for it here; limited: the
rest is over its upstreams' own limits; unavailable: every circuit is open (or every deployment avoided);
held: pacing holds them all for longer than is worth waiting."""


def judge(status: int, error: retry.ErrorKind | None, deadline_bound: bool, should_retry: str | None,
          spec: RetrySpec) -> Verdict:
    """One attempt's outcome: an answer with `status` (`error` None; `should_retry` is its x-should-retry),
    or an `error` without one (`deadline_bound`: the attempt's time limit was what was left of the call's
    deadline, so a timeout is the deadline's)."""
    if error is None:
        return "retry" if retry.status_retriable(status, spec, should_retry) else "relay"
    if error == "timeout" and deadline_bound:
        return "stop"
    return "retry" if retry.error_retriable(error, spec) else "raise"


def ready_at(retry_no: int, hint: float | None, spec: RetrySpec, now: float, draw: Callable[[], float]
             ) -> float | None:
    """When the deployment that just failed may be tried again: after the upstream's `hint`, else after a
    jittered backoff (`retry_no` counts this pool's failed attempts from 0). None when the hint is longer
    than `max_retry_after`: not again in this pool. `draw` is called once, unless the hint is too long."""
    if retry.hint_too_long(hint, spec):
        return None
    return now + retry.delay(retry_no, hint, spec, draw())


def retry_wait(ready: float | None, now: float, deadline: float) -> float | None:
    """How long to wait before a retry on a deployment that is `ready` at that time (None: at once), or
    None when the wait would end at or past the deadline."""
    wait = max(0.0, ready - now) if ready is not None else 0.0
    return wait if retry.fits(now, wait, deadline) else None


def blocked(held_until: float | None, limited: bool, spec: RetrySpec, now: float, deadline: float
            ) -> tuple[Blocked, float]:
    """No deployment was chosen (`held_until`: the earliest end of a pacing hold, if that is what stopped
    them; `limited`: some were skipped as over their upstream's limits). With the seconds to wait
    ("wait") or the hold's end ("held"); 0 otherwise."""
    if held_until is not None:
        wait = held_until - now
        # Wait here (holding the queue slot, so later requests wait in the scheduler) if the reset is near.
        if wait <= spec.max_retry_after and retry.fits(now, wait, deadline):
            return "wait", wait
    if limited:
        return "limited", 0.0
    if held_until is None:
        return "unavailable", 0.0
    return "held", held_until
