"""What every `explain` section works from (pure): the context of one explained request, and the helpers
that label a value with the layer it came from and turn compiled values into JSON-able data. The sections
live by concern in explain.py (route, upstream, timeouts, stream, compiled capabilities), explain_flow.py
(limits, queue, priority) and explain_dispatch.py (retry, tool routes)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from proxy.policy.plan import Matcher, Plan, RouteRule, TenantRule
from proxy.policy.rates import RATE_FIELDS
from proxy.policy.schema import Policy, Route, Tenant, Upstream

LIMIT_FIELDS = tuple(name for name, *_ in RATE_FIELDS) + ("concurrent",)


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


def value_of(value: Any, source: str) -> dict[str, Any]:
    return {"value": value, "from": source}


def set_in(model: BaseModel | None, field: str) -> bool:
    return model is not None and field in model.model_fields_set


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
