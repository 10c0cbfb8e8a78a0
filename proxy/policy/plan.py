"""The compiled, immutable plan: everything a request needs, decided at load time.

`Plan.resolve()` and `Plan.tenant_for_key()` are the only per-request lookups; they are pure and
do no parsing, regex compilation or walking of raw YAML.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from proxy.policy.batch_limits import SplitLimits
from proxy.policy.cache_rule import CacheRule
from proxy.policy.matcher import Matcher as Matcher  # its home before tool routes
from proxy.policy.outcome_rules import OutcomeRule
from proxy.policy.rates import LimitSpec as LimitSpec  # its home before rate units
from proxy.policy.redact import EMPTY, Redactor
from proxy.policy.schema_sockets import Realtime, StreamSocket
from proxy.providers.exchange import DEFAULT_MAX_TOKENS as ANTHROPIC_DEFAULT_MAX_TOKENS

Provider = Literal["openai", "anthropic", "mock", "http"]
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
class ResumableSpec:
    """A route's resumable streams (proxy/streaming/resume/): bytes kept per stream, seconds a stream
    waits for its reader."""

    buffer: int = 4 * 1024 * 1024
    ttl: float = 300.0


@dataclass(frozen=True, slots=True)
class StreamSpec:
    """A route's stream relay overrides; None keeps the process setting."""

    heartbeat: float | None = None
    slow_client: float | None = None
    resumable: ResumableSpec | None = None


@dataclass(frozen=True, slots=True)
class BatchRule:
    """A route's embeddings batching (proxy/batching/batcher.py)."""

    max_items: int = 256
    max_tokens: int = 100_000
    max_wait: float = 0.010
    cross_tenant: bool = False


DEFAULT_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504, 529})


@dataclass(frozen=True, slots=True)
class RetrySpec:
    """A route's retry behaviour (docs/policy/retries.md)."""

    attempts: int = 1
    """Upstream calls per pool, the first one included. 1 (no retries) unless the policy says so, as in
    Envoy: a proxy that retries behind the SDK's own retries multiplies calls."""
    statuses: frozenset[int] = DEFAULT_RETRY_STATUSES
    connect_errors: bool = True
    timeouts: bool = False
    """Timeouts before the response headers (the first byte) only; off by default: a generation that ran
    past first_token once tends to do it again, at the upstream's cost each time."""
    backoff_base: float = 0.25
    backoff_max: float = 5.0
    max_retry_after: float = 2.0
    """Longest upstream hint (retry-after, reset headers) waited out; a longer one moves to another deployment."""
    budget_percent: float = 20.0
    """Retries sent in the last 10 s may be at most this share of the route's first attempts ..."""
    budget_min: int = 3
    """... or this many a second, whichever is larger (upstream/budget.py)."""
    rules: tuple[OutcomeRule, ...] = ()
    """`retry.rules`: per-outcome attempts and backoff (upstream/rules.py); empty: the fields above decide."""
    methods: frozenset[str] | None = None
    """Methods that may be retried (None: all); any other is sent once."""


@dataclass(frozen=True, slots=True)
class BreakerSpec:
    """Circuit breaker of each deployment of an upstream; 0 turns a trigger off."""

    consecutive_failures: int = 10
    """Envoy uses 5; at a few hundred calls a second a deployment failing a quarter of them would trip
    that by chance (0.25**5 is about 1/1000), 10 does not (about 1/10**6)."""
    failure_ratio: float = 0.5
    min_requests: int = 20
    window: float = 30.0
    cooldown: float = 5.0
    """First open period; doubles with each re-opening, up to max_cooldown."""
    max_cooldown: float = 300.0


@dataclass(frozen=True, slots=True)
class PacingSpec:
    enabled: bool = True
    max_hold: float = 60.0
    """Longest hold a reset hint can put on a deployment."""


@dataclass(frozen=True, slots=True)
class DeploymentSpec:
    """One member of a route's pool: an upstream, the model name it is sent, and its share."""

    id: str
    """`upstream` or `upstream/model`: names its breaker, pacing and load state (shared by routes)."""
    upstream: str
    model: str | None = None
    weight: float = 1.0
    timeouts: TimeoutSpec = TimeoutSpec()
    """connect and first_token apply per attempt (inherited from this deployment's upstream)."""
    breaker: BreakerSpec = BreakerSpec()
    pacing: PacingSpec = PacingSpec()
    limit: Limit | None = field(default=None, repr=False)
    """The upstream's own `limits`, taken per attempt when dispatch picks this deployment (None: no check).
    (Not in the repr: explain shows it with the other limits.)"""


@dataclass(frozen=True, slots=True)
class MockFaultPlan:
    kind: Literal["status", "stall", "drop"]
    probability: float
    status: int
    retry_after: float | None
    stall: float
    after_events: int
    times: int | None = None


@dataclass(frozen=True, slots=True)
class MockPlan:
    ttft: float
    token_delay: float
    output_tokens: int
    embedding_dim: int
    faults: tuple[MockFaultPlan, ...]
    seed: int | None


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
    """Every limit one tenant's request on one route must pass at admission (tenant, route, route per
    tenant), gathered at compile time so admission does no per-request assembly."""

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
    shed_waiting: int | None = None
    """Waiting count from which arrivals push out the lowest class (None: no shedding by count)."""
    shed_wait: float | None = None
    """Estimated wait past which arrivals push out the lowest class (None: no shedding by wait)."""
    headroom: tuple[float, ...] = ()
    """By class index (0 is the highest): the share of every limit a request of that class must leave
    free, the sum of `reserve` of the classes above it. Empty: no reserves (every class 0)."""


