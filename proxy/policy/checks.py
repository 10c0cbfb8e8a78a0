"""References between sections, checked after the schema: each check is a small generator of
(data path, message) over a `View` of the validated policy.

When the schema rejects some entries, the loader validates what is left (`salvage`) and still runs these
checks, so one `validate` run reports every problem. A name defined by a rejected entry still counts as
defined (its own problem is already reported), and a rejected route is skipped.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from proxy.policy import reserve
from proxy.policy.checks_retry import retry_findings
from proxy.policy.checks_tools import TOOL_CHECKS
from proxy.policy.problems import Loc
from proxy.policy.schema import DEFAULT_AUTH_HEADER, Policy, Route, Upstream
from proxy.policy.units import split_userinfo

Finding = tuple[Loc, str]
NAMED_SECTIONS = ("upstreams", "tenants", "queues")


@dataclass(frozen=True, slots=True)
class View:
    policy: Policy
    routes: tuple[tuple[int, Route], ...]
    """The valid routes, each with its index in the files (the index problems are reported under)."""
    names: Mapping[str, Collection[str]]
    """Every name written in `upstreams`, `tenants`, `queues` and route `name`s, valid entry or not."""

    @classmethod
    def of(cls, policy: Policy, merged: Mapping[str, Any], route_index: list[int] | None = None) -> View:
        index = route_index if route_index is not None else list(range(len(policy.routes)))
        names: dict[str, Collection[str]] = {
            s: list(merged[s]) if isinstance(merged.get(s), dict) else [] for s in NAMED_SECTIONS
        }
        raw = merged.get("routes")
        raw_routes = raw if isinstance(raw, list) else []
        names["routes"] = [r["name"] for r in raw_routes if isinstance(r, dict) and isinstance(r.get("name"), str)]
        return cls(policy, tuple(zip(index, policy.routes, strict=True)), names)


def salvage(merged: dict[str, Any], bad: list[Loc]) -> View | None:
    """The policy without what the schema rejected: first only the rejected fields of each entry (a route
    keeps its other references checked), then the whole entries (a named entry, a route, or else a whole
    section, which then takes its default); None when even that does not validate."""
    for depth in (3, 2):
        pruned, keep = _pruned(merged, bad, depth)
        try:
            policy = Policy.model_validate(pruned)
        except ValidationError:
            continue
        return View.of(policy, merged, keep)
    return None


def _pruned(merged: dict[str, Any], bad: list[Loc], depth: int) -> tuple[dict[str, Any], list[int]]:
    pruned = copy.deepcopy(merged)  # only an invalid policy gets here, and policy data is small
    dropped: set[int] = set()
    for loc in bad:
        cut = loc[:depth] if loc and loc[0] in ("routes", *NAMED_SECTIONS) else loc[:1]
        if len(cut) == 2 and cut[0] == "routes" and isinstance(cut[1], int):
            dropped.add(cut[1])
            continue
        parent: Any = pruned
        for part in cut[:-1]:
            parent = _child(parent, part)
        if isinstance(parent, dict) and cut:
            parent.pop(cut[-1], None)
    routes = pruned.get("routes")
    keep = [i for i in range(len(routes)) if i not in dropped] if isinstance(routes, list) else []
    if isinstance(routes, list):
        pruned["routes"] = [routes[i] for i in keep]
    return pruned, keep


def _child(node: Any, part: str | int) -> Any:
    if isinstance(node, dict):
        return node.get(part)
    if isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
        return node[part]
    return None


def route_names(view: View) -> Iterator[Finding]:
    first: dict[str, int] = {}
    for i, route in view.routes:
        if route.name in first:
            message = f"duplicate route name '{route.name}' (first used by routes[{first[route.name]}])"
            yield ("routes", i, "name"), message
        first.setdefault(route.name, i)


def route_targets(view: View) -> Iterator[Finding]:
    """Each route's upstream (or deployments' upstreams), tenants and queue are defined."""
    upstreams, tenants, queues = (view.names[s] for s in NAMED_SECTIONS)
    for i, route in view.routes:
        if route.deployments is None and route.upstream not in upstreams:
            yield ("routes", i, "upstream"), undefined("upstream", route.upstream, upstreams)
        for j, deployment in enumerate(route.deployments or ()):
            if deployment.upstream not in upstreams:
                yield ("routes", i, "deployments", j, "upstream"), undefined("upstream", deployment.upstream, upstreams)
        for j, tenant in enumerate(route.match.tenants or ()):
            if tenant not in tenants:
                yield ("routes", i, "match", "tenants", j), undefined("tenant", tenant, tenants)
        if route.queue is not None and route.queue not in queues:
            yield ("routes", i, "queue"), undefined("queue", route.queue, queues)


def fallbacks(view: View) -> Iterator[Finding]:
    for i, route in view.routes:
        for j, fallback in enumerate(route.fallbacks):
            if fallback not in view.names["routes"]:
                yield ("routes", i, "fallbacks", j), undefined("route", fallback, view.names["routes"])


def tenant_priorities(view: View) -> Iterator[Finding]:
    classes = view.policy.priorities
    for name, rule in view.policy.tenants.items():
        for key in ("priority", "max_priority"):
            value = getattr(rule, key)
            if value is not None and value not in classes:
                yield ("tenants", name, key), f"unknown priority class '{value}' (priorities: {', '.join(classes)})"
        own, top = rule.priority, rule.max_priority
        if own in classes and top in classes and classes.index(top) > classes.index(own):
            yield ("tenants", name, "max_priority"), f"'{top}' is below the tenant's own priority '{own}'"


def queue_reserves(view: View) -> Iterator[Finding]:
    found: list[Finding] = []
    reserve.check(view.policy, lambda loc, message: found.append((loc, message)))
    yield from found


def upstream_authorization(view: View) -> Iterator[Finding]:
    for name, upstream in view.policy.upstreams.items():
        conflict = second_authorization(upstream)
        if conflict:
            yield ("upstreams", name, "base_url"), conflict


def identify_tenant(view: View) -> Iterator[Finding]:
    tenant = view.policy.identify.tenant
    if tenant is not None and tenant not in view.names["tenants"]:
        yield ("identify", "tenant"), undefined("tenant", tenant, view.names["tenants"])


def shared_keys(view: View) -> Iterator[Finding]:
    owners: dict[str, str] = {}
    for name, rule in view.policy.tenants.items():
        for j, tenant_key in enumerate(rule.keys):
            secret = tenant_key.get_secret_value()
            if secret in owners:
                yield ("tenants", name, "keys", j), f"this key is also a key of tenant '{owners[secret]}'"
            owners.setdefault(secret, name)


def retry_rules(view: View) -> Iterator[Finding]:
    yield from retry_findings(view.policy.retry, ("retry",))
    for i, route in view.routes:
        yield from retry_findings(route.retry, ("routes", i, "retry"))


CHECKS: tuple[Callable[[View], Iterator[Finding]], ...] = (
    route_names, route_targets, fallbacks, tenant_priorities, queue_reserves, upstream_authorization,
    identify_tenant, shared_keys, retry_rules, *TOOL_CHECKS,
)


def cross_check(view: View) -> Iterator[Finding]:
    for check in CHECKS:
        yield from check(view)


def second_authorization(upstream: Upstream) -> str | None:
    """base_url's `user:password@` is sent as `Authorization: Basic`; a second Authorization is ambiguous."""
    if upstream.base_url is None or split_userinfo(upstream.base_url)[1] is None:
        return None
    basic = "base_url carries credentials (user:password@, sent as Authorization: Basic)"
    key_header = upstream.auth_header or DEFAULT_AUTH_HEADER[upstream.provider]
    if upstream.api_key is not None and key_header == "authorization":
        return (
            f"{basic} and api_key is sent in the Authorization header too: keep one, or send the key in "
            "another header (auth_header: api-key or x-api-key)"
        )
    if any(header.lower() == "authorization" for header in upstream.headers):
        return f"{basic} and headers sets Authorization too: keep one"
    return None


def undefined(kind: str, name: str, defined: Collection[str]) -> str:
    hint = difflib.get_close_matches(name, list(defined), n=1, cutoff=0.6)
    if hint:
        return f"undefined {kind} '{name}'; did you mean '{hint[0]}'?"
    known = ", ".join(sorted(defined)) or "none defined"
    return f"undefined {kind} '{name}' (defined: {known})"
