"""Validated `Policy` -> immutable `Plan`: matchers, key index and inherited settings resolved once."""

from __future__ import annotations

import base64
from dataclasses import fields, replace
from types import MappingProxyType

from proxy.policy import batch_limits, reserve, resilience, tools
from proxy.policy.cache_rule import cache_rule
from proxy.policy.load import LoadedPolicy
from proxy.policy.plan import (
    BatchRule,
    DeploymentSpec,
    IdentifySpec,
    Limit,
    LimitSet,
    LimitSpec,
    Matcher,
    MockFaultPlan,
    MockPlan,
    Plan,
    QueueSpec,
    ResumableSpec,
    RouteRule,
    StateRule,
    StreamSpec,
    TenantRule,
    TimeoutSpec,
    UpstreamSpec,
    key_digest,
)
from proxy.policy.redact import Redactor
from proxy.policy.schema import (
    DEFAULT_AUTH_HEADER,
    Batch,
    Limits,
    MockSpec,
    Policy,
    Route,
    State,
    StreamOptions,
    Timeouts,
    Upstream,
)
from proxy.policy.secrets import policy_secrets, upstream_credentials
from proxy.policy.sent_headers import sent_headers
from proxy.policy.units import split_userinfo
from proxy.providers.exchange import DEFAULT_MAX_TOKENS as ANTHROPIC_DEFAULT_MAX_TOKENS


def compile_plan(loaded: LoadedPolicy) -> Plan:
    policy = loaded.policy
    upstreams = {name: _upstream(name, spec) for name, spec in policy.upstreams.items()}
    splits = _splits(policy)
    routes = tuple(_route(i, r, policy, splits[i]) for i, r in enumerate(policy.routes))
    tenants = {
        name: TenantRule(name, Matcher(tuple(t.models)) if t.models is not None else None)
        for name, t in policy.tenants.items()
    }
    key_index = {
        key_digest(key.get_secret_value()): name for name, t in policy.tenants.items() for key in t.keys
    }
    upstreams, routes, tenants = _admission(policy, upstreams, routes, tenants)
    routes = tools.without_tokens(routes)
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
        max_buffered_response=policy.max_buffered_response,
        cache_memory=policy.cache_memory,
        priorities=tuple(policy.priorities),
        queues=MappingProxyType(_queues(policy)),
        state=_state(policy.state),
        routes_by_name=MappingProxyType({r.name: r for r in routes}),
        secrets=policy_secrets(policy),
        tools=tuple(r for r in routes if r.tool_prefix is not None),
        stream_socket=policy.stream_socket,
        realtime=policy.realtime,
        resumable=any(r.stream is not None and r.stream.resumable is not None for r in routes),
    )


def _state(state: State) -> StateRule:
    return StateRule(
        backend=state.backend,
        url=state.url,
        key_prefix=state.key_prefix,
        timeout=state.timeout,
        expected_replicas=state.expected_replicas,
        lease_ttl=state.lease_ttl,
        max_connections=state.max_connections,
        breaker_failures=state.breaker.failures,
        breaker_cooldown=state.breaker.cooldown,
    )


def _upstream(name: str, spec: Upstream) -> UpstreamSpec:
    base_url, basic_auth = _credentials_out_of_url(spec.base_url)
    api_key = spec.api_key.get_secret_value() if spec.api_key else None
    auth_header = spec.auth_header or DEFAULT_AUTH_HEADER[spec.provider]
    headers = tuple((k.lower(), v) for k, v in spec.headers.items())
    return UpstreamSpec(
        name=name,
        provider=spec.provider,
        base_url=base_url,
        api_key=api_key,
        auth_header=auth_header,
        headers=headers,
        query=tuple(spec.query.items()),
        max_connections=spec.pool.max_connections,
        keepalive=spec.pool.keepalive,
        mock=_mock(spec.mock or MockSpec()) if spec.provider == "mock" else None,
        hide_response_headers=Matcher(tuple(spec.hide_response_headers)) if spec.hide_response_headers else None,
        basic_auth=basic_auth,
        secrets=Redactor(upstream_credentials(spec)),
        sent=(sent_headers(headers, basic_auth, api_key, auth_header), sent_headers(headers, basic_auth, None, "")),
    )


