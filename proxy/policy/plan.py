"""The compiled, immutable plan: everything a request needs, decided at load time.

`Plan.resolve()` and `Plan.tenant_for_key()` are the only per-request lookups; they are pure and
do no parsing, regex compilation or walking of raw YAML.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

Provider = Literal["openai", "anthropic", "mock"]
IdentifyMode = Literal["api_key", "header", "single", "passthrough"]

DEFAULT_CONNECT = 10.0
DEFAULT_FIRST_TOKEN = 300.0
DEFAULT_IDLE = 300.0
DEFAULT_TOTAL = 1800.0
_RESOLVE_CACHE_LIMIT = 4096


@dataclass(frozen=True, slots=True)
class TimeoutSpec:
    connect: float = DEFAULT_CONNECT
    first_token: float = DEFAULT_FIRST_TOKEN
    idle: float = DEFAULT_IDLE
    total: float = DEFAULT_TOTAL


@dataclass(frozen=True, slots=True)
class StreamSpec:
    """A route's stream relay overrides; None keeps the process setting."""

    heartbeat: float | None = None
    slow_client: float | None = None


@dataclass(frozen=True, slots=True)
class MockFaultPlan:
    kind: Literal["status", "stall", "drop"]
    probability: float
    status: int
    retry_after: float | None
    stall: float
    after_events: int


@dataclass(frozen=True, slots=True)
class MockPlan:
    ttft: float
    token_delay: float
    output_tokens: int
    embedding_dim: int
    faults: tuple[MockFaultPlan, ...]
    seed: int | None


@dataclass(frozen=True, slots=True)
class LimitSpec:
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    concurrent: int | None = None


@dataclass(frozen=True, slots=True)
class Limit:
    """One named limit. `key` names its counters in the limiter store, so a reload that keeps the
    key keeps the counts; `scope` is how messages name it."""

    key: str
    """`tenant:<t>`, `route:<r>`, `route:<r>/tenant:<t>` or `upstream:<u>`."""
    scope: str
    tenant: str
    """The tenant it counts, or "" for route- and upstream-wide limits."""
    spec: LimitSpec


@dataclass(frozen=True, slots=True)
class LimitSet:
    """Every limit one tenant's request on one route must pass (tenant, route, route per tenant,
    upstream), gathered at compile time so admission does no per-request assembly."""

    limits: tuple[Limit, ...]
    tokens: bool
    """Some limit counts tokens: estimate, reserve and settle them."""


@dataclass(frozen=True, slots=True)
class QueueSpec:
    name: str
    concurrency: int | None
    max_waiting: int
    max_wait: float
    ageing: float | None
    heartbeat: bool


@dataclass(frozen=True, slots=True)
class UpstreamSpec:
    name: str
    provider: Provider
    base_url: str | None
    """None for `mock`: the runtime starts the mock and knows its address."""
    api_key: str | None = field(repr=False)
    auth_header: str
    headers: tuple[tuple[str, str], ...]
    query: tuple[tuple[str, str], ...]
    max_connections: int
    keepalive: float
    mock: MockPlan | None
    limit: Limit | None = None

    def fingerprint(self) -> tuple[object, ...]:
        """What a connection pool depends on: a reload keeps the pool when this is unchanged."""
        return (self.provider, self.base_url, self.max_connections, self.keepalive, self.mock)


class Matcher:
    """A set of globs compiled once into one regex; exact names take a set lookup."""

    __slots__ = ("exact", "regex", "patterns")

    def __init__(self, patterns: tuple[str, ...]) -> None:
        self.patterns = patterns
        self.exact = frozenset(p for p in patterns if not _is_glob(p))
        globs = [p for p in patterns if _is_glob(p)]
        self.regex = re.compile("|".join(_glob_regex(p) for p in globs)) if globs else None

    def __call__(self, value: str) -> bool:
        if value in self.exact:
            return True
        return self.regex is not None and self.regex.fullmatch(value) is not None

    def __repr__(self) -> str:
        return f"Matcher({list(self.patterns)})"


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def _glob_regex(pattern: str) -> str:
    """fnmatch-style globs; `*` also crosses `/` (model names like `meta-llama/*` and paths)."""
    out = []
    for char in pattern:
        out.append(".*" if char == "*" else "." if char == "?" else re.escape(char))
    return "(?:" + "".join(out) + ")"


@dataclass(frozen=True, slots=True)
class RouteRule:
    name: str
    index: int
    paths: Matcher
    models: Matcher
    tenants: frozenset[str] | None
    upstream: str
    model_rewrite: str | None
    timeouts: TimeoutSpec
    advertised: tuple[str, ...]
    """Concrete model names this route serves, listed by GET /v1/models."""
    limit: Limit | None = None
    upstream_limit: Limit | None = None
    limit_sets: Mapping[str, LimitSet] = field(default_factory=dict)
    """By tenant name; a tenant with no entry has no limit on this route."""
    on_limit: Literal["reject", "queue"] = "reject"
    queue: QueueSpec | None = None
    default_max_tokens: int = 1024
    stream: StreamSpec | None = None

    def matches(self, path: str, model: str, tenant: str) -> bool:
        return (
            (self.tenants is None or tenant in self.tenants) and self.paths(path) and self.models(model)
        )


@dataclass(frozen=True, slots=True)
class TenantRule:
    name: str
    models: Matcher | None
    limit: Limit | None = None
    priority: int = 0
    """Default class, an index into Plan.priorities (0 is the highest)."""
    max_priority: int = 0
    weight: float = 1.0
    """Fairness weight, normalised at compile time so the lightest tenant's is 1."""


@dataclass(frozen=True, slots=True)
class IdentifySpec:
    mode: IdentifyMode
    header: str
    tenant: str | None


def key_digest(key: str) -> str:
    """Keys are indexed by digest so the plan (and anything that prints it) never holds them."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Plan:
    digest: str
    files: tuple[str, ...]
    identify: IdentifySpec
    upstreams: Mapping[str, UpstreamSpec]
    tenants: Mapping[str, TenantRule]
    routes: tuple[RouteRule, ...]
    key_index: Mapping[str, str] = field(repr=False)
    max_body_size: int
    _cache: dict[tuple[str, str, str], RouteRule | None] = field(default_factory=dict, repr=False, compare=False)
    priorities: tuple[str, ...] = ("standard",)
    queues: Mapping[str, QueueSpec] = field(default_factory=dict)

    def tenant_for_key(self, key: str) -> TenantRule | None:
        name = self.key_index.get(key_digest(key))
        return self.tenants[name] if name is not None else None

    def resolve(self, path: str, model: str, tenant: TenantRule) -> RouteRule | None:
        """The first route whose match holds, or None. Results are memoised per plan (bounded)."""
        cache_key = (path, model, tenant.name)
        try:
            return self._cache[cache_key]
        except KeyError:
            pass
        found = None
        if tenant.models is None or tenant.models(model) or not model:
            found = next((r for r in self.routes if r.matches(path, model, tenant.name)), None)
        if len(self._cache) >= _RESOLVE_CACHE_LIMIT:
            self._cache.clear()
        self._cache[cache_key] = found
        return found

    def models_for(self, tenant: TenantRule) -> list[str]:
        """Concrete model names the tenant may call, in route order, without duplicates."""
        seen: dict[str, None] = {}
        for route in self.routes:
            if route.tenants is not None and tenant.name not in route.tenants:
                continue
            for model in route.advertised:
                if tenant.models is None or tenant.models(model):
                    seen.setdefault(model, None)
        return list(seen)
