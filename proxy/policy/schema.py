"""The policy file format as pydantic models: validation only, no behaviour.

Every model forbids unknown keys (the loader turns those into "did you mean" hints) and describes each
field in the docstring under it: those docstrings are the text of `signalbox schema` and of the
generated field reference (docs/policy/reference.md), and a test refuses a field without one. This
module holds the policy's root and its upstreams, tenants and routes; the other sections live in
sibling modules by concern (schema_limits, schema_resilience, schema_routes, schema_state) and are
re-exported here, so `from proxy.policy.schema import X` works for every model.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import ConfigDict, Field, SecretStr, field_validator, model_validator
from yarl import URL

from proxy.policy.schema_base import NAME_PATTERN, Strict
from proxy.policy.schema_limits import Limits, Queue, RouteLimits, Shed, Timeouts, TokenSettings
from proxy.policy.schema_resilience import (
    IDEMPOTENT_METHODS,
    NEVER_RETRIED,
    Backoff,
    Breaker,
    ExponentialBackoff,
    FixedBackoff,
    Pacing,
    Retry,
    RetryBudget,
    RetryOutcome,
    RetryRule,
)
from proxy.policy.schema_routes import Batch, BatchLimits, Cache, Deployment, Match, StreamOptions, embedding_paths
from proxy.policy.schema_sockets import Realtime, StreamSocket
from proxy.policy.schema_state import REDIS_SCHEMES, State, StateBreaker
from proxy.policy.units import ByteSize, Duration

__all__ = [
    "DEFAULT_AUTH_HEADER", "IDEMPOTENT_METHODS", "NAME_PATTERN", "NEVER_RETRIED", "ExponentialBackoff", "FixedBackoff",
    "RetryRule", "REDIS_SCHEMES", "Backoff", "Batch", "BatchLimits", "Breaker", "Cache",
    "Deployment", "Identify", "Limits", "Match", "MockFaultSpec", "MockSpec", "Pacing", "Policy", "Pool", "Queue",
    "Retry", "RetryBudget", "RetryOutcome", "Route", "RouteLimits", "Shed", "State", "StateBreaker", "Strict",
    "StreamOptions", "Tenant", "Timeouts", "TokenSettings", "Upstream",
]

# An HTTP field name (RFC 9110 §5.1 token characters), with the glob characters * ? [ ] also allowed.
_HEADER_PATTERN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z\-?\[\]]+")

DEFAULT_AUTH_HEADER = {"openai": "authorization", "anthropic": "x-api-key", "mock": "authorization",
                       "http": "authorization"}
"""Where an upstream's api_key goes when `auth_header` is unset."""


class Pool(Strict):
    """The upstream's connection pool: one aiohttp session per upstream, kept alive."""

    max_connections: int = Field(default=1024, ge=1, le=100_000)
    """Connection pool size; every open stream holds one connection."""
    keepalive: Duration = 3.0
    """Idle keep-alive: shorter than vLLM's 5 s server default so we never reuse a socket it closed."""


class MockFaultSpec(Strict):
    """A fault the mock upstream injects, to rehearse a policy's failure handling."""

    kind: Literal["status", "stall", "drop"]
    """`status`: answer with an error status; `stall`: wait before answering; `drop`: cut a stream."""
    probability: float = Field(default=1.0, ge=0.0, le=1.0)
    """Share of requests that get this fault (rolled with `seed`)."""
    status: int = Field(default=503, ge=400, le=599)
    """The status a `status` fault answers with."""
    retry_after: Duration | None = None
    """A `retry-after` sent with a `status` fault."""
    stall: Duration = 0.0
    """How long a `stall` fault waits."""
    after_events: int = Field(default=3, ge=0)
    """Stream events sent before a `drop` fault cuts the connection."""
    times: int | None = Field(default=None, ge=1)
    """Only the first this many requests that draw the fault get it; then it is spent (unset: no end).
    Faults listed in order with `times` script a sequence: three 503s, then a 429 with a 2 s retry-after."""


class MockSpec(Strict):
    """Behaviour of the built-in mock upstream (`provider: mock`)."""

    ttft: Duration = 0.0
    """Delay before the first token."""
    token_delay: Duration = 0.0
    """Delay between stream events."""
    output_tokens: int = Field(default=16, ge=0, le=100_000)
    """Tokens per answer (fewer if `max_tokens` says so)."""
    embedding_dim: int = Field(default=8, ge=1, le=16_384)
    """Vector size when the request has no `dimensions`."""
    faults: list[MockFaultSpec] = Field(default_factory=list)
    """Faults to inject, each with its own probability."""
    seed: int | None = None
    """Seed for the fault dice; unset: a new seed at each start."""


