"""Tool routes (`provider: http`) at compile time: the path prefix a route maps onto its upstream's
base_url, and limit sets that never count tokens (a tool call has no model and no usage)."""

from __future__ import annotations

from dataclasses import replace
from types import MappingProxyType

from proxy.policy.plan import LimitSet, RouteRule
from proxy.policy.schema import Route, Upstream


def prefix_of(route: Route, upstream: Upstream) -> str | None:
    """`/tools/search/*` -> `/tools/search`; None for an LLM route. (checks_tools.py has refused any other
    shape of path on a tool route.)"""
    if upstream.provider != "http":
        return None
    path = route.match.path
    glob = path if isinstance(path, str) else path[0]
    return glob.removesuffix("/*").rstrip("/")


def without_tokens(routes: tuple[RouteRule, ...]) -> tuple[RouteRule, ...]:
    """A tenant's token limit still applies to its LLM calls; on a tool route it counts requests and
    concurrency only (nothing is estimated or reserved)."""
    out = []
    for rule in routes:
        if rule.tool_prefix is not None and any(s.tokens for s in rule.limit_sets.values()):
            sets = {name: LimitSet(s.limits, False) for name, s in rule.limit_sets.items()}
            rule = replace(rule, limit_sets=MappingProxyType(sets))
        out.append(rule)
    return tuple(out)
