"""`signalbox explain` and `GET /admin/explain`: why a request goes where it goes (pure).

Walks the compiled routes exactly as `Plan.resolve` does, reporting why each earlier route did not
match, then lists every setting that applies with the layer it came from (route, tenant, upstream,
a named queue, policy or default). Each section of the answer is one small function over the
compiled route (plus the validated source, which knows what was written and what defaulted), so
a new route capability adds one function to `SECTIONS`. Keys and header values are never printed:
a key is only used to find its tenant, and a base_url's password is masked.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from proxy.policy.load import LoadedPolicy
from proxy.policy.plan import Limit, Matcher, Plan, RouteRule, TenantRule
from proxy.policy.rates import RATE_FIELDS
from proxy.policy.schema import Policy, Route, Tenant, Upstream
from proxy.policy.units import format_duration, mask_userinfo
from proxy.providers.exchange import Untranslatable, choose

# Route capabilities shown as they were compiled, when the compiled route has them.
COMPILED_SECTIONS = ("deployments", "balance", "retry", "breaker", "fallbacks", "batch")
# Source fields that a section below reports (or that are secret), so "other" does not repeat them.
_COVERED = {
    "name", "match", "upstream", "model", "timeouts", "keys", "api_key", "provider", "base_url", "mock",
    "limits", "on_limit", "queue", "tokens", "stream", "priority", "max_priority", "weight", "models",
    "pool", "headers", "query", "auth_header", "hide_response_headers",
}
LIMIT_FIELDS = tuple(name for name, *_ in RATE_FIELDS) + ("concurrent",)


class ExplainError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Context:
    """Everything a section may look at for one (tenant, model, path)."""

    plan: Plan
    policy: Policy
    route: RouteRule
    tenant: TenantRule
    model: str
    path: str
    stream_defaults: Mapping[str, float]

    @property
    def source(self) -> Route:
        return self.policy.routes[self.route.index]

    @property
    def tenant_source(self) -> Tenant:
        return self.policy.tenants[self.tenant.name]

    @property
    def upstream_source(self) -> Upstream | None:
        return self.policy.upstreams.get(self.route.upstream)


def explain(
    loaded: LoadedPolicy,
    plan: Plan,
    *,
    model: str = "",
    path: str = "/v1/chat/completions",
    tenant: str | None = None,
    key: str | None = None,
    stream_defaults: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """The answer as plain JSON-able data; `format_text` renders it for a terminal. An empty model is a
    request without one (GET /v1/models, a route that matches on the path alone)."""
    rule, identified_by = _tenant(plan, tenant, key)
    answer: dict[str, Any] = {
        "request": {"path": path, "model": model},
        "tenant": {"name": rule.name, "identified_by": identified_by},
        "policy": plan.digest[:12],
    }
    if rule.models is not None and model and not rule.models(model):
        answer["route"] = None
        answer["why"] = f"tenant '{rule.name}' may only use models matching {list(rule.models.patterns)}"
        return answer
    skipped = []
    chosen: RouteRule | None = None
    for route in plan.routes:
        reason = _mismatch(route, path, model, rule.name)
        if reason is None:
            chosen = route
            break
        skipped.append({"route": route.name, "reason": reason})
    answer["skipped"] = skipped
    if chosen is None:
        answer["route"] = None
        answer["why"] = "no route matches; the client gets 404 with the models it may use"
        answer["models_available"] = plan.models_for(rule)
        return answer
    context = Context(plan, loaded.policy, chosen, rule, model, path, stream_defaults or {})
    for name, section in SECTIONS:
        value = section(context)
        if value is not None:
            answer[name] = value
    return answer


# --- who and which route ---------------------------------------------------------------------------


def _tenant(plan: Plan, tenant: str | None, key: str | None) -> tuple[TenantRule, str]:
    if key is not None:
        found = plan.tenant_for_key(key)
        if found is None:
            raise ExplainError("no tenant owns this key")
        return found, "key"
    if tenant is not None:
        if tenant not in plan.tenants:
            raise ExplainError(f"unknown tenant '{tenant}' (tenants: {', '.join(plan.tenants) or 'none'})")
        return plan.tenants[tenant], "name"
    if plan.identify.tenant is not None:
        return plan.tenants[plan.identify.tenant], f"identify.{plan.identify.mode}"
    if len(plan.tenants) == 1:
        return next(iter(plan.tenants.values())), "the only tenant"
    names = ", ".join(plan.tenants) or "none"
    raise ExplainError(f"name a tenant (--tenant) or a key (--key); tenants: {names}")


def _mismatch(route: RouteRule, path: str, model: str, tenant: str) -> str | None:
    if route.tenants is not None and tenant not in route.tenants:
        return f"match.tenants {sorted(route.tenants)} does not include '{tenant}'"
    if not route.paths(path):
        return f"match.path {list(route.paths.patterns)} does not match {path}"
    if not route.models(model):
        asked = f"'{model}'" if model else "a request without a model"
        return f"match.model {list(route.models.patterns)} does not match {asked}"
    return None


def _value(value: Any, source: str) -> dict[str, Any]:
    return {"value": value, "from": source}


def _set_in(model: BaseModel | None, field: str) -> bool:
    return model is not None and field in model.model_fields_set


# --- sections: each one small function over the compiled route -----------------------------------------


def route_section(ctx: Context) -> dict[str, Any]:
    route = ctx.route
    tenants = "any tenant" if route.tenants is None else f"tenants {sorted(route.tenants)}"
    model = f"model '{ctx.model}'" if ctx.model else "no model"
    why = (
        f"first route in order whose match holds: path {ctx.path} ~ {list(route.paths.patterns)}, "
        f"{model} ~ {list(route.models.patterns)}, {tenants}"
    )
    return {"name": route.name, "index": route.index, "why": why}


def upstream_section(ctx: Context) -> dict[str, Any] | None:
    upstream = ctx.plan.upstreams.get(getattr(ctx.route, "upstream", None) or "")
    if upstream is None:
        return None
    source = ctx.policy.upstreams.get(upstream.name)
    if source is not None and source.base_url:  # as written, with a password in it masked
        base_url = mask_userinfo(source.base_url.rstrip("/"))
    else:
        base_url = upstream.base_url or "(in-process mock)"
    return {
        "name": upstream.name,
        "provider": upstream.provider,
        "base_url": base_url,
        "auth_header": upstream.auth_header,
        "extra_headers": [name for name, _ in upstream.headers],  # names only: values may be secrets
        "query": [name for name, _ in upstream.query],
        "hide_response_headers": list(hidden.patterns) if (hidden := upstream.hide_response_headers) else [],
        "pool": {
            "max_connections": upstream.max_connections,
            "keepalive": format_duration(upstream.keepalive),
        },
    }


def model_section(ctx: Context) -> str:
    return ctx.route.model_rewrite or ctx.model or "(none: the request has no model)"


def protocol_section(ctx: Context) -> str | None:
    upstream = ctx.plan.upstreams.get(ctx.route.upstream)
    if upstream is None:
        return None
    try:
        return choose(ctx.path, upstream.provider).kind
    except Untranslatable as exc:
        return f"refused: {exc}"


def timeouts_section(ctx: Context) -> dict[str, dict[str, Any]]:
    """The first layer that sets a field wins: route, then upstream, then policy, then the default."""
    layers = (
        ("route", ctx.source.timeouts),
        ("upstream", ctx.upstream_source.timeouts if ctx.upstream_source is not None else None),
        ("policy", ctx.policy.timeouts),
    )
    out = {}
    for name in ("connect", "first_token", "idle", "total"):
        set_by = (label for label, t in layers if t is not None and getattr(t, name) is not None)
        source = next(set_by, "default")
        out[name] = _value(format_duration(getattr(ctx.route.timeouts, name)), source)
    return out


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
    on_limit = _value(ctx.route.on_limit, "route" if _set_in(ctx.source, "on_limit") else "default")
    tokens = ctx.route.default_max_tokens
    default_max = _value(tokens, "route" if _set_in(ctx.source, "tokens") else "default")
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
        return _value(value, where if _set_in(source, name) else "default")

    return {
        "name": _value(spec.name, "route"),
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
        "class": _value(classes[tenant.priority], "tenant" if source.priority else "default (middle class)"),
        "max_class": _value(
            classes[tenant.max_priority], "tenant" if source.max_priority else "default (its class)"
        ),
        "weight": _value(source.weight, "tenant" if _set_in(source, "weight") else "default"),
        "classes": list(classes),
    }


def stream_section(ctx: Context) -> dict[str, Any]:
    spec = ctx.route.stream
    out = {}
    for name in ("heartbeat", "slow_client"):
        value = getattr(spec, name, None) if spec is not None else None
        if value is not None:
            out[name] = _value(format_duration(value), "route")
        else:
            default = ctx.stream_defaults.get(name)
            out[name] = _value(format_duration(default) if default is not None else None, "process setting")
    resumable = spec.resumable if spec is not None else None
    if resumable is not None:  # shown only when set: a route's streams are not resumable by default
        out["resumable"] = _value(f"buffer {resumable.buffer} bytes, ttl {format_duration(resumable.ttl)}", "route")
    return out


def compiled_section(name: str) -> Callable[[Context], dict[str, Any] | None]:
    """A section for a route capability read defensively from the compiled route: shown when the
    route has it, labelled route when the policy wrote it on the route, else policy or default."""

    def section(ctx: Context) -> dict[str, Any] | None:
        value = getattr(ctx.route, name, None)
        if value is None or value == () or value == {}:
            return None
        if _set_in(ctx.source, name):
            source = "route"
        elif name == "deployments" and _set_in(ctx.source, "upstream"):
            source = f"route (upstream: {ctx.source.upstream}, a pool of one deployment)"
        elif _set_in(ctx.policy, name):
            source = "policy"
        else:
            source = "default"
        return _value(plain(value), source)

    return section


def other_section(ctx: Context) -> dict[str, list[dict[str, Any]]] | None:
    """Anything else written on the route, the tenant or the upstream, labelled with its layer."""
    covered = _COVERED | {n for n in COMPILED_SECTIONS if getattr(ctx.route, n, None) is not None}
    layers: list[tuple[str, BaseModel | None]] = [
        ("route", ctx.source),
        ("tenant", ctx.tenant_source),
        ("upstream", ctx.upstream_source),
    ]
    out: dict[str, list[dict[str, Any]]] = {}
    for label, model in layers:
        if model is None:
            continue
        values = model.model_dump(mode="json", exclude_defaults=True, exclude=covered)
        for field, value in values.items():
            out.setdefault(field, []).append(_value(value, label))
    return out or None


SECTIONS: tuple[tuple[str, Callable[[Context], Any]], ...] = (
    ("route", route_section),
    ("upstream", upstream_section),
    ("model_sent_upstream", model_section),
    ("protocol", protocol_section),
    ("timeouts", timeouts_section),
    ("limits", limits_section),
    ("queue", queue_section),
    ("priority", priority_section),
    ("stream", stream_section),
    *((name, compiled_section(name)) for name in COMPILED_SECTIONS),
    ("other", other_section),
)


def plain(value: Any) -> Any:
    """Compiled values (frozen dataclasses, matchers, tuples) as JSON-able data."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.repr}
    if isinstance(value, Matcher):
        return list(value.patterns)
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted((plain(v) for v in value), key=str)
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)
