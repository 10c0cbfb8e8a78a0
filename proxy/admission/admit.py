"""Admission: `Admission.admit(call)`, the async context manager ingress wraps around the rest of
the data path.

Every limit that applies (tenant, route, route per tenant) must admit the request; it is then counted
in all of them at once (one request, plus a token estimate when a token limit applies). Over a limit
the route either rejects at once or, with `on_limit: queue`, waits for capacity until its queue's
`max_wait` from arrival. On the way out (success, error or cancellation) the tokens are settled with
the real `usage` and concurrency is released. A route with no limits pays one check.

Upstream limits are not checked here: dispatch takes them per attempt, on the upstream the attempt goes
to (`upstream.py`). Admission only prepares the token estimate for them and, on the way out, finishes
the hold of the attempt whose response was relayed (`call.hold`), after the relay is done with it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

from proxy.admission import tokens as tok
from proxy.admission.limits import Refusal, WaitUntil, decide, go_duration, ratelimit_headers
from proxy.admission.local import LocalStore
from proxy.admission.store import LimiterStore, Reservation
from proxy.call import Call
from proxy.errors import ProxyError, RateLimited
from proxy.policy.plan import Limit, LimitSet, Plan
from proxy.telemetry.metrics import Metrics

_TOKEN_KINDS = ("reserved", "settled", "refunded")
RECHECK = 0.5
"""Longest sleep between two looks at the limiter: refunds and releases free capacity early."""


class Waiting(Protocol):
    """Told when a request starts and stops waiting (the relay commits streams and sends heartbeats)."""

    async def begin(self, status: Callable[[], str]) -> None: ...

    def end(self) -> None: ...


class _Nothing:
    """The context manager for a request with nothing to check: no allocation, no awaits."""

    __slots__ = ()

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        return None


NOTHING = _Nothing()


class Admission:
    """The limiter store plus what admission reports to; one per app."""

    __slots__ = ("store", "metrics", "recheck", "tokens", "_exported", "closing")

    def __init__(
        self, store: LimiterStore | None = None, metrics: Metrics | None = None, recheck: float = RECHECK
    ) -> None:
        self.store: LimiterStore = store if store is not None else LocalStore()
        self.metrics = metrics
        self.recheck = recheck
        self.tokens: dict[str, list[int]] = {}
        """[reserved, settled, refunded] token totals by tenant: summed per request, exported at scrape."""
        self._exported: dict[str, list[int]] = {}
        self.closing: ProxyError | None = None
        """Set at shutdown, past the drain timeout: a request waiting for a limit fails with it."""

    async def refresh_metrics(self) -> None:
        """signalbox_limiter_remaining, set at scrape time from the store's snapshots."""
        metrics = self.metrics
        if metrics is None:
            return
        for tenant, totals in list(self.tokens.items()):
            exported = self._exported.setdefault(tenant, [0, 0, 0])
            for i, kind in enumerate(_TOKEN_KINDS):
                if totals[i] > exported[i]:
                    metrics.count_tokens(tenant, kind, totals[i] - exported[i])
                    exported[i] = totals[i]
        for usage in await self.store.remaining():
            for name, meter in (("requests_per_minute", usage.requests), ("tokens_per_minute", usage.tokens)):
                if meter is not None:
                    metrics.limiter_remaining.labels(usage.tenant, f"{usage.key}/{name}").set(meter.remaining)
            if usage.concurrent is not None:
                free = usage.concurrent[0] - usage.concurrent[1]
                metrics.limiter_remaining.labels(usage.tenant, f"{usage.key}/concurrent").set(free)

    async def reconfigure(self, plan: Plan) -> None:
        """After a reload: hand the plan's limits, by key, to the store. Generic: a store that keeps
        its numbers elsewhere (or receives them with every call) may leave `reconfigure` out."""
        hook = getattr(self.store, "reconfigure", None)
        if hook is not None:
            await hook(plan_limits(plan))
        if self.metrics is not None:
            self.metrics.limiter_remaining.clear()  # keys that left the plan; the next scrape refills

    def admit(self, call: Call, waiting: Waiting | None = None) -> AbstractAsyncContextManager[None]:
        route = call.route
        assert route is not None and call.tenant is not None
        limits = route.limit_sets.get(call.tenant.name) if route.limit_sets else None
        if limits is None and not route.upstream_limited:
            return NOTHING
        return _Admit(self, call, limits, waiting)


