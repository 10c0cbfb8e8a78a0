"""Admission: the limiter store, the token estimate, settling what a call used, and the 429s limits give.

Every limit that applies (tenant, route, route per tenant) must admit the request; it is counted in all
of them at once (one request, plus a token estimate when a token limit applies). Whether the request
waits for them, and in what order, is the gate's business (`proxy.flow.gate`); this module holds the
store and says, in the client's words, which limit refused and when to retry. On the way out (success,
error or cancellation) the tokens are settled with the real `usage` and concurrency is released.
"""

from __future__ import annotations

from proxy.admission import tokens as tok
from proxy.admission.limits import Refusal, describe, go_duration, ratelimit_headers
from proxy.admission.local import LocalStore
from proxy.admission.store import LimiterStore, Reservation
from proxy.call import Call
from proxy.errors import ProxyError, RateLimited
from proxy.policy.plan import Limit, Plan
from proxy.telemetry.metrics import Metrics

_TOKEN_KINDS = ("reserved", "settled", "refunded")
RECHECK = 0.5
"""Longest sleep of a retry waiting for an upstream's limit inside dispatch (releases free capacity early)."""


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
            for meter in usage.windows:
                metrics.limiter_remaining.labels(usage.tenant, f"{usage.key}/{meter.name}").set(meter.remaining)
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

    def totals_of(self, tenant: str) -> list[int]:
        """The tenant's [reserved, settled, refunded] token totals: one list for good (plans hold it)."""
        totals = self.tokens.get(tenant)
        if totals is None:
            totals = self.tokens[tenant] = [0, 0, 0]
        return totals

    def count_tokens(self, call: Call, reserved: int, settled: int, refunded: int) -> None:
        tenant = call.tenant
        if tenant is None:
            return
        totals = self.totals_of(tenant.name)
        if reserved:  # a call reserves, then settles: each time, some of the three are 0
            totals[0] += reserved
        if settled:
            totals[1] += settled
        if refunded:
            totals[2] += refunded

    def rejected(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.reject(reason)

    async def settle(self, call: Call, reservation: Reservation) -> bool:
        """The call is done: its own limits count what it really used, and its concurrency is given back
        (one store call). True when that freed capacity someone may be waiting for."""
        store = self.store
        if isinstance(store, LocalStore):
            return self.settle_now(call, reservation, store)
        requests, spent = _spent(call, reservation)
        await store.finish(reservation, requests=requests, tokens=spent)
        return self._settled(call, reservation, requests, spent)

    def settle_now(self, call: Call, reservation: Reservation, store: LocalStore, totals: list[int] | None = None
                   ) -> bool:
        """`settle` into the in-memory store (which never suspends): no coroutine. `totals`: the call's
        tenant's (`totals_of`), when the caller holds them. `_spent` and `_settled` written out: every
        admitted request under a limit passes here (a test holds it to `settle` over another store)."""
        reserved = reservation.tokens
        requests = 1 if call.attempts or call.cache == "hit" else 0
        spent = tok.settle_amount(call, reserved) if reserved else 0
        store.finish_now(reservation, requests, spent)
        if reserved:
            if totals is None:
                self.count_tokens(call, 0, spent, max(0, reserved - spent))
            else:
                totals[1] += spent
                if spent < reserved:
                    totals[2] += reserved - spent
        return reservation.concurrent or spent < reserved or requests < reservation.requests

    def _settled(self, call: Call, reservation: Reservation, requests: int, spent: int) -> bool:
        if reservation.tokens:
            self.count_tokens(call, 0, spent, max(0, reservation.tokens - spent))
        return reservation.concurrent or spent < reservation.tokens or requests < reservation.requests


def _spent(call: Call, reservation: Reservation) -> tuple[int, int]:
    """What a finished call counts: one request if it was sent upstream or answered from the cache (else it
    is given back), and the tokens it really used."""
    requests = 1 if call.attempts or call.cache == "hit" else 0
    return requests, tok.settle_amount(call, reservation.tokens) if reservation.tokens else 0


def rejection(admission: Admission, refusal: Refusal, call: Call | None, waited: bool, request_id: str = ""
              ) -> RateLimited:
    """A limit's refusal as the client's 429 (counted under the limit's dimension)."""
    admission.rejected(REASONS[refusal.dimension])
    cost = call.token_estimate if call is not None else 0
    error = RateLimited(
        refusal_message(refusal, call, cost, waited),
        retry_after=refusal.retry_after,
        should_retry=False if refusal.retry_after is None else None,
        headers=ratelimit_headers(refusal.usage),
    )
    if refusal.dimension == "tokens":
        error.type = "tokens"
    error.cause = REASONS[refusal.dimension]  # the access log's and the queue totals' reason
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


REASONS = {"requests": "rate_limit", "tokens": "token_limit", "concurrent": "concurrency_limit"}


def describe_refusal(refusal: Refusal) -> str:
    """Which limit and what it allows: `route 'chat' (allows 5 requests per second)`."""
    spec = refusal.limit.spec
    return f"{refusal.limit.scope} ({describe(spec, refusal.dimension, refusal.unit, refusal.headroom)})"


def refusal_message(refusal: Refusal, call: Call | None, cost: int, waited: bool) -> str:
    """The 429's message: which limit, whose, how much it allows, and when to retry."""
    limit = refusal.limit
    spec = limit.spec
    tenant = call.tenant if call is not None else None
    whose = f" (tenant '{tenant.name}')" if not limit.tenant and tenant is not None else ""
    allows = describe(spec, refusal.dimension, refusal.unit, refusal.headroom)
    who = f"{limit.scope}{whose}"
    if refusal.retry_after is None:
        if refusal.dimension == "tokens":
            return (
                f"request too large: it reserves {cost} tokens (prompt estimate + max output) but "
                f"{who} {allows}; lower max_tokens or shorten the prompt"
            )
        return f"{who} {allows}, which leaves this priority class nothing; send it with a higher class"
    text = {
        "requests": f"rate limit exceeded: {who} {allows}",
        "tokens": f"token limit exceeded: {who} {allows} and this request reserves {cost}",
        "concurrent": f"concurrency limit exceeded: {who} {allows}",
    }[refusal.dimension]
    queue = call.route.queue if call is not None and call.route is not None else None
    if waited and queue is not None and call is not None:
        text = f"waited {call.elapsed():.1f}s in queue '{queue.name}' (its max_wait); still {text}"
    return f"{text}; retry in {go_duration(refusal.retry_after)}"