def headroom_for(queue: QueueSpec | None, cls: int) -> float:
    """The `headroom` to pass to `LimiterStore.try_acquire` for a request of class `cls` in `queue`."""
    if queue is None or not 0 <= cls < len(queue.headroom):
        return 0.0
    return queue.headroom[cls]


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
    hide_response_headers: Matcher | None = None
    """Upstream response headers not relayed to clients (lower-case names and globs); None: relay all."""
    basic_auth: str | None = field(default=None, repr=False)
    """`Basic …` from base_url's `user:password@` (which the compiled base_url no longer carries)."""
    secrets: Redactor = field(default=EMPTY, repr=False, compare=False)
    """What this upstream is sent as credentials (so all it can quote back), searched in its successes'
    headers (a short list: a few µs per response)."""
    sent: tuple[Mapping[str, str], ...] = field(default=(), repr=False, compare=False)
    """What is set over the client's headers, with the key and for pass-through (policy/sent_headers.py)."""

    def fingerprint(self) -> tuple[object, ...]:
        """What a connection pool depends on: a reload keeps the pool when this is unchanged."""
        return (self.provider, self.base_url, self.max_connections, self.keepalive, self.mock)


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
    limit_sets: Mapping[str, LimitSet] = field(default_factory=dict)
    """By tenant name; a tenant with no entry has no limit on this route. Admission only: upstream limits
    are per attempt (`DeploymentSpec.limit`)."""
    upstream_limited: bool = False
    """Some deployment of this route or of its fallbacks has an upstream limit (dispatch takes it per
    attempt; admission then closes what the relayed attempt held)."""
    upstream_tokens: bool = False
    """One of those limits counts tokens: admission estimates them and asks for the real usage."""
    upstream_choices: tuple[Limit, ...] = ()
    """The upstream limits one of which a queued call must find free before it leaves its queue: one per
    distinct upstream of the route's pool and of its fallbacks' pools (dispatch may send it to any of
    them); empty when one of those deployments has no upstream limit (it can always go there)."""
    on_limit: Literal["reject", "queue"] = "reject"
    queue: QueueSpec | None = None
    default_max_tokens: int = 1024
    anthropic_max_tokens: int = ANTHROPIC_DEFAULT_MAX_TOKENS
    """`max_tokens` sent to an Anthropic upstream (which requires one) when an OpenAI client sets no
    maximum: the route's `tokens.default_max_tokens` when the policy sets it, else 4096."""
    stream: StreamSpec | None = None
    batch: BatchRule | None = None
    split: SplitLimits | None = None
    """The most one upstream embeddings call may hold on this route (proxy/batching/split.py)."""
    deployments: tuple[DeploymentSpec, ...] = ()
    """The pool; the shorthand `upstream:` + `model:` compiles to one deployment."""
    balance: Literal["weighted", "least_outstanding"] = "weighted"
    retry: RetrySpec = RetrySpec()
    fallbacks: tuple[str, ...] = ()
    """Route names tried in order, within the same deadline, once this route's pool gives up."""
    tool_prefix: str | None = None
    """A `provider: http` route: the path prefix replaced by the upstream's base_url (proxy/ingress/tool.py)."""
    cache: CacheRule | None = None
    """The response cache (proxy/cache/); None: the route never looks one up."""

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
    passthrough_auth: bool = field(init=False)
    """`passthrough`: the app's own credential headers go upstream instead of the upstream's key."""
    drop_upstream: frozenset[str] = field(init=False)
    """Client headers never forwarded upstream because they name the tenant (the identify header, in every
    mode but `api_key`). Both worked out once, when the plan is built, not per request."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "passthrough_auth", self.mode == "passthrough")
        drop = frozenset((self.header,)) if self.mode != "api_key" and self.header else frozenset()
        object.__setattr__(self, "drop_upstream", drop)


@dataclass(frozen=True, slots=True)
class StateRule:
    """The limiter store: `memory` (this process) or `redis` (shared by replicas; see admission/redis/store.py)."""

    backend: Literal["memory", "redis"] = "memory"
    url: str | None = field(default=None, repr=False)
    """May carry a password: never printed."""
    key_prefix: str = "signalbox"
    timeout: float = 1.0
    expected_replicas: int = 1
    lease_ttl: float = 30.0
    max_connections: int = 64
    breaker_failures: int = 3
    breaker_cooldown: float = 1.0


def key_digest(key: str) -> str:
    """Keys are indexed by digest so the plan (and anything that prints it) never holds them. A header
    value carries non-UTF-8 bytes as surrogates: hashed as the bytes sent (they match no key)."""
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


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
    routes_by_name: Mapping[str, RouteRule] = field(default_factory=dict, repr=False)
    """For fallbacks."""
    state: StateRule = field(default_factory=StateRule)
    """Where limit counters live; read once at start-up (the store outlives plan swaps)."""
    max_buffered_response: int = 32 * 1024 * 1024
    """Largest non-streamed upstream answer read into memory (proxy/upstream/body.py)."""
    cache_memory: int = 64 * 1024 * 1024
    """Bytes the in-memory response cache may hold (proxy/cache/memory.py)."""
    secrets: Redactor = field(default=EMPTY, repr=False, compare=False)
    """Every secret of the policy in every form it is sent, compiled once (proxy/policy/redact.py)."""
    tools: tuple[RouteRule, ...] = ()
    """The `provider: http` routes, in policy order: the ones a request outside /v1 is matched against."""
    stream_socket: StreamSocket = field(default_factory=StreamSocket)
    """The unified stream's WebSocket bounds (frozen policy values, read per socket)."""
    realtime: Realtime = field(default_factory=Realtime)
    """The Realtime pass-through's limits (frozen policy values, read per session)."""
    resumable: bool = False
    """Some route has resumable streams: ingress then looks for resume requests (the one check it costs)."""

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