def _credentials_out_of_url(url: str | None) -> tuple[str | None, str | None]:
    """base_url's `user:password@` becomes an explicit Basic `Authorization` value and leaves the URL: the
    HTTP client never sees credentials in a URL (aiohttp refuses them next to an Authorization header),
    and nothing that prints the compiled base_url can show them."""
    if url is None:
        return None, None
    bare, user, password = split_userinfo(url.rstrip("/"))
    if user is None:
        return bare, None
    token = base64.b64encode(f"{user}:{password or ''}".encode()).decode("ascii")
    return bare, "Basic " + token


def _anthropic_max_tokens(route: Route) -> int:
    """A default the policy wrote is sent; the schema's 1,024 is only what gets reserved, and Anthropic
    would cut answers there, so an unset one sends 4,096 (a cap most answers stay under)."""
    tokens = route.tokens
    if "default_max_tokens" in tokens.model_fields_set and tokens.default_max_tokens >= 1:
        return tokens.default_max_tokens
    return ANTHROPIC_DEFAULT_MAX_TOKENS


def _mock(spec: MockSpec) -> MockPlan:
    faults = tuple(
        MockFaultPlan(f.kind, f.probability, f.status, f.retry_after, f.stall, f.after_events, f.times)
        for f in spec.faults
    )
    return MockPlan(spec.ttft, spec.token_delay, spec.output_tokens, spec.embedding_dim, faults, spec.seed)


def _route(index: int, route: Route, policy: Policy, split: batch_limits.SplitLimits | None) -> RouteRule:
    paths = _as_tuple(route.match.path)
    models = _as_tuple(route.match.model)
    upstream = policy.upstreams[route.upstream]
    prefix = tools.prefix_of(route, upstream)
    if prefix is not None:
        paths = (prefix, prefix + "/*")  # the prefix itself and everything under it
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
        stream=_stream(route.stream),
        batch=_batch(route.batch, split),
        split=split,
        deployments=resilience.deployments(
            route,
            policy,
            lambda name: inherit_timeouts(route.timeouts, policy.upstreams[name].timeouts, policy.timeouts),
        ),
        balance=route.balance,
        retry=resilience.retry_spec(route.retry, policy.retry, tool=prefix is not None),
        fallbacks=tuple(route.fallbacks),
        tool_prefix=prefix,
        cache=cache_rule(route.cache, route.name, _pool(route)),
    )


def _pool(route: Route) -> list[tuple[str, str | None]]:
    if route.deployments is None:
        return [(route.upstream, route.model)]
    return [(d.upstream, d.model) for d in route.deployments]


def _stream(stream: StreamOptions | None) -> StreamSpec | None:
    if stream is None:
        return None
    resumable = stream.resumable
    spec = ResumableSpec(resumable.buffer, resumable.ttl) if resumable is not None else None
    return StreamSpec(stream.heartbeat, stream.slow_client, spec)


def _batch(batch: Batch | None, split: batch_limits.SplitLimits | None) -> BatchRule | None:
    if batch is None:
        return None
    items, tokens = batch_limits.clamped(batch.max_items, batch.max_tokens, split)
    return BatchRule(items, tokens, batch.max_wait, batch.cross_tenant)


def _splits(policy: Policy) -> list[batch_limits.SplitLimits | None]:
    """Per route, the strictest batch limits of every upstream it (its pool, its fallbacks' pools) may use."""
    by_name = {r.name: r for r in policy.routes}
    by_upstream = {name: batch_limits.upstream_limits(u.base_url, u.batch_limits)
                   for name, u in policy.upstreams.items()}
    return [
        batch_limits.route_limits(
            _pool_upstreams(route),
            [_pool_upstreams(by_name[name]) for name in route.fallbacks if name in by_name],
            by_upstream,
        )
        for route in policy.routes
    ]


def _pool_upstreams(route: Route) -> list[str]:
    return [d.upstream for d in route.deployments] if route.deployments else [route.upstream]


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


# --- admission: limits, queues, priorities ----------------------------------------------------------


