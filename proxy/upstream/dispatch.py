"""Dispatch: send a Call's request to its route's pool, with retries and fallbacks, and return the
upstream's response before any byte of it went to the client (which is what makes retrying safe): a
stream at its headers, a whole answer once its body is read.

One attempt: choose a deployment (registry: circuit closed or probe due, not held by pacing, untried
first, weighted or least-outstanding), take its upstream's limit if it has one (quota.py: over it, the
deployment is skipped for this attempt and another is chosen), send to it (outgoing.py). Then decide
(retry.py): relay the answer, retry the same deployment after the upstream's hint or a jittered
backoff, retry another one at once, or give up on this pool and try the route's fallbacks in order.
When nothing could be sent because every deployment left (fallbacks too) is over its upstream's
limit, the quota waits for capacity (`on_limit: queue`) and the pools are tried again, or answers 429.
Every wait is bounded by the call's deadline (`timeouts.total`, counted by the caller); a cancelled call
releases every counter it holds, in `except BaseException`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from proxy.call import Attempt, Call, Hold
from proxy.errors import (
    CircuitOpen,
    InvalidRequest,
    ProxyError,
    UpstreamLimited,
    UpstreamPaced,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from proxy.policy.plan import DeploymentSpec, RouteRule
from proxy.upstream import hints, retry
from proxy.upstream.body import Whole, read_error
from proxy.upstream.client import UpstreamClients
from proxy.upstream.outgoing import Outgoing, read_whole
from proxy.upstream.registry import DeploymentState, Registry


@dataclass(slots=True)
class Sent:
    """The upstream response to relay, and who produced it."""

    response: aiohttp.ClientResponse
    route: RouteRule
    """The route whose pool answered: the call's own, or the fallback that served it."""
    deployment: DeploymentSpec
    final: bool = False
    """Retrying stopped on the deadline: tell the client not to retry either."""
    lease: tuple[Registry, DeploymentState] | None = None
    hold: Hold | None = None
    """The answering attempt's place in its upstream's limit (also `call.hold`): finished by whoever is
    done with the response last (admission's exit for a relayed response, the batcher for a batch)."""
    body: Whole | None = None
    """What dispatch read of a whole answer (success or retriable error)."""

    def done(self) -> None:
        """The response has been relayed (or abandoned): it no longer counts as outstanding."""
        lease = self.lease
        if lease is not None:
            self.lease = None
            lease[0].release(lease[1])

    async def finish(self, call: Call, usage: Mapping[str, Any] | None) -> None:
        """Settle and release the answering attempt's upstream hold with the response's `usage` (for
        callers that read the response themselves; admission's exit does it for relayed ones)."""
        hold = self.hold
        if hold is None:
            return
        self.hold = None
        if call.hold is hold:
            call.hold = None
        await hold.finish(self.response.status, usage)


class _Progress:
    """Where a call's attempts stand across its pools (the route's, then each fallback's)."""

    __slots__ = (
        "attempts", "failure", "failure_route", "failure_deployment", "failure_body", "error",
        "last_was_error", "stop", "reason", "until", "refused",
    )

    def __init__(self, route: RouteRule) -> None:
        self.attempts = 0
        self.failure: aiohttp.ClientResponse | None = None
        """The last retriable error response, body buffered: relayed if nothing better comes."""
        self.failure_route = route
        self.failure_deployment: DeploymentSpec | None = None
        self.failure_body: Whole | None = None
        self.error: ProxyError | None = None
        """The last error without a response (connect error, timeout)."""
        self.last_was_error = False
        self.stop = ""
        """Why the last pool stopped: attempts, budget, deadline, unavailable (circuits), held (pacing)."""
        self.reason = ""
        """What the next retry is for (a status, connect_error or timeout), for metrics."""
        self.until = 0.0
        """For `held`: when the earliest pacing hold ends."""
        self.refused: UpstreamLimited | None = None
        """The soonest refusal by an upstream's limit in this pass over the pools (`limited`)."""


