"""`signalbox explain` and `GET /admin/explain`: why a request goes where it goes (pure).

Walks the compiled routes exactly as `Plan.resolve` does, reporting why each earlier route did not
match, then lists every setting that applies with the layer it came from (route, tenant, upstream,
policy or default). Keys are never printed: a key is only used to find its tenant.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from proxy.policy.load import LoadedPolicy
from proxy.policy.plan import Plan, RouteRule, TenantRule
from proxy.policy.units import format_duration
from proxy.providers.exchange import Untranslatable, choose

# Route/tenant/upstream fields shown elsewhere in the answer (or secret), not under "settings".
_SHOWN = {"name", "match", "upstream", "model", "timeouts", "keys", "api_key", "provider", "base_url", "mock"}


class ExplainError(ValueError):
    pass


def explain(
    loaded: LoadedPolicy,
    plan: Plan,
    *,
    model: str,
    path: str = "/v1/chat/completions",
    tenant: str | None = None,
    key: str | None = None,
) -> dict[str, Any]:
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
    answer["route"] = {"name": chosen.name, "index": chosen.index, "why": _why(chosen, path, model)}
    upstream = plan.upstreams[chosen.upstream]
    answer["upstream"] = {
        "name": upstream.name,
        "provider": upstream.provider,
        "base_url": upstream.base_url or "(in-process mock)",
        "auth_header": upstream.auth_header,
        "pool": {"max_connections": upstream.max_connections, "keepalive": format_duration(upstream.keepalive)},
    }
    answer["model_sent_upstream"] = chosen.model_rewrite or model
    try:
        answer["protocol"] = choose(path, upstream.provider).kind
    except Untranslatable as exc:
        answer["protocol"] = f"refused: {exc}"
    answer["timeouts"] = _timeouts(loaded, chosen)
    answer["settings"] = _settings(loaded, chosen, rule.name)
    return answer


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
    raise ExplainError("name a tenant (--tenant) or a key (--key)")


def _mismatch(route: RouteRule, path: str, model: str, tenant: str) -> str | None:
    if route.tenants is not None and tenant not in route.tenants:
        return f"match.tenants {sorted(route.tenants)} does not include '{tenant}'"
    if not route.paths(path):
        return f"match.path {list(route.paths.patterns)} does not match {path}"
    if not route.models(model):
        return f"match.model {list(route.models.patterns)} does not match '{model}'"
    return None


def _why(route: RouteRule, path: str, model: str) -> str:
    tenants = "any tenant" if route.tenants is None else f"tenants {sorted(route.tenants)}"
    return (
        f"first route in order whose match holds: path {path} ~ {list(route.paths.patterns)}, "
        f"model '{model}' ~ {list(route.models.patterns)}, {tenants}"
    )


def _timeouts(loaded: LoadedPolicy, route: RouteRule) -> dict[str, dict[str, str]]:
    spec = loaded.policy.routes[route.index]
    layers = (
        ("route", spec.timeouts),
        ("upstream", loaded.policy.upstreams[route.upstream].timeouts),
        ("policy", loaded.policy.timeouts),
    )
    out = {}
    for name in ("connect", "first_token", "idle", "total"):
        source = next((label for label, t in layers if getattr(t, name) is not None), "default")
        out[name] = {"value": format_duration(getattr(route.timeouts, name)), "from": source}
    return out


def _settings(loaded: LoadedPolicy, route: RouteRule, tenant: str) -> dict[str, Any]:
    """Every other section set on the route, the tenant or the upstream, labelled with its layer."""
    layers: list[tuple[str, BaseModel]] = [
        ("route", loaded.policy.routes[route.index]),
        ("tenant", loaded.policy.tenants[tenant]),
        ("upstream", loaded.policy.upstreams[route.upstream]),
    ]
    out: dict[str, Any] = {}
    for label, model in layers:
        values = model.model_dump(mode="json", exclude_defaults=True, exclude=_SHOWN)
        for field, value in values.items():
            out.setdefault(field, []).append({"from": label, "value": value})
    return out


def format_text(answer: dict[str, Any]) -> str:
    """A readable rendering for the terminal."""
    lines = [
        f"request: {answer['request']['path']} model={answer['request']['model']!r}",
        f"tenant:  {answer['tenant']['name']} (identified by {answer['tenant']['identified_by']})",
    ]
    for skip in answer.get("skipped", ()):
        lines.append(f"  skipped route {skip['route']}: {skip['reason']}")
    route = answer.get("route")
    if route is None:
        lines.append(f"route:   none — {answer.get('why', '')}")
        return "\n".join(lines)
    up = answer["upstream"]
    lines += [
        f"route:   {route['name']} (#{route['index']}): {route['why']}",
        f"upstream: {up['name']} ({up['provider']}, {up['base_url']}), model sent: {answer['model_sent_upstream']}",
        f"protocol: {answer['protocol']}",
        "timeouts: "
        + ", ".join(f"{k}={v['value']} (from {v['from']})" for k, v in answer["timeouts"].items()),
    ]
    for field, entries in answer["settings"].items():
        for entry in entries:
            lines.append(f"{field} (from {entry['from']}): {entry['value']}")
    return "\n".join(lines)
