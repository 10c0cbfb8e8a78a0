"""One attempt of dispatch: take the deployment's place in its upstream's limit, send, read a whole
answer, and judge the outcome (judge.py) into the pool's next step. What the attempt holds is a Lease
(lease.py): given back on every way out, or handed over with the answer to relay (`Sent`).

`Progress` is where a call's attempts stand across the pools dispatch.py walks (the route's, then its
fallbacks), and what the pool being tried keeps between attempts (deployments to avoid, tried, when
each may be tried again, upstreams over their own limits).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from proxy.call import Attempt, Call, Hold
from proxy.errors import ProxyError, UpstreamLimited, UpstreamTimeout, UpstreamUnreachable
from proxy.policy.plan import DeploymentSpec, RetrySpec, RouteRule
from proxy.upstream import hints, judge, retry
from proxy.upstream.body import Whole, arrived, read_error
from proxy.upstream.by_rules import RuleTrack
from proxy.upstream.client import send_once
from proxy.upstream.lease import Lease
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


class Progress:
    """Where a call's attempts stand across its pools (the route's, then each fallback's), and what the
    pool being tried keeps between its attempts.

    No `__slots__`: what most calls never change (a first attempt that answers) is a class default, so
    making one costs five stores rather than twenty."""

    failure: aiohttp.ClientResponse | None = None
    """The last retriable error response, body buffered: relayed if nothing better comes."""
    failure_deployment: DeploymentSpec | None = None
    failure_body: Whole | None = None
    error: ProxyError | None = None
    """The last error without a response (connect error, timeout)."""
    last_was_error = False
    stop = ""
    """Why the last pool stopped: attempts, budget, deadline, unavailable (circuits), held (pacing)."""
    reason = ""
    """What the next retry is for (a status, connect_error or timeout), for metrics."""
    until = 0.0
    """For `held`: when the earliest pacing hold ends."""
    refused: UpstreamLimited | None = None
    """The soonest refusal by an upstream's limit in this pass over the pools (`limited`)."""
    avoid: set[str] | None = None
    """Deployments whose hint is longer than max_retry_after: not again in this pool."""
    tried: set[str] | None = None
    """Deployments tried in this pool: others are preferred for the next attempt."""
    ready: dict[str, float] | None = None
    """Per deployment tried in this pool: its earliest retry (the upstream's hint or a backoff)."""
    full: set[str] | None = None
    """Upstreams over their own limits: skipped until an attempt starts."""
    track: RuleTrack | None = None
    """Under `retry.rules`: each rule's failures in the pool being tried (by_rules.py)."""
    waits: dict[str, tuple[float, str]] | None = None
    """Per deployment: the wait planned before its next attempt and how it was chosen (access log)."""

    def __init__(self, route: RouteRule, registry: Registry, deadline: float) -> None:
        self.registry = registry
        self.deadline = deadline
        """A registry.clock() time: when `timeouts.total` runs out."""
        self.failure_route = route
        self.attempts = 0
        self.made = 0
        """Attempts made in the pool being tried (the pool's fields start as the class's defaults)."""

    def enter_pool(self) -> None:
        """The next pool (a fallback's, or the route's again after a wait): its fields start afresh."""
        self.made = 0
        self.avoid = self.tried = self.full = None
        self.ready = self.track = self.waits = None


class Again:
    """The pool goes on: another attempt."""

    __slots__ = ()


AGAIN = Again()
FULL = Again()
"""The chosen deployment's upstream is over its own limit: choose again without it."""


def placed(taken: Hold | UpstreamLimited, call: Call, state: DeploymentState, progress: Progress) -> Hold | Again:
    """What the quota answered for a place in the deployment's upstream limit (taken before any backoff
    wait, so the request counts from the moment it is committed to): the hold, now the call's; or `FULL`
    when it is over its limit (the deployment is skipped for this attempt and another chosen). A plain call
    on the quota's answer, so taking adds no coroutine of its own to the path."""
    if isinstance(taken, UpstreamLimited):
        if taken.sooner(progress.refused):
            progress.refused = taken
        progress.full = add(progress.full, state.spec.upstream)
        return FULL
    call.hold = taken
    return taken