async def dispatch(
    call: Call,
    clients: UpstreamClients,
    client_headers: Mapping[str, str],
    query_string: str,
    *,
    passthrough_auth: bool,
    identify_header: str | None,
    deadline: float | None = None,
) -> Sent:
    """The call's request through its route's pool (retries, fallbacks) -> the upstream response to relay,
    with who answered. The caller must call `Sent.done()` once the response is relayed, and the answering
    attempt's upstream hold (`Sent.hold`, also `call.hold`) must be finished once it is done with: by
    admission's exit on the ingress path, by `Sent.finish` for callers that read the response themselves
    (the embeddings batcher). `deadline`: a `time.monotonic()` time; default now + timeouts.total."""
    route = call.route
    assert route is not None
    registry = clients.registry
    if deadline is None:
        deadline = registry.clock() + route.timeouts.total
    request = Outgoing(call, clients, client_headers, query_string, passthrough_auth, identify_header)
    progress = _Progress(route)
    sent = await _pool(request, route, registry, deadline, progress)
    if sent is not None:
        return sent  # the common case: the route's own pool answered
    return await _beyond_the_pool(request, route, registry, deadline, progress)


async def _beyond_the_pool(
    request: Outgoing, route: RouteRule, registry: Registry, deadline: float, progress: _Progress
) -> Sent:
    """The route's pool gave up: its fallbacks in order. If nothing could be sent because every deployment
    left is over its upstream's limit, wait for the soonest to free up and try the route's pool and its
    fallbacks again (the call holds nothing meanwhile), or answer 429; else give up as the last pool did."""
    waited = False
    while True:
        sent = await _fallbacks(request, route, registry, deadline, progress, count=not waited)
        if sent is not None:
            return sent
        refused, quota = progress.refused, registry.quota
        if refused is None or progress.attempts or quota is None:
            return _give_up(progress, route, registry)
        await quota.wait(request.call, refused, deadline - registry.clock(), waited)
        waited, progress.refused = True, None
        sent = await _pool(request, route, registry, deadline, progress)
        if sent is not None:
            return sent


async def _fallbacks(
    request: Outgoing, route: RouteRule, registry: Registry, deadline: float, progress: _Progress, count: bool
) -> Sent | None:
    """The route's fallbacks in order, until one answers something to relay. `count`: in the metric (a
    call that waits for an upstream's limit goes over them again: counted the first time only)."""
    for name in route.fallbacks:
        if progress.stop == "deadline":
            break
        rule = request.call.plan.routes_by_name.get(name)
        if rule is None:
            continue
        if count and registry.metrics is not None:
            registry.metrics.fallback(route.name, rule.name)
        try:
            sent = await _pool(request, rule, registry, deadline, progress)
        except InvalidRequest:
            continue  # this fallback's provider cannot take the request (translation): try the next
        if sent is not None:
            return sent
    return None


