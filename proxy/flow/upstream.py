"""Upstream limits, taken per attempt: `upstreams.<name>.limits` counts exactly the calls that upstream
receives. Dispatch calls `UpstreamQuota.take()` once it has chosen a deployment (so a pool's other
upstreams, retries to another deployment and fallbacks are counted where they really go) and knows this
object only through its port, `proxy/upstream/quota.py`; the counters live in the same `LimiterStore` as
admission's (in memory or Redis), under the key `upstream:<name>`.

An attempt holds one request (and a token estimate, and a concurrency count) in its upstream's limit:
- an attempt that failed before an answer came (connect error, timeout) keeps its request and gives its
  tokens back; one that was answered with an error keeps its request, tokens given back;
- the attempt whose response is relayed settles with that response's real `usage` (or the estimate,
  for an interrupted stream) once the relay is done with it;
- an attempt that never left the proxy (cancelled during its backoff) gives everything back;
- concurrency is released in every case, cancellation included.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import Any

from proxy.admission import tokens as tok
from proxy.admission.limits import Refusal, WaitUntil, decide_wait, ratelimit_headers
from proxy.admission.local import LocalStore
from proxy.admission.store import LimiterStore, Reservation
from proxy.call import Call, Hold
from proxy.errors import UpstreamLimited
from proxy.flow.admit import Admission, refusal_message
from proxy.policy.plan import Limit


class UpstreamHold:
    """One attempt's reservation in its upstream's limit; `finish` settles and releases it once."""

    __slots__ = ("store", "reservation", "finished", "kick")

    def __init__(self, store: LimiterStore, reservation: Reservation, kick: Callable[[], None] | None = None) -> None:
        self.store = store
        self.reservation = reservation
        self.finished = False
        self.kick = kick
        """Tells the queues' gates that capacity freed (a release, a refund)."""

    async def finish(self, status: int, usage: Mapping[str, Any] | None, *, sent: bool = True) -> None:
        store = self.store
        if isinstance(store, LocalStore):
            self.finish_now(status, usage, sent=sent)
            return
        if self.finished:
            return
        self.finished = True
        requests, spent = self._amounts(status, usage, sent)
        try:
            await store.finish(self.reservation, requests=requests, tokens=spent)
        finally:
            self._freed(requests, spent, True)

    def finish_now(self, status: int, usage: Mapping[str, Any] | None, *, sent: bool = True, kick: bool = True
                   ) -> bool:
        """`finish` when the store is the in-memory one (which never suspends): no coroutine. True when it
        freed capacity (`kick=False`: the caller tells the gates itself)."""
        if self.finished:
            return False
        self.finished = True
        store = self.store
        assert isinstance(store, LocalStore)
        reservation = self.reservation
        reserved = reservation.tokens  # `_amounts` and `_freed`, inlined: this runs for every relayed attempt
        spent = tok.attempt_amount(reserved, status, usage) if sent and reserved else 0
        requests = 1 if sent else 0
        store.finish_now(reservation, requests, spent)
        freed = reservation.concurrent or spent < reserved or requests < reservation.requests
        if freed and kick and self.kick is not None:
            self.kick()
        return freed

    def _amounts(self, status: int, usage: Mapping[str, Any] | None, sent: bool) -> tuple[int, int]:
        """What the attempt counts in the end: one request if it left the proxy, and its tokens."""
        reserved = self.reservation.tokens
        spent = tok.attempt_amount(reserved, status, usage) if sent and reserved else 0
        return (1 if sent else 0), spent

    def _freed(self, requests: int, spent: int, kick: bool) -> bool:
        reservation = self.reservation
        freed = reservation.concurrent or spent < reservation.tokens or requests < reservation.requests
        if freed and kick and self.kick is not None:
            self.kick()
        return freed


class UpstreamQuota:
    """Implements dispatch's `Quota` port over admission's store (read at each call: the Redis store
    replaces the default one at start-up)."""

    __slots__ = ("admission", "kick")

    def __init__(self, admission: Admission, kick: Callable[[], None] | None = None) -> None:
        self.admission = admission
        self.kick = kick

    async def take(self, call: Call, limit: Limit) -> Hold | UpstreamLimited:
        """Count one attempt of `call` in `limit`, or say why it may not go to that upstream now. The
        capacity the queue secured for the call (`call.prehold`) serves the first attempt to its upstream."""
        prehold = call.prehold
        if prehold is not None and prehold[0] == limit.key:
            call.prehold = None
            return prehold[1]
        cost = 0
        if limit.spec.counts_tokens:
            cost = call.token_estimate
            if not cost:  # a call admission did not estimate (a merged embeddings batch)
                default = call.route.default_max_tokens if call.route is not None else 1024
                cost = call.token_estimate = tok.estimate(call, default)
        store = self.admission.store
        if isinstance(store, LocalStore):
            result = store.acquire_limit_now(limit, cost)
        else:
            result = await store.try_acquire((limit,), cost)
        if isinstance(result, Reservation):
            return UpstreamHold(store, result, self.kick)
        return refused(result, call, cost)

    async def wait(self, call: Call, soonest: UpstreamLimited, left: float, waited: bool) -> None:
        """No deployment (fallbacks included) can take the call now. With the route's `on_limit: queue`,
        sleep until the soonest refusal may have passed (at most `recheck`, since releases and refunds
        free capacity early), bounded by the queue's `max_wait` from arrival and by `left` seconds of the
        call's deadline; otherwise, or once those are spent, raise `soonest` (the 429)."""
        route = call.route
        admission = self.admission
        now = time.monotonic()
        until: float | None = None
        bound = "timeouts.total"
        if route is not None and route.on_limit == "queue" and route.queue is not None:
            queue_left = route.queue.max_wait - call.elapsed()
            until = now + min(left, queue_left)
            if queue_left < left:
                bound = f"max_wait of queue '{route.queue.name}'"
        decision = decide_wait(soonest.retry_after, soonest.exact, now, until, admission.recheck)
        if isinstance(decision, WaitUntil):
            room = call.waiting  # a stream with heartbeat_while_queued: its 200 now, then heartbeats
            try:
                if room is not None:
                    await room.begin(_waiting_for(soonest))
                await asyncio.sleep(max(0.0, decision.at - now))
            finally:  # a client that leaves meanwhile is a cancellation (its outcome), not a rejection
                if room is not None:
                    room.end()
            return
        if admission.metrics is not None:
            admission.metrics.reject(soonest.reason)
        if route is not None and route.queue is not None and until is not None:
            what = "waited" if waited else "could not wait"
            wait = f"{what} for upstream capacity during a retry until its {bound} ran short; still "
            soonest.message = wait + soonest.message
            soonest.args = (soonest.message,)
        raise soonest


_LIMIT_NAMES = {"requests": "request rate", "tokens": "token rate", "concurrent": "concurrency"}


def _waiting_for(soonest: UpstreamLimited) -> Callable[[], str]:
    """The heartbeat comment of a stream that waits for an upstream's limit."""
    what = f"waiting for upstream capacity ({_LIMIT_NAMES.get(soonest.dimension, soonest.dimension)})"
    return lambda: what


def refused(refusal: Refusal, call: Call, cost: int) -> UpstreamLimited:
    """The refusal as the 429 it becomes if no other deployment can take the call."""
    return UpstreamLimited(
        refusal_message(refusal, call, cost, False),
        retry_after=refusal.retry_after,
        exact=refusal.exact,
        dimension=refusal.dimension,
        headers=ratelimit_headers(refusal.usage),
    )