async def attempt(
    request: Outgoing, rule: RouteRule, state: DeploymentState, hold: Hold | None, wait: float, now: float,
    progress: Progress,
) -> Sent | None | Again:
    """One attempt: the backoff wait, the request up to its response headers and, for a whole answer, its
    body; then judged. Returns the answer to relay (its lease handed over), None when the pool stops, or
    `AGAIN`; an error that may not be retried is raised. Whatever it held is given back otherwise."""
    registry, call = progress.registry, request.call
    is_retry = progress.attempts > 0
    if is_retry and registry.metrics is not None:
        registry.metrics.retried(rule.name, progress.reason)
    probe = registry.start(state, now, is_retry, call.route or rule)
    async with Lease(registry, state, call, hold, probe) as lease:
        if wait > 0:
            await asyncio.sleep(wait)
        if request.clients.refusing is not None:
            raise request.clients.refusing  # shutting down: nothing new goes upstream
        spec, clock = state.spec, registry.clock
        # Each attempt gets its own first_token limit, unless the deadline is nearer.
        first_token = spec.timeouts.first_token
        left = progress.deadline - clock()
        bound = left < first_token
        limit = max(left, 0.001) if bound else first_token
        session, url, headers, body = request.prepare(spec)
        if call.trace is not None:
            headers = call.trace.attempt(spec, url, headers)  # the attempt's span, sent as traceparent
        lease.started = time.perf_counter()
        whole = None
        try:
            response = await send_once(
                session, call.method, url, headers=headers, body=body, query=None,
                connect=min(spec.timeouts.connect, limit), first_token=limit, upstream=spec.upstream,
                stream=call.stream, deadline_bound=bound,
            )
            call.mark("upstream_headers")
            if not call.stream and response.status < 400 and (
                    rule.tool_prefix is None or response.content_length is not None):
                # Read a whole answer here rather than in the relay (which then finds it read): a connection
                # cut mid-body is still a failure nothing has reached the client of. (A tool's chunked answer
                # is relayed as it comes: it may be a stream of its own, NDJSON say.)
                whole = arrived(response, call.plan.max_buffered_response)  # all there: no wait to bound
                if whole is None:
                    left = progress.deadline - clock()
                    bound = bound or left < first_token
                    cap = max(left, 0.001) if bound else None
                    whole = await read_whole(response, spec.upstream, cap, call.plan.max_buffered_response)
        except (UpstreamUnreachable, UpstreamTimeout) as err:
            return _failed(state, lease, err, bound, rule, progress)
        sent = _answered(response, whole, bound, state, lease, rule, progress)
        if sent is not None:
            return sent
        hint = hints.retry_hint(response.headers, registry.wall())
        buffered = await read_error(response, progress.deadline - clock(), call.plan.max_buffered_response)
    _retry_after_answer(response, buffered, hint, rule, state, progress)
    return None if progress.track is not None and progress.track.verdict == "spent" else AGAIN


def _answered(
    response: aiohttp.ClientResponse, whole: Whole | None, bound: bool, state: DeploymentState, lease: Lease,
    rule: RouteRule, progress: Progress,
) -> Sent | None:
    """An answer came: recorded (the call's attempts, the circuit, pacing) and judged. The answer to relay,
    or None for one to retry (its body still to read)."""
    registry = progress.registry
    progress.made += 1
    progress.attempts += 1
    lease.settled = True
    status = lease.status = response.status
    lease.call.attempts.append(Attempt(state.id, status, time.perf_counter() - lease.started,
                                       wait=_planned(progress, state.id) if progress.waits else None))
    now = registry.clock()
    registry.record(state, now, retry.breaker_failure(status), lease.probe)
    headers = response.headers
    if state.spec.pacing.enabled:
        _pace(registry, state, headers, now)
    if status < 400 or _judged_relay(status, headers, bound, rule.retry, progress):
        return Sent(response, rule, state.spec, lease=(registry, state), hold=lease.keep(), body=whole)
    return None


def _judged_relay(status: int, headers: Mapping[str, str], bound: bool, spec: RetrySpec, progress: Progress
                  ) -> bool:
    """An error answer (status 400 and up): relayed as it is (True) or retried?"""
    should_retry = headers.get("x-should-retry")
    if spec.rules:
        hint = hints.retry_hint(headers, progress.registry.wall())
        return _track(progress, spec).judge(status, None, bound, should_retry, hint, spec) == "relay"
    return judge.judge(status, None, bound, should_retry, spec) == "relay"