async def _pool(
    request: Outgoing, rule: RouteRule, registry: Registry, deadline: float, progress: _Progress
) -> Sent | None:
    """Attempts on one route's pool until one answers something to relay (returned) or the pool gives
    up (None, with `progress.stop` saying why)."""
    spec = rule.retry
    clock = registry.clock
    call = request.call
    paying = call.route or rule  # the call's own route: its budget pays for every retry, fallbacks too
    quota = registry.quota
    avoid: set[str] | None = None  # hint longer than max_retry_after: not again in this pool
    tried: set[str] | None = None  # prefer others for the next attempt
    ready_at: dict[str, float] | None = None  # per deployment tried: earliest retry (hint or backoff)
    full: set[str] | None = None  # upstreams over their own limits: skipped until an attempt starts
    made = 0
    while made < spec.attempts:
        now = clock()
        state, held_until = registry.choose(rule, now, avoid, tried, full)
        if state is None:
            if held_until is not None:
                # Adaptive pacing: every usable deployment waits for its rate-limit reset. Wait here (holding
                # the queue slot, so later requests wait in the scheduler) if the reset is near enough.
                wait = held_until - now
                if wait <= spec.max_retry_after and retry.fits(now, wait, deadline):
                    await asyncio.sleep(wait)
                    full = None  # a new look: the upstreams' own limits may have room again too
                    continue
            if full:  # the rest is over its upstreams' limits: dispatch waits (on_limit: queue) or says 429
                progress.stop = "limited"
                return None
            if held_until is None:
                progress.stop = "unavailable"
                return None
            progress.stop, progress.until = "held", held_until
            return None
        is_retry = progress.attempts > 0
        wait = 0.0
        if is_retry:
            if ready_at:
                wait = max(0.0, ready_at.get(state.id, now) - now)
            if not retry.fits(now, wait, deadline):
                progress.stop = "deadline"
                return None
            if not registry.retry_allowed(paying, state, now):
                progress.stop = "budget"
                return None
        hold: Hold | None = None
        whole: Whole | None = None
        if state.spec.limit is not None and quota is not None:
            # Taken before any backoff wait, so the request counts from the moment it is committed to.
            taken = await quota.take(call, state.spec.limit)
            if isinstance(taken, UpstreamLimited):
                if taken.sooner(progress.refused):
                    progress.refused = taken
                full = _add(full, state.spec.upstream)
                continue
            hold = call.hold = taken
        full = None
        if is_retry and registry.metrics is not None:
            registry.metrics.retried(rule.name, progress.reason)
        probe = registry.start(state, now, is_retry, paying)
        started = 0.0
        bound = False
        try:
            if wait > 0:
                await asyncio.sleep(wait)
            if request.clients.refusing is not None:
                raise request.clients.refusing  # shutting down: nothing new goes upstream
            # Each attempt gets its own first_token limit, unless the deadline is nearer.
            first_token = state.spec.timeouts.first_token
            left = deadline - clock()
            bound = left < first_token
            started = time.perf_counter()
            response = await request.send(state.spec, max(left, 0.001) if bound else first_token, bound)
            if not call.stream and response.status < 400:
                # Read a whole answer here rather than in the relay (which then finds it read): a
                # connection cut mid-body is still a failure nothing has reached the client of.
                left = deadline - clock()
                bound = bound or left < first_token
                whole = await read_whole(
                    response, state.spec.upstream, max(left, 0.001) if bound else None, call.plan.max_buffered_response
                )
        except (UpstreamUnreachable, UpstreamTimeout) as err:
            registry.release(state)
            if hold is not None:  # no answer came: the request stays counted, its tokens go back
                call.hold = None
                await hold.finish(0, None)
            made += 1
            progress.attempts += 1
            call.attempts.append(Attempt(state.id, 0, time.perf_counter() - started, err.reason))
            progress.error, progress.last_was_error = err, True
            kind: retry.ErrorKind = "timeout" if isinstance(err, UpstreamTimeout) else "connect_error"
            if kind == "timeout" and bound:  # the deadline, not the deployment, ran out
                registry.abandon(state, probe)
                progress.stop = "deadline"
                return None
            registry.record(state, clock(), True, probe)
            if not retry.error_retriable(kind, spec):
                raise
            progress.reason = kind
            tried = _add(tried, state.id)
            rand = registry.rng.random()
            ready_at = ready_at or {}
            ready_at[state.id] = clock() + retry.backoff(made - 1, spec.backoff_base, spec.backoff_max, rand)
            continue
        except BaseException as exc:  # cancelled (client gone) or a request we cannot build: release everything
            registry.release(state)
            registry.abandon(state, probe)
            if started:
                call.attempts.append(Attempt(state.id, 0, time.perf_counter() - started, "cancelled"))
            if hold is not None:
                call.hold = None
                await hold.finish(0, None, sent=bool(started) and not isinstance(exc, InvalidRequest))
            raise
        now = clock()
        status = response.status
        made += 1
        progress.attempts += 1
        call.attempts.append(Attempt(state.id, status, time.perf_counter() - started))
        registry.record(state, now, retry.breaker_failure(status), probe)
        headers = response.headers
        if state.spec.pacing.enabled:
            # Adaptive pacing: a limit reported at 0 remaining holds the deployment until its reset. (A
            # bare retry-after is advice for this request's retry, not a reason to hold everyone.)
            exhausted = hints.exhausted_for(headers, registry.wall())
            if exhausted is not None:
                registry.hold(state, now, exhausted)
        if status < 400 or not retry.status_retriable(status, spec, headers.get("x-should-retry")):
            return Sent(response, rule, state.spec, lease=(registry, state), hold=hold, body=whole)
        hint = hints.retry_hint(headers, registry.wall())
        try:
            buffered = await read_error(response, deadline - clock(), call.plan.max_buffered_response)
        finally:
            registry.release(state)
            if hold is not None:  # answered with an error: the request counts, no tokens
                call.hold = None
                await hold.finish(status, None)
        if buffered is not None:
            progress.failure, progress.last_was_error, progress.failure_body = response, False, buffered
            progress.failure_route, progress.failure_deployment = rule, state.spec
        else:
            progress.error, progress.last_was_error = UpstreamUnreachable(
                f"upstream '{state.spec.upstream}' broke the connection while answering {status}"
            ), True
        progress.reason = str(status)
        tried = _add(tried, state.id)
        if retry.hint_too_long(hint, spec):
            avoid = _add(avoid, state.id)
        else:
            ready_at = ready_at or {}
            ready_at[state.id] = clock() + retry.delay(made - 1, hint, spec, registry.rng.random())
    progress.stop = "attempts"
    return None