def _admission(
    policy: Policy,
    upstreams: dict[str, UpstreamSpec],
    routes: tuple[RouteRule, ...],
    tenants: dict[str, TenantRule],
) -> tuple[dict[str, UpstreamSpec], tuple[RouteRule, ...], dict[str, TenantRule]]:
    """Limit specs, queue specs and priority classes, attached to the rules that use them."""
    classes = policy.priorities
    middle = len(classes) // 2
    # Weights relative to the smallest, so every tenant's round-robin quantum is at least one request.
    lightest = min((t.weight for t in policy.tenants.values()), default=1.0)
    for name, t in policy.tenants.items():
        priority = classes.index(t.priority) if t.priority else middle
        top = classes.index(t.max_priority) if t.max_priority else priority
        limit = _limit(t.limits, f"tenant:{name}", f"tenant '{name}'", name)
        tenants[name] = replace(
            tenants[name], limit=limit, priority=priority, max_priority=top, weight=t.weight / lightest
        )
    for name, u in policy.upstreams.items():
        limit = _limit(u.limits, f"upstream:{name}", f"upstream '{name}'", "")
        upstreams[name] = replace(upstreams[name], limit=limit)
    queues = _queues(policy)
    compiled = []
    for rule, route in zip(routes, policy.routes, strict=True):
        per_tenant = route.limits.per_tenant if route.limits is not None else None
        route_limit = _limit(route.limits, f"route:{rule.name}", f"route '{rule.name}'", "")
        sets = {}
        for tenant in policy.tenants:
            scope = f"route '{rule.name}' for tenant '{tenant}'"
            pair = _limit(per_tenant, f"route:{rule.name}/tenant:{tenant}", scope, tenant)
            candidates = (tenants[tenant].limit, route_limit, pair)
            found = tuple(x for x in candidates if x is not None)
            if found:
                sets[tenant] = LimitSet(found, any(x.spec.counts_tokens for x in found))
        compiled.append(
            replace(
                rule,
                limit=route_limit,
                limit_sets=MappingProxyType(sets),
                on_limit=route.on_limit,
                queue=queues[route.queue] if route.queue is not None else None,
                default_max_tokens=route.tokens.default_max_tokens,
                anthropic_max_tokens=_anthropic_max_tokens(route),
                deployments=_limited(rule.deployments, upstreams),
            )
        )
    return upstreams, _upstream_flags(compiled), tenants


def _limited(
    deployments: tuple[DeploymentSpec, ...], upstreams: dict[str, UpstreamSpec]
) -> tuple[DeploymentSpec, ...]:
    """Each deployment carries its upstream's limit: dispatch takes it per attempt, on the upstream the
    attempt really goes to (a pool's other upstreams, retries and fallbacks included)."""
    return tuple(
        replace(d, limit=upstreams[d.upstream].limit) if upstreams[d.upstream].limit is not None else d
        for d in deployments
    )


def _upstream_flags(routes: list[RouteRule]) -> tuple[RouteRule, ...]:
    """Mark the routes whose pool or fallbacks' pools reach a limited upstream; the others (the common
    case) pay nothing for upstream limits."""
    by_name = {r.name: r for r in routes}
    out = []
    for rule in routes:
        reached = [d.limit for d in rule.deployments]
        for name in rule.fallbacks:
            if name in by_name:
                reached += [d.limit for d in by_name[name].deployments]
        limits = [limit for limit in reached if limit is not None]
        if limits:
            tokens = any(limit.spec.counts_tokens for limit in limits)
            # Every deployment limited: a queued call waits for one of them (else it can always go somewhere).
            choices: dict[str, Limit] = {}
            for limit in limits if len(limits) == len(reached) else ():
                choices.setdefault(limit.key, limit)
            rule = replace(rule, upstream_choices=tuple(choices.values()))
            rule = replace(rule, upstream_limited=True, upstream_tokens=tokens)
        out.append(rule)
    return tuple(out)


def _limit(limits: Limits | None, key: str, scope: str, tenant: str) -> Limit | None:
    if limits is None:
        return None
    spec = LimitSpec(**{f.name: getattr(limits, f.name) for f in fields(LimitSpec)})
    return Limit(key, scope, tenant, spec) if spec != LimitSpec() else None


def _queues(policy: Policy) -> dict[str, QueueSpec]:
    return {
        name: QueueSpec(
            name, q.concurrency, q.max_waiting, q.max_wait, q.ageing, q.heartbeat_while_queued,
            q.shed.waiting if q.shed is not None else None, q.shed.wait if q.shed is not None else None,
            headroom=reserve.headroom(q.reserve, policy.priorities),
        )
        for name, q in policy.queues.items()
    }
