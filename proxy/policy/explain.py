"""`signalbox explain` and `GET /admin/explain`: why a request goes where it goes (pure).

Walks the compiled routes exactly as `Plan.resolve` does, reporting why each earlier route did not
match, then lists every setting that applies with the layer it came from (route, tenant, upstream,
a named queue, policy or default). Each section of the answer is one small function over the
compiled route (plus the validated source, which knows what was written and what defaulted), so
a new route capability adds one function to `SECTIONS`. Keys and header values are never printed:
a key is only used to find its tenant, and a base_url's password is masked.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from pydantic import BaseModel

from proxy.policy.explain_base import LIMIT_FIELDS, Context, plain, set_in, value_of
from proxy.policy.explain_dispatch import retry_section, tool_section
from proxy.policy.explain_flow import limits_section, priority_section, queue_section
from proxy.policy.load import LoadedPolicy
from proxy.policy.plan import Plan, RouteRule, TenantRule
from proxy.policy.units import format_duration, mask_userinfo
from proxy.providers.exchange import Untranslatable, choose

__all__ = ["COMPILED_SECTIONS", "LIMIT_FIELDS", "Context", "ExplainError", "compiled_section", "explain", "plain"]

# Route capabilities shown as they were compiled, when the compiled route has them (retry by its own section).
COMPILED_SECTIONS = ("deployments", "balance", "retry", "breaker", "fallbacks", "batch", "split", "cache")
# Source fields that a section below reports (or that are secret), so "other" does not repeat them.
_COVERED = {
    "name", "match", "upstream", "model", "timeouts", "keys", "api_key", "provider", "base_url", "mock",
    "limits", "on_limit", "queue", "tokens", "stream", "priority", "max_priority", "weight", "models",
    "pool", "headers", "query", "auth_header", "hide_response_headers",
}


class ExplainError(ValueError):
    pass


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
    for route in plan.routes if path == "/v1" or path.startswith("/v1/") else plan.tools:  # as ingress does
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
    if ctx.route.tool_prefix is not None:
        return "(none: a tool route)"
    return ctx.route.model_rewrite or ctx.model or "(none: the request has no model)"


def protocol_section(ctx: Context) -> str | None:
    upstream = ctx.plan.upstreams.get(ctx.route.upstream)
    if upstream is None:
        return None
    if ctx.route.tool_prefix is not None:
        return "pass (a tool route: bytes untouched both ways)"
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
        out[name] = value_of(format_duration(getattr(ctx.route.timeouts, name)), source)
    return out


def stream_section(ctx: Context) -> dict[str, Any]:
    spec = ctx.route.stream
    out = {}
    for name in ("heartbeat", "slow_client"):
        value = getattr(spec, name, None) if spec is not None else None
        if value is not None:
            out[name] = value_of(format_duration(value), "route")
        else:
            default = ctx.stream_defaults.get(name)
            out[name] = value_of(format_duration(default) if default is not None else None, "process setting")
    resumable = spec.resumable if spec is not None else None
    if resumable is not None:  # shown only when set: a route's streams are not resumable by default
        out["resumable"] = value_of(f"buffer {resumable.buffer} bytes, ttl {format_duration(resumable.ttl)}", "route")
    return out


def compiled_section(name: str) -> Callable[[Context], dict[str, Any] | None]:
    """A section for a route capability read defensively from the compiled route: shown when the
    route has it, labelled route when the policy wrote it on the route, else policy or default."""

    def section(ctx: Context) -> dict[str, Any] | None:
        value = getattr(ctx.route, name, None)
        if value is None or value == () or value == {} or (name == "split" and not ctx.path.endswith("/embeddings")):
            return None  # split limits bind embeddings requests only
        if set_in(ctx.source, name):
            source = "route"
        elif name == "deployments" and set_in(ctx.source, "upstream"):
            source = f"route (upstream: {ctx.source.upstream}, a pool of one deployment)"
        elif name == "split":
            source = "upstreams (the strictest batch_limits of the pool and fallbacks, or a vendor's known ones)"
        elif set_in(ctx.policy, name):
            source = "policy"
        else:
            source = "default"
        return value_of(plain(value), source)

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
            out.setdefault(field, []).append(value_of(value, label))
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
    ("tool", tool_section),
    *((name, retry_section if name == "retry" else compiled_section(name)) for name in COMPILED_SECTIONS),
    ("other", other_section),
)