def _give_up(progress: _Progress, route: RouteRule, registry: Registry) -> Sent:
    """No pool produced an answer worth relaying at once: relay the last real upstream error (with
    x-should-retry: false when the deadline stopped us), else say why nothing was sent."""
    final = retry.stop_reason_final(progress.stop)
    failure = progress.failure
    # The real upstream error is relayed when the deadline stopped us, else the last outcome.
    deployment = progress.failure_deployment
    if failure is not None and deployment is not None and (final or not progress.last_was_error):
        return Sent(failure, progress.failure_route, deployment, final, body=progress.failure_body)
    if progress.error is not None:
        error = progress.error
        if progress.stop == "deadline" and not isinstance(error, UpstreamTimeout):
            error = UpstreamTimeout("the request ran past its total deadline (timeouts.total)")
        if final:
            error.should_retry = False
        raise error
    now = registry.clock()
    if progress.stop == "held":
        wait = max(0.0, progress.until - now)
        raise UpstreamPaced(
            f"every deployment of route '{route.name}' is rate limited by its upstream for {wait:.1f}s more; "
            "retry after that",
            retry_after=wait,
        )
    if progress.stop == "deadline":
        raise UpstreamTimeout("the request ran past its total deadline (timeouts.total)", should_retry=False)
    wait = registry.reopens_in(route, now)
    raise CircuitOpen(
        f"every deployment of route '{route.name}' is failing (circuit open); "
        f"the next probe is in {wait:.1f}s",
        retry_after=wait,
    )


def annotate(headers: MutableMapping[str, str], call: Call, sent: Sent) -> None:
    """Say who answered and how many upstream calls it took (x-signalbox-attempts on every response)."""
    headers["x-signalbox-attempts"] = str(len(call.attempts))
    headers["x-signalbox-deployment"] = sent.deployment.id
    if sent.route is not call.route:
        headers["x-signalbox-fallback"] = sent.route.name
    if sent.final:
        headers["x-should-retry"] = "false"


def counted(error: ProxyError, call: Call) -> ProxyError:
    """A proxy-made error after dispatch began: it carries the attempt count too."""
    error.headers["x-signalbox-attempts"] = str(len(call.attempts))
    return error


def _add(items: set[str] | None, item: str) -> set[str]:
    if items is None:
        return {item}
    items.add(item)
    return items