class Upstream(Strict):
    """A server the proxy sends calls to, and how it is reached."""

    provider: Literal["openai", "anthropic", "mock", "http"]
    """`openai` for any OpenAI-compatible server (OpenAI, Azure OpenAI, vLLM, TGI, Groq, DeepSeek, Ollama),
    `anthropic`, `mock` (the built-in mock, started in-process), or `http`: any HTTP API (a tool an agent
    calls), proxied on a path prefix of its own, bytes untouched (docs/policy/tool-upstreams.md)."""
    base_url: str | None = None
    """Up to and including the API version segment, e.g. `https://api.openai.com/v1`, `http://vllm:8000/v1`,
    `https://api.anthropic.com/v1`, `https://RESOURCE.openai.azure.com/openai/v1`. Not for `mock`.
    `user:password@` in it is sent as Basic auth (`Authorization`), so it cannot go with an `api_key` sent in
    `Authorization` or an `Authorization` in `headers`; it is never shown (explain masks it as `user:***@`).
    Percent-encode `/`, `?`, `#` and `@` in a password: a URL that does not parse is refused."""
    api_key: SecretStr | None = None
    """The upstream's key, from the environment: `${OPENAI_API_KEY}`. It replaces the client's key upstream
    (except under `identify.mode: passthrough`)."""
    auth_header: Literal["authorization", "api-key", "x-api-key"] | None = None
    """How the key is sent: `Authorization: Bearer` (OpenAI-compatible default), `api-key` (Azure),
    `x-api-key` (Anthropic default)."""
    headers: dict[str, str] = Field(default_factory=dict)
    """Extra headers sent upstream (e.g. `OpenAI-Organization`)."""
    query: dict[str, str] = Field(default_factory=dict)
    """Added to every upstream URL, e.g. Azure's `api-version`."""
    pool: Pool = Field(default_factory=Pool)
    """The connection pool to this upstream."""
    timeouts: Timeouts = Field(default_factory=Timeouts)
    """Defaults for routes to this upstream (a route's fields win, then these, then the policy's)."""
    mock: MockSpec | None = None
    """Only for `provider: mock`: how the built-in mock behaves."""
    limits: Limits | None = None
    """Protects the vendor key's own quota: counts every call sent to this upstream (each attempt, whatever
    route, deployment, retry or fallback sends it); a deployment whose upstream is over it is skipped."""
    breaker: Breaker | None = None
    """The circuit breaker of each deployment on this upstream; per field this wins over the policy's
    `breaker`, then the defaults."""
    pacing: Pacing = Field(default_factory=Pacing)
    """Hold dispatches while the upstream reports a limit used up."""
    batch_limits: BatchLimits | None = None
    """The most one embeddings request may hold here; larger ones are split (docs/policy/batching.md).
    Unset: OpenAI's published limits when base_url is `https://api.openai.com`, no limit otherwise."""
    hide_response_headers: list[str] = Field(default_factory=list)
    """Upstream response headers never relayed to clients (names or globs, any case), e.g.
    `openai-organization`, `anthropic-organization-id`, `x-ratelimit-*`: what the vendor says about the
    platform's account stays with the platform. Applies to whole, streamed and batched answers;
    Content-Type is always relayed; `x-request-id` (or Anthropic's `request-id`) hides `x-upstream-request-id`.
    The proxy still reads hidden headers itself (retry and pacing hints); leave `retry-after` and
    `x-should-retry` visible, the SDKs retry on them."""

    @field_validator("hide_response_headers")
    @classmethod
    def _header_patterns(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            if not _HEADER_PATTERN.fullmatch(pattern):
                raise ValueError(f"{pattern!r} is not a header name or a glob of one")
        return [pattern.lower() for pattern in patterns]

    @model_validator(mode="after")
    def _base_url_matches_provider(self) -> Upstream:
        if self.provider == "mock":
            if self.base_url is not None:
                raise ValueError("a mock upstream runs in-process: remove base_url")
        elif not self.base_url:
            raise ValueError(f"base_url is required for provider {self.provider}")
        elif not self.base_url.startswith(("http://", "https://")):
            raise ValueError("base_url must start with http:// or https://")
        elif not _parses_as_url(self.base_url):  # the value is not quoted: it may hold a password
            raise ValueError("base_url is not a valid URL (a port that is not a number, or a '/', '?' or '#' "
                             "in a password that should be percent-encoded)")
        if self.mock is not None and self.provider != "mock":
            raise ValueError("the mock section applies only to provider: mock")
        if self.batch_limits is not None and self.provider == "anthropic":
            raise ValueError("batch_limits applies to embeddings, which anthropic upstreams do not serve")
        return self


def _parses_as_url(url: str) -> bool:
    try:
        URL(url)
    except ValueError:
        return False
    return True


class Tenant(Strict):
    """A caller of the proxy: an app or a team, with its keys, models, limits and place in the queues."""

    keys: list[SecretStr] = Field(default_factory=list)
    """Proxy API keys that identify this tenant (`Authorization: Bearer` or `x-api-key`); stored in the plan
    only as SHA-256 digests."""
    models: list[str] | None = None
    """Optional allow-list of model globs; unset means every route the tenant reaches. Other models get 404
    (the message lists the allowed ones)."""
    priority: str | None = None
    """Default priority class (one of `priorities`); unset: the middle class."""
    max_priority: str | None = None
    """Highest class the x-signalbox-priority header may ask for; unset: the tenant's default."""
    weight: float = Field(default=1.0, gt=0, le=1000)
    """Share of the queue against other tenants of the same class (deficit round robin)."""
    limits: Limits | None = None
    """The tenant's own limits, across all routes."""


class Identify(Strict):
    """How a request is tied to a tenant."""

    mode: Literal["api_key", "header", "single", "passthrough"] = "api_key"
    """`api_key`: the client's key (`Authorization: Bearer` or `x-api-key`) must be one of a tenant's `keys`
    (else 401) and is never forwarded. `header`: trusted sidecar use, the header named by `header` names
    the tenant (`tenant` when it is absent) and is not forwarded. `single`: every request belongs to
    `tenant`. `passthrough`: like `header`, but the client's own `Authorization` / `x-api-key` / `api-key`
    go upstream unchanged instead of the upstream's `api_key`."""
    header: str = "x-signalbox-tenant"
    """The header that names the tenant under `header` and `passthrough`."""
    tenant: str | None = None
    """The tenant for `single` and `passthrough` (when the header is absent)."""

    @model_validator(mode="after")
    def _tenant_needed(self) -> Identify:
        if self.mode == "single" and not self.tenant:
            raise ValueError("mode single needs `tenant`: the tenant every request belongs to")
        return self


def _upstream_optional(schema: dict[str, Any]) -> None:
    """In the JSON Schema `upstream` is optional: a route may give `deployments` instead."""
    required = schema.get("required")
    if isinstance(required, list) and "upstream" in required:
        required.remove("upstream")


class Route(Strict):
    """A rule that sends the requests it matches to a pool of deployments, with its limits, queue, retries
    and fallbacks. Routes are tried in order; the first whose `match` holds takes the request."""

    model_config = ConfigDict(json_schema_extra=_upstream_optional)

    name: str = Field(pattern=NAME_PATTERN)
    """Unique; shown in `x-signalbox-route`, metrics and logs."""
    match: Match = Field(default_factory=Match)
    """Which requests take this route. The first route whose `match` holds wins."""
    upstream: str
    """Shorthand for a pool of one deployment (with `model`); with `deployments` it is left out and
    filled in with the first deployment's upstream."""
    model: str | None = None
    """Rewrite the request's model to this name before sending it upstream."""
    deployments: list[Deployment] | None = Field(default=None, min_length=1)
    """The pool, instead of `upstream` (+ `model`)."""
    balance: Literal["weighted", "least_outstanding"] = "weighted"
    """How the pool is shared: `weighted` (random by weight) or `least_outstanding` (fewest requests in
    flight per unit of weight, ties at random)."""
    retry: Retry | None = None
    """This route's retry settings; per field they win over the policy's `retry`, then the defaults."""
    fallbacks: list[str] = Field(default_factory=list)
    """Route names tried in order (same deadline) once this route's pool has given up or is all open."""
    timeouts: Timeouts = Field(default_factory=Timeouts)
    """Per field, these win over the upstream's, then the policy's, then the defaults."""
    limits: RouteLimits | None = None
    """Limits on every request of this route, and under `per_tenant` on each tenant's."""
    on_limit: Literal["reject", "queue"] = "reject"
    """Over a limit: answer 429 at once, or wait (up to the queue's max_wait) for capacity."""
    queue: str | None = None
    """The named queue (see `queues`) this route's requests wait in for a slot."""
    tokens: TokenSettings = Field(default_factory=TokenSettings)
    """How token limits estimate this route's requests."""
    stream: StreamOptions | None = None
    """Heartbeat and slow-client settings for this route's streams."""
    batch: Batch | None = None
    """Merge concurrent embedding calls into one upstream call; only on embedding paths."""
    cache: Cache | None = None
    """Answer repeated identical requests from a cache (off unless set); see docs/policy/caching.md."""

    @model_validator(mode="before")
    @classmethod
    def _pool_or_shorthand(cls, data: Any) -> Any:
        """`upstream` (+ `model`) or `deployments`, not both; `upstream` names the first deployment's."""
        if not isinstance(data, dict) or data.get("deployments") is None:
            return data
        if data.get("upstream") or data.get("model") is not None:
            raise ValueError("give either `upstream` (with `model`) or `deployments`, not both")
        pool = data["deployments"]
        first = pool[0] if isinstance(pool, list) and pool else None
        if isinstance(first, dict) and isinstance(first.get("upstream"), str):
            return {**data, "upstream": first["upstream"]}
        return data

    @model_validator(mode="after")
    def _not_own_fallback(self) -> Route:
        if self.name in self.fallbacks:
            raise ValueError("a route cannot be its own fallback")
        return self

    @model_validator(mode="after")
    def _queue_for_waits(self) -> Route:
        if self.on_limit == "queue" and self.queue is None:
            raise ValueError("on_limit: queue needs `queue: <name>`: that queue's max_wait bounds the wait")
        return self

    @model_validator(mode="after")
    def _batch_on_embeddings(self) -> Route:
        if self.batch is not None and not embedding_paths(self.match.path):
            raise ValueError(
                "batch applies only to embeddings: set match.path to /v1/embeddings "
                "(only embedding calls can be merged into one upstream call)"
            )
        return self


class Policy(Strict):
    """One policy set: the union of every file in the policy directory."""

    version: Literal[1] = 1
    """The policy format version."""
    identify: Identify = Field(default_factory=Identify)
    """How a request is tied to a tenant: by its API key (the default), a trusted header, or one tenant for all."""
    upstreams: dict[str, Upstream] = Field(default_factory=dict)
    """Upstreams by name; entries may be spread over files (a name defined twice is an error)."""
    tenants: dict[str, Tenant] = Field(default_factory=dict)
    """Tenants by name; entries may be spread over files (a name defined twice is an error)."""
    routes: list[Route] = Field(default_factory=list)
    """An ordered list, appended in file-name order: a request takes the first route whose `match` holds,
    so put specific routes before general ones. No match: 404 with the models the tenant may use."""
    timeouts: Timeouts = Field(default_factory=Timeouts)
    """Defaults for every upstream and route."""
    max_body_size: ByteSize = 32 * 1024 * 1024
    """Larger request bodies get 413."""
    max_buffered_response: ByteSize = 32 * 1024 * 1024
    """Largest non-streamed upstream answer held in memory; a larger pass-through success is streamed
    through as it arrives, one that must be translated or normalised gets 502."""
    cache_memory: ByteSize = 64 * 1024 * 1024
    """Bytes the in-memory response cache of all routes holds (least recently used entries go first);
    unused when `state.backend` is `redis` (entries then live in Redis, with a TTL per key)."""
    priorities: list[str] = Field(default_factory=lambda: ["standard"], min_length=1)
    """Priority classes, highest first."""
    queues: dict[str, Queue] = Field(default_factory=dict)
    """Named waiting rooms; routes name the queue they use (`queue: NAME`)."""
    retry: Retry = Field(default_factory=Retry)
    """Retry defaults for every route (a route's `retry` fields win)."""
    breaker: Breaker = Field(default_factory=Breaker)
    """Circuit-breaker defaults for every upstream (an upstream's `breaker` fields win)."""
    # Names used across sections (upstreams, tenants, queues, priority classes) are checked by the
    # loader (policy/checks.py), which knows each value's file:line.
    state: State = Field(default_factory=State)
    """Where limit counters live: this process (memory) or Redis shared by replicas."""
    stream_socket: StreamSocket = Field(default_factory=StreamSocket)
    """Bounds of the unified stream's WebSocket (in-flight requests, message size, idle timeout, pings)."""
    realtime: Realtime = Field(default_factory=Realtime)
    """The Realtime API WebSocket pass-through: session limits, idle timeout, message size."""

    @field_validator("upstreams", "tenants", "queues")
    @classmethod
    def _names(cls, value: dict[str, object]) -> dict[str, object]:
        import re

        for name in value:
            if not re.match(NAME_PATTERN, name):
                raise ValueError(f"invalid name {name!r}: use letters, digits, '_', '-' and '.'")
        return value

    @field_validator("priorities")
    @classmethod
    def _classes(cls, value: list[str]) -> list[str]:
        import re

        for name in value:
            if not re.match(NAME_PATTERN, name):
                raise ValueError(f"invalid priority class {name!r}: use letters, digits, '_', '-' and '.'")
        if len(set(value)) != len(value):
            raise ValueError("priority classes must be unique")
        return value
