"""Dispatch: send a Call's request to its route's pool, with retries and fallbacks, and return the
upstream's response before any byte of it went to the client (which is what makes retrying safe): a
stream at its headers, a whole answer once its body is read.

One attempt: choose a deployment (registry: circuit closed or probe due, not held by pacing, untried
first, weighted or least-outstanding), take its upstream's limit if it has one (quota.py: over it, the
deployment is skipped for this attempt and another is chosen), send to it (outgoing.py). Then decide
(judge.py, pure): relay the answer, retry the same deployment after the upstream's hint or a jittered
backoff, retry another one at once, or give up on this pool and try the route's fallbacks in order.
When nothing could be sent because every deployment left (fallbacks too) is over its upstream's
limit, the quota waits for capacity (`on_limit: queue`) and the pools are tried again, or answers 429.
Every wait is bounded by the call's deadline (`timeouts.total`, counted by the caller). One attempt is
attempt.py; what it holds is a Lease (lease.py), given back on every way out, a cancelled call included.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, MutableMapping

from proxy.call import Call, Hold
from proxy.errors import CircuitOpen, InvalidRequest, ProxyError, UpstreamPaced, UpstreamTimeout
from proxy.policy.plan import RouteRule
from proxy.upstream import judge, retry
from proxy.upstream.attempt import Again, Progress, Sent, attempt, placed
from proxy.upstream.client import UpstreamClients
from proxy.upstream.outgoing import Outgoing
from proxy.upstream.registry import Registry

__all__ = ["Sent", "annotate", "counted", "dispatch"]


async def dispatch(
    call: Call,
    clients: UpstreamClients,
    client_headers: Mapping[str, str],
    query_string: str,
    *,
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
    request = Outgoing(call, clients, client_headers, query_string)
    progress = Progress(route, registry, deadline)
    sent = await _pool(request, route, registry, deadline, progress)
    if sent is not None:
        return sent  # the common case: the route's own pool answered
    return await _beyond_the_pool(request, route, registry, deadline, progress)


async def _beyond_the_pool(
    request: Outgoing, route: RouteRule, registry: Registry, deadline: float, progress: Progress
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
        progress.enter_pool()
        sent = await _pool(request, route, registry, deadline, progress)
        if sent is not None:
            return sent


async def _fallbacks(
    request: Outgoing, route: RouteRule, registry: Registry, deadline: float, progress: Progress, count: bool
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
        progress.enter_pool()
        try:
            sent = await _pool(request, rule, registry, deadline, progress)
        except InvalidRequest:
            continue  # this fallback's provider cannot take the request (translation): try the next
        if sent is not None:
            return sent
    return None


async def _pool(
    request: Outgoing, rule: RouteRule, registry: Registry, deadline: float, progress: Progress
) -> Sent | None:
    """Attempts on one route's pool until one answers something to relay (returned) or the pool gives
    up (None, with `progress.stop` saying why). `progress` has entered the pool (`enter_pool`, or new)."""
    spec = rule.retry
    clock = registry.clock
    call = request.call
    paying = call.route or rule  # the call's own route: its budget pays for every retry, fallbacks too
    attempts = spec.attempts if spec.methods is None or call.method in spec.methods else 1  # retry.methods
    while progress.made < attempts:
        now = clock()
        state, held_until = registry.choose(rule, now, progress.avoid, progress.tried, progress.full)
        if state is None:
            blocked, value = judge.blocked(held_until, bool(progress.full), spec, now, deadline)
            if blocked != "wait":
                progress.stop, progress.until = blocked, value
                return None
            await asyncio.sleep(value)  # adaptive pacing: every usable deployment waits for its reset
            progress.full = None  # a new look: the upstreams' own limits may have room again too
            continue
        wait = 0.0
        if progress.attempts:
            found = judge.retry_wait(progress.ready.get(state.id) if progress.ready else None, now, deadline)
            if found is None or not registry.retry_allowed(paying, state, now):
                progress.stop = "deadline" if found is None else "budget"
                return None
            wait = found
        hold: Hold | None = None
        limit, quota = state.spec.limit, registry.quota
        if limit is not None and quota is not None:
            taken = placed(await quota.take(call, limit), call, state, progress)
            if isinstance(taken, Again):
                continue
            hold = taken
        progress.full = None
        sent = await attempt(request, rule, state, hold, wait, now, progress)
        if not isinstance(sent, Again):
            return sent
    progress.stop = "attempts"
    return None


def _give_up(progress: Progress, route: RouteRule, registry: Registry) -> Sent:
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


