"""`explain` sections for admission (pure): the limits a request meets (admission's and its upstreams'),
its queue, and its priority class, each value with the layer it came from."""

from __future__ import annotations

from typing import Any

from proxy.policy.explain_base import LIMIT_FIELDS, Context, set_in, value_of
from proxy.policy.plan import Limit
from proxy.policy.units import format_duration

UPSTREAM_LIMITS = (
    "an upstream's limits are checked per attempt, once dispatch has chosen a deployment, and count only the "
    "calls that upstream receives (retries and fallbacks included); a deployment whose upstream is over its "
    "limit is skipped for that attempt and another of the pool is tried, then the fallbacks; when none can "
    "take the request, on_limit queue waits for capacity (up to the queue's max_wait and timeouts.total), "
    "reject answers 429 with retry-after"
)


def limits_section(ctx: Context) -> dict[str, Any]:
    """Every limit the tenant's request may meet here, each with the layer that set it and when it is
    checked: at admission (tenant, route, route per tenant), or per attempt (an upstream's, on the
    deployments, fallbacks' included, that send to it)."""
    limit_set = ctx.route.limit_sets.get(ctx.tenant.name) if ctx.route.limit_sets else None
    checks = [_limit(limit) for limit in (limit_set.limits if limit_set is not None else ())]
    upstream_checks = _upstream_limits(ctx)
    on_limit = value_of(ctx.route.on_limit, "route" if set_in(ctx.source, "on_limit") else "default")
    tokens = ctx.route.default_max_tokens
    default_max = value_of(tokens, "route" if set_in(ctx.source, "tokens") else "default")
    out = {"checks": checks + upstream_checks, "on_limit": on_limit, "default_max_tokens": default_max}
    if upstream_checks:
        out["upstream_limits"] = UPSTREAM_LIMITS
    return out


def _upstream_limits(ctx: Context) -> list[dict[str, Any]]:
    """One check per limited upstream the route's pool (then its fallbacks' pools) can send to."""
    found: dict[str, dict[str, Any]] = {}
    pools = [(ctx.route, "")]
    pools += [(rule, f" (fallback {name})") for name in ctx.route.fallbacks
              if (rule := ctx.plan.routes_by_name.get(name)) is not None]
    for rule, where in pools:
        for deployment in rule.deployments:
            if deployment.limit is None:
                continue
            check = found.get(deployment.limit.key)
            if check is None:
                check = found[deployment.limit.key] = {**_limit(deployment.limit, "per attempt"), "deployments": []}
            check["deployments"].append(deployment.id + where)
    return list(found.values())


def _limit(limit: Limit, checked: str = "admission") -> dict[str, Any]:
    kind, _, rest = limit.key.partition(":")
    route_layer = "route per tenant" if "/" in rest else "route"
    source = {"tenant": "tenant", "upstream": "upstream"}.get(kind, route_layer)
    out: dict[str, Any] = {"key": limit.key, "scope": limit.scope, "from": source, "checked": checked}
    for field in LIMIT_FIELDS:
        value = getattr(limit.spec, field)
        if value is not None:
            out[field] = value
    return out


def queue_section(ctx: Context) -> dict[str, Any] | None:
    spec = ctx.route.queue
    if spec is None:
        return None
    source = ctx.policy.queues.get(spec.name)
    where = f"queues.{spec.name}"

    def field(name: str, value: Any) -> dict[str, Any]:
        return value_of(value, where if set_in(source, name) else "default")

    return {
        "name": value_of(spec.name, "route"),
        "concurrency": field("concurrency", spec.concurrency),
        "max_waiting": field("max_waiting", spec.max_waiting),
        "max_wait": field("max_wait", format_duration(spec.max_wait)),
        "ageing": field("ageing", format_duration(spec.ageing) if spec.ageing is not None else None),
        "heartbeat_while_queued": field("heartbeat_while_queued", spec.heartbeat),
        "headroom_by_class": field("reserve", _reserve(ctx.plan.priorities, spec.headroom)),
    }


def _reserve(classes: tuple[str, ...], headroom: tuple[float, ...]) -> dict[str, str] | None:
    """The share of every limit a request of each class must leave free (its `reserve`s above it)."""
    if not headroom:
        return None
    return {cls: f"{share * 100:g}%" for cls, share in zip(classes, headroom, strict=True)}


def priority_section(ctx: Context) -> dict[str, Any]:
    tenant, source, classes = ctx.tenant, ctx.tenant_source, ctx.plan.priorities
    return {
        "class": value_of(classes[tenant.priority], "tenant" if source.priority else "default (middle class)"),
        "max_class": value_of(
            classes[tenant.max_priority], "tenant" if source.max_priority else "default (its class)"
        ),
        "weight": value_of(source.weight, "tenant" if set_in(source, "weight") else "default"),
        "classes": list(classes),
    }