def _failed(state: DeploymentState, lease: Lease, error: ProxyError, bound: bool, rule: RouteRule,
            progress: Progress) -> Sent | None | Again:
    """An attempt that got no answer: the pool stops (the deadline ran out), retries, or raises it."""
    registry = progress.registry
    progress.made += 1
    progress.attempts += 1
    lease.settled = True
    lease.call.attempts.append(Attempt(state.id, 0, time.perf_counter() - lease.started, error.reason,
                                       wait=_planned(progress, state.id)))
    progress.error, progress.last_was_error = error, True
    kind: retry.ErrorKind = "timeout" if isinstance(error, UpstreamTimeout) else "connect_error"
    spec = rule.retry
    track = _track(progress, spec) if spec.rules else None
    verdict = track.judge(0, kind, bound, None, None, spec) if track is not None else judge.judge(
        0, kind, bound, None, spec)
    if verdict == "stop":  # the deadline, not the deployment, ran out
        registry.abandon(state, lease.probe)
        progress.stop = "deadline"
        return None
    registry.record(state, registry.clock(), True, lease.probe)
    if verdict == "raise":
        raise error
    if verdict == "spent":  # this outcome's rule has used its attempts: the pool gives up
        progress.stop = "attempts"
        return None
    progress.reason = kind
    progress.tried = add(progress.tried, state.id)
    _next_chance(None, rule, state, progress)
    return AGAIN


def _pace(registry: Registry, state: DeploymentState, headers: Mapping[str, str], now: float) -> None:
    """Adaptive pacing: a limit reported at 0 remaining holds the deployment until its reset. (A bare
    retry-after is advice for this request's retry, not a reason to hold everyone.)"""
    exhausted = hints.exhausted_for(headers, registry.wall())
    if exhausted is not None:
        registry.hold(state, now, exhausted)


def _retry_after_answer(
    response: aiohttp.ClientResponse, buffered: Whole | None, hint: float | None, rule: RouteRule,
    state: DeploymentState, progress: Progress,
) -> None:
    """A retriable answer, its body read (or not, if the connection broke): kept to relay if nothing better
    comes, and the deployment's next chance set (after the hint or a backoff, or not in this pool)."""
    status = response.status
    if buffered is not None:
        progress.failure, progress.last_was_error, progress.failure_body = response, False, buffered
        progress.failure_route, progress.failure_deployment = rule, state.spec
    else:
        progress.error, progress.last_was_error = UpstreamUnreachable(
            f"upstream '{state.spec.upstream}' broke the connection while answering {status}"
        ), True
    progress.reason = str(status)
    progress.tried = add(progress.tried, state.id)
    if progress.track is not None and progress.track.verdict == "spent":
        progress.stop = "attempts"  # this outcome's rule has used its attempts: the pool gives up
        return
    _next_chance(hint, rule, state, progress)


def _next_chance(hint: float | None, rule: RouteRule, state: DeploymentState, progress: Progress) -> None:
    """When the deployment that just failed may be tried again: after the hint or a backoff, or (a hint
    longer than the rule allows) not again in this pool."""
    registry, spec = progress.registry, rule.retry
    now = registry.clock()
    if progress.track is not None:
        ready, wait, how = progress.track.plan(hint, spec, now, registry.rng.random)
    else:
        ready = judge.ready_at(progress.made - 1, hint, spec, now, registry.rng.random)
        wait, how = (None if ready is None else ready - now), "exponential" if hint is None else "hint"
    if ready is None:
        progress.avoid = add(progress.avoid, state.id)
        return
    progress.ready = progress.ready or {}
    progress.ready[state.id] = ready
    if wait is not None:
        progress.waits = progress.waits or {}
        progress.waits[state.id] = (wait, how)


def _track(progress: Progress, spec: RetrySpec) -> RuleTrack:
    track = progress.track
    if track is None:
        track = progress.track = RuleTrack(len(spec.rules))
    return track


def _planned(progress: Progress, deployment: str) -> tuple[float, str] | None:
    waits = progress.waits
    return waits.pop(deployment, None) if waits else None


def add(items: set[str] | None, item: str) -> set[str]:
    if items is None:
        return {item}
    items.add(item)
    return items
