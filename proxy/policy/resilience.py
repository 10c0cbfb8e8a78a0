"""Compiles a route's pool, retry, breaker and pacing settings into frozen specs (pure).

Precedence, per field: route `retry` > policy `retry` > built-in default; upstream `breaker` > policy
`breaker` > built-in default; a deployment's connect/first_token timeouts come from the route, then its
own upstream, then the policy (so a fallback to a slower provider keeps that provider's limits).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from proxy.policy.outcome_rules import BackoffKind, OutcomeRule, pool_attempts
from proxy.policy.plan import (
    BreakerSpec,
    DeploymentSpec,
    PacingSpec,
    RetrySpec,
    TimeoutSpec,
)
from proxy.policy.schema import (
    IDEMPOTENT_METHODS,
    Breaker,
    ExponentialBackoff,
    FixedBackoff,
    Policy,
    Retry,
    RetryRule,
    Route,
)


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def retry_spec(route: Retry | None, policy: Retry, tool: bool = False) -> RetrySpec:
    """`tool`: a `provider: http` route, whose default retries only idempotent methods."""
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
    methods = pick(lambda r: r.methods, None)
    allowed = frozenset(methods) if methods is not None else frozenset(IDEMPOTENT_METHODS) if tool else None
    spec = RetrySpec(
        attempts=pick(lambda r: r.attempts, default.attempts),
        statuses=statuses,
        connect_errors=connect,
        timeouts=timeouts,
        backoff_base=pick(lambda r: r.backoff.base if r.backoff else None, default.backoff_base),
        backoff_max=pick(lambda r: r.backoff.max if r.backoff else None, default.backoff_max),
        max_retry_after=pick(lambda r: r.max_retry_after, default.max_retry_after),
        budget_percent=pick(lambda r: r.budget.percent if r.budget else None, default.budget_percent),
        budget_min=pick(lambda r: r.budget.min_retries if r.budget else None, default.budget_min),
        methods=allowed,
    )
    form = next((layer for layer in layers if _sets_form(layer)), None)
    if form is None or form.rules is None:
        return spec
    rules = tuple(_rule(rule, spec) for rule in form.rules)
    return replace(spec, rules=rules, attempts=pool_attempts(rules))


def _sets_form(layer: Retry) -> bool:
    """The nearest layer that says what is retried decides the form: `rules`, or `attempts`/`retry_on`."""
    return layer.rules is not None or layer.attempts is not None or layer.retry_on is not None


def _rule(rule: RetryRule, spec: RetrySpec) -> OutcomeRule:
    """One compiled rule; an exponential backoff's unset base and max come from the retry's `backoff`."""
    on = rule.on
    statuses = frozenset(item for item in on if isinstance(item, int))
    kind: BackoffKind = "exponential"
    base, cap, fixed = spec.backoff_base, spec.backoff_max, 0.0
    backoff = rule.backoff
    if isinstance(backoff, FixedBackoff):
        kind, fixed = "fixed", backoff.fixed
    elif isinstance(backoff, ExponentialBackoff):
        base = _first(backoff.exponential.base, base)
        cap = _first(backoff.exponential.max, cap)
    elif backoff == "reset":
        kind = "reset"
    return OutcomeRule(
        statuses=statuses, connect_error="connect_error" in on, timeout="timeout" in on, attempts=rule.attempts,
        backoff=kind, base=base, cap=cap, fixed=fixed, max_wait=_first(rule.max_wait, spec.max_retry_after),
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
