"""Validated `Policy` -> immutable `Plan`: matchers, key index and inherited settings resolved once."""

from __future__ import annotations

from types import MappingProxyType

from proxy.policy.load import LoadedPolicy
from proxy.policy.plan import (
    IdentifySpec,
    Matcher,
    MockFaultPlan,
    MockPlan,
    Plan,
    RouteRule,
    TenantRule,
    TimeoutSpec,
    UpstreamSpec,
    key_digest,
)
from proxy.policy.schema import MockSpec, Policy, Route, Timeouts, Upstream

_DEFAULT_AUTH = {"openai": "authorization", "anthropic": "x-api-key", "mock": "authorization"}


def compile_plan(loaded: LoadedPolicy) -> Plan:
    policy = loaded.policy
    upstreams = {name: _upstream(name, spec) for name, spec in policy.upstreams.items()}
    routes = tuple(_route(i, r, policy) for i, r in enumerate(policy.routes))
    tenants = {
        name: TenantRule(name, Matcher(tuple(t.models)) if t.models is not None else None)
        for name, t in policy.tenants.items()
    }
    key_index = {
        key_digest(key.get_secret_value()): name for name, t in policy.tenants.items() for key in t.keys
    }
    ident = policy.identify
    return Plan(
        digest=loaded.digest,
        files=loaded.files,
        identify=IdentifySpec(ident.mode, ident.header.lower(), ident.tenant),
        upstreams=MappingProxyType(upstreams),
        tenants=MappingProxyType(tenants),
        routes=routes,
        key_index=MappingProxyType(key_index),
        max_body_size=policy.max_body_size,
    )


def _upstream(name: str, spec: Upstream) -> UpstreamSpec:
    return UpstreamSpec(
        name=name,
        provider=spec.provider,
        base_url=spec.base_url.rstrip("/") if spec.base_url else None,
        api_key=spec.api_key.get_secret_value() if spec.api_key else None,
        auth_header=spec.auth_header or _DEFAULT_AUTH[spec.provider],
        headers=tuple((k.lower(), v) for k, v in spec.headers.items()),
        query=tuple(spec.query.items()),
        max_connections=spec.pool.max_connections,
        keepalive=spec.pool.keepalive,
        mock=_mock(spec.mock or MockSpec()) if spec.provider == "mock" else None,
    )


def _mock(spec: MockSpec) -> MockPlan:
    faults = tuple(
        MockFaultPlan(f.kind, f.probability, f.status, f.retry_after, f.stall, f.after_events) for f in spec.faults
    )
    return MockPlan(spec.ttft, spec.token_delay, spec.output_tokens, spec.embedding_dim, faults, spec.seed)


def _route(index: int, route: Route, policy: Policy) -> RouteRule:
    paths = _as_tuple(route.match.path)
    models = _as_tuple(route.match.model)
    upstream = policy.upstreams[route.upstream]
    return RouteRule(
        name=route.name,
        index=index,
        paths=Matcher(paths),
        models=Matcher(models),
        tenants=frozenset(route.match.tenants) if route.match.tenants is not None else None,
        upstream=route.upstream,
        model_rewrite=route.model,
        timeouts=inherit_timeouts(route.timeouts, upstream.timeouts, policy.timeouts),
        advertised=tuple(m for m in models if not any(c in m for c in "*?[")),
    )


def inherit_timeouts(*layers: Timeouts) -> TimeoutSpec:
    """The first layer that sets a field wins (route, then upstream, then policy), then the defaults."""
    defaults = TimeoutSpec()
    values = {}
    for field_name in ("connect", "first_token", "idle", "total"):
        chosen = next((getattr(t, field_name) for t in layers if getattr(t, field_name) is not None), None)
        values[field_name] = chosen if chosen is not None else getattr(defaults, field_name)
    return TimeoutSpec(**values)


def _as_tuple(value: str | list[str]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)
