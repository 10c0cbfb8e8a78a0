"""Tool routes (`provider: http`) checked after the schema, each problem at the value at fault (file:line):
the path is one `PREFIX/*` glob outside the proxy's own paths (/v1, /healthz, /readyz, /metrics); a tool
route has no model, no token settings or token limits, and its pool and fallbacks are tool routes only;
an earlier tool route whose prefix covers a later one's would make it unreachable."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from proxy.policy.problems import Loc
from proxy.policy.schema import Limits, Policy, Route

if TYPE_CHECKING:
    from proxy.policy.checks import View

Finding = tuple[Loc, str]
RESERVED = ("/v1", "/healthz", "/readyz", "/metrics")
"""Paths the proxy answers itself (or sends to its LLM routes): a tool prefix may not be one or under one."""
_TOKEN_FIELDS = ("tokens_per_second", "tokens_per_minute", "tokens_per_hour", "tokens_per_day")


def is_tool(route: Route, policy: Policy) -> bool:
    """Routes to an http upstream (the shorthand's, or the first deployment's: pools are not mixed)."""
    upstream = policy.upstreams.get(route.upstream)
    return upstream is not None and upstream.provider == "http"


def tool_paths(view: View) -> Iterator[Finding]:
    seen: list[tuple[int, str, frozenset[str] | None]] = []
    for i, route in view.routes:
        if not is_tool(route, view.policy):
            continue
        path = route.match.path
        glob = path if isinstance(path, str) else path[0] if len(path) == 1 else None
        prefix = _prefix(glob)
        if prefix is None:
            yield ("routes", i, "match", "path"), (
                "a tool route (provider: http) takes one path prefix ending in '/*', such as /tools/search/*: "
                "the prefix is replaced by the upstream's base_url, the rest is carried over"
            )
            continue
        clash = next((r for r in RESERVED if prefix == r or prefix.startswith(r + "/")), None)
        if clash is not None:
            yield ("routes", i, "match", "path"), (
                f"{prefix} is {'under ' if prefix != clash else ''}{clash}, which the proxy serves itself "
                "(LLM routes, health, metrics): put tool routes on a prefix of their own, such as /tools/..."
            )
            continue
        tenants = frozenset(route.match.tenants) if route.match.tenants is not None else None
        for j, earlier, their in seen:
            if (prefix == earlier or prefix.startswith(earlier + "/")) and (their is None or (
                    tenants is not None and tenants <= their)):
                yield ("routes", i, "match", "path"), (
                    f"unreachable: routes[{j}] ({earlier}/*) comes first and takes every path under {prefix}; "
                    "routes match in order, so put the more specific route first"
                )
                break
        seen.append((i, prefix, tenants))


def _prefix(glob: str | None) -> str | None:
    if glob is None or not glob.startswith("/") or not glob.endswith("/*"):
        return None
    prefix = glob[:-2].rstrip("/")
    if not prefix or any(c in prefix for c in "*?[]"):
        return None
    return prefix


def tool_shape(view: View) -> Iterator[Finding]:
    """What a tool route cannot have: a model, token settings, an LLM upstream in its pool."""
    policy = view.policy
    for i, route in view.routes:
        providers = [policy.upstreams[d.upstream].provider for d in route.deployments or ()
                     if d.upstream in policy.upstreams]
        tool = is_tool(route, policy)
        if route.deployments and len({p == "http" for p in providers}) > 1:
            yield ("routes", i, "deployments"), (
                "a pool mixes http upstreams with LLM upstreams: a tool call cannot go to an LLM API, nor the reverse"
            )
        if not tool:
            continue
        if route.model is not None:
            yield ("routes", i, "model"), "a tool route has no model to rewrite (provider: http): remove `model`"
        for j, deployment in enumerate(route.deployments or ()):
            if deployment.model is not None:
                yield ("routes", i, "deployments", j, "model"), "a tool upstream has no model: remove `model`"
        if "model" in route.match.model_fields_set:
            yield ("routes", i, "match", "model"), "tool routes match on the path only: remove match.model"
        if "tokens" in route.model_fields_set:
            yield ("routes", i, "tokens"), "a tool route counts no tokens (provider: http): remove `tokens`"
        if route.limits is not None:
            yield from _token_limits(route.limits, ("routes", i, "limits"))
            if route.limits.per_tenant is not None:
                yield from _token_limits(route.limits.per_tenant, ("routes", i, "limits", "per_tenant"))


def tool_upstreams(view: View) -> Iterator[Finding]:
    for name, upstream in view.policy.upstreams.items():
        if upstream.provider == "http" and upstream.limits is not None:
            yield from _token_limits(upstream.limits, ("upstreams", name, "limits"))


def _token_limits(limits: Limits, at: Loc) -> Iterator[Finding]:
    for field in _TOKEN_FIELDS:
        if getattr(limits, field) is not None:
            yield at + (field,), (
                f"{field} cannot apply to a tool (provider: http): its calls have no model and no usage to "
                "count; limit requests (requests_per_*) and concurrency (concurrent) instead"
            )


def tool_fallbacks(view: View) -> Iterator[Finding]:
    by_name = {route.name: route for _, route in view.routes}
    policy = view.policy
    for i, route in view.routes:
        tool = is_tool(route, policy)
        for j, name in enumerate(route.fallbacks):
            other = by_name.get(name)
            if other is not None and is_tool(other, policy) != tool:
                kinds = ("a tool route", "an LLM route") if tool else ("an LLM route", "a tool route")
                yield ("routes", i, "fallbacks", j), f"{kinds[0]} cannot fall back to {kinds[1]} ('{name}')"


TOOL_CHECKS: tuple[Callable[[View], Iterator[Finding]], ...] = (tool_paths, tool_shape, tool_upstreams,
                                                               tool_fallbacks)