class _Admit:
    __slots__ = ("admission", "call", "limits", "waiting", "reservation")

    def __init__(
        self, admission: Admission, call: Call, limits: LimitSet | None, waiting: Waiting | None
    ) -> None:
        self.admission = admission
        self.call = call
        self.limits = limits
        self.waiting = waiting
        self.reservation: Reservation | None = None

    async def __aenter__(self) -> None:
        call, admission = self.call, self.admission
        route = call.route
        assert route is not None
        cost = 0
        limit_set = self.limits
        if (limit_set is not None and limit_set.tokens) or route.upstream_tokens:
            estimate = call.token_estimate = tok.estimate(call, route.default_max_tokens)
            call.want_usage = True  # each attempt decides whether to ask a stream for it (outgoing.send)
            if limit_set is not None and limit_set.tokens:
                cost = estimate
        if limit_set is None:
            return  # only upstream limits: dispatch takes them per attempt
        limits = limit_set.limits
        result = await admission.store.try_acquire(limits, cost)
        if isinstance(result, Reservation):  # the common case: admitted at once
            self.reservation = result
            if cost:
                self._count_tokens(cost, 0, 0)
            return
        deadline: float | None = None
        if route.on_limit == "queue" and route.queue is not None:
            deadline = time.monotonic() + route.queue.max_wait - call.elapsed()
        waited = False
        try:
            while True:
                if isinstance(result, Reservation):
                    self.reservation = result
                    self._count_tokens(cost, 0, 0)
                    return
                now = time.monotonic()
                decision = decide(result, now, deadline, admission.recheck)
                if not isinstance(decision, WaitUntil):
                    raise self._rejection(result, cost, waited)
                if not waited and self.waiting is not None:
                    await self.waiting.begin(_status(result))
                waited = True
                await asyncio.sleep(max(0.0, decision.at - now))
                if admission.closing is not None:
                    self._rejected("shutdown")
                    raise admission.closing
                result = await admission.store.try_acquire(limits, cost)
        except asyncio.CancelledError:
            if waited:
                self._rejected("client_gone")
            raise
        finally:
            if waited and self.waiting is not None:
                self.waiting.end()

    async def __aexit__(self, *exc: object) -> None:
        call = self.call
        hold = call.hold
        if hold is None:
            await self._settle()
            return
        call.hold = None
        try:  # the relayed attempt's upstream hold: its response is done with now
            await hold.finish(call.status, call.usage)
        finally:
            await self._settle()

    async def _settle(self) -> None:
        reservation = self.reservation
        if reservation is None:
            return
        call, store = self.call, self.admission.store
        try:
            requests = 1 if call.attempts else 0  # never sent upstream: give the request back
            spent = tok.settle_amount(call, reservation.tokens) if reservation.tokens else 0
            if reservation.tokens or requests != reservation.requests:
                await store.settle(reservation, requests=requests, tokens=spent)
            if reservation.tokens:
                self._count_tokens(0, spent, max(0, reservation.tokens - spent))
        finally:
            if reservation.concurrent:
                await store.release(reservation)

    def _count_tokens(self, reserved: int, settled: int, refunded: int) -> None:
        tenant = self.call.tenant
        if tenant is None:
            return
        totals = self.admission.tokens.get(tenant.name)
        if totals is None:
            totals = self.admission.tokens[tenant.name] = [0, 0, 0]
        totals[0] += reserved
        totals[1] += settled
        totals[2] += refunded

    def _rejected(self, reason: str) -> None:
        if self.admission.metrics is not None:
            self.admission.metrics.reject(reason)

    def _rejection(self, refusal: Refusal, cost: int, waited: bool) -> RateLimited:
        self._rejected(REASONS[refusal.dimension])
        error = RateLimited(
            refusal_message(refusal, self.call, cost, waited),
            retry_after=refusal.retry_after,
            should_retry=False if refusal.retry_after is None else None,
            headers=ratelimit_headers(refusal.usage),
        )
        if refusal.dimension == "tokens":
            error.type = "tokens"
        return error


def plan_limits(plan: Plan) -> dict[str, Limit]:
    """Every limit of a plan by key (tenant, route, route per tenant, upstream)."""
    found: dict[str, Limit] = {}
    singles: list[Limit | None] = [t.limit for t in plan.tenants.values()]
    singles += [u.limit for u in plan.upstreams.values()]
    for route in plan.routes:
        singles.append(route.limit)
        for limit_set in route.limit_sets.values():
            for limit in limit_set.limits:
                found[limit.key] = limit
    for single in singles:
        if single is not None:
            found[single.key] = single
    return found


def _status(refusal: Refusal) -> Callable[[], str]:
    text = f"waiting for capacity: {refusal.limit.scope}"
    return lambda: text


REASONS = {"requests": "rate_limit", "tokens": "token_limit", "concurrent": "concurrency_limit"}


def refusal_message(refusal: Refusal, call: Call, cost: int, waited: bool) -> str:
    """The 429's message: which limit, whose, how much it allows, and when to retry."""
    limit = refusal.limit
    spec = limit.spec
    whose = f" (tenant '{call.tenant.name}')" if not limit.tenant and call.tenant is not None else ""
    if refusal.retry_after is None:
        return (
            f"request too large: it reserves {cost} tokens (prompt estimate + max output) but "
            f"{limit.scope}{whose} allows {spec.tokens_per_minute} tokens per minute; "
            "lower max_tokens or shorten the prompt"
        )
    who = f"{limit.scope}{whose}"
    what: dict[str, Any] = {
        "requests": f"rate limit exceeded: {who} allows {spec.requests_per_minute} requests per minute",
        "tokens": f"token limit exceeded: {who} allows {spec.tokens_per_minute} tokens per minute "
        f"and this request reserves {cost}",
        "concurrent": f"concurrency limit exceeded: {who} allows {spec.concurrent} requests at once",
    }
    text = what[refusal.dimension]
    if waited and call.route is not None and call.route.queue is not None:
        text = f"waited {call.elapsed():.1f}s (max_wait of queue '{call.route.queue.name}'); still {text}"
    return f"{text}; retry in {go_duration(refusal.retry_after)}"
