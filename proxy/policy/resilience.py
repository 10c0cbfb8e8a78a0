"""Compiles a route's pool, retry, breaker and pacing settings into frozen specs (pure).

Precedence, per field: route `retry` > policy `retry` > built-in default; upstream `breaker` > policy
`breaker` > built-in default; a deployment's connect/first_token timeouts come from the route, then its
own upstream, then the policy (so a fallback to a slower provider keeps that provider's limits).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from proxy.policy.plan import (
    BreakerSpec,
    DeploymentSpec,
    PacingSpec,
    RetrySpec,
    TimeoutSpec,
)
from proxy.policy.schema import Breaker, Policy, Retry, Route


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def retry_spec(route: Retry | None, policy: Retry) -> RetrySpec:
    default = RetrySpec()
    layers = (route, policy) if route is not None else (policy,)

    def pick(get: Callable[[Retry], Any], fallback: Any) -> Any:
        chosen = _first(*(get(layer) for layer in layers))
        return fallback if chosen is None else chosen

    on = pick(lambda r: r.retry_on, None)
    statuses = default.statuses
    connect, timeouts = default.connect_errors, default.timeouts
    if on is not None:
        statuses = frozenset(item for item in on if isinstance(item, int))
        connect, timeouts = "connect_error" in on, "timeout" in on
    return RetrySpec(
        attempts=pick(lambda r: r.attempts, default.attempts),
        statuses=statuses,
        connect_errors=connect,
        timeouts=timeouts,
        backoff_base=pick(lambda r: r.backoff.base if r.backoff else None, default.backoff_base),
        backoff_max=pick(lambda r: r.backoff.max if r.backoff else None, default.backoff_max),
        max_retry_after=pick(lambda r: r.max_retry_after, default.max_retry_after),
        budget_percent=pick(lambda r: r.budget.percent if r.budget else None, default.budget_percent),
        budget_min=pick(lambda r: r.budget.min_retries if r.budget else None, default.budget_min),
    )


def breaker_spec(upstream: Breaker | None, policy: Breaker) -> BreakerSpec:
    default = BreakerSpec()
    values = {}
    names = ("consecutive_failures", "failure_ratio", "min_requests", "window", "cooldown", "max_cooldown")
    for name in names:
        chosen = _first(getattr(upstream, name) if upstream is not None else None, getattr(policy, name))
        values[name] = getattr(default, name) if chosen is None else chosen
    return BreakerSpec(**values)


def deployments(
    route: Route, policy: Policy, timeouts_for: Callable[[str], TimeoutSpec]
) -> tuple[DeploymentSpec, ...]:
    """The route's pool; the shorthand `upstream:` + `model:` is a pool of one with weight 1."""
    members = [(d.upstream, d.model, d.weight) for d in route.deployments] if route.deployments else [
        (route.upstream, route.model, 1.0)
    ]
    out = []
    for upstream, model, weight in members:
        spec = policy.upstreams[upstream]
        out.append(
            DeploymentSpec(
                id=f"{upstream}/{model}" if model else upstream,
                upstream=upstream,
                model=model,
                weight=weight,
                timeouts=timeouts_for(upstream),
                breaker=breaker_spec(spec.breaker, policy.breaker),
                pacing=PacingSpec(spec.pacing.enabled, spec.pacing.max_hold),
            )
        )
    return tuple(out)
