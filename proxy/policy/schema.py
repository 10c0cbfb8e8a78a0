"""The policy file format as pydantic models: validation only, no behaviour.

Every model forbids unknown keys (the loader turns those into "did you mean" hints). Later
capabilities add their own sections here (limits, queue, batch, retry, breaker, fallbacks) as
optional fields, so older policy files keep validating.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from yarl import URL

from proxy.policy.units import ByteSize, Duration, Percent

# An HTTP field name (RFC 9110 §5.1 token characters), with the glob characters * ? [ ] also allowed.
_HEADER_PATTERN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z\-?\[\]]+")

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"

DEFAULT_AUTH_HEADER = {"openai": "authorization", "anthropic": "x-api-key", "mock": "authorization"}
"""Where an upstream's api_key goes when `auth_header` is unset."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Timeouts(Strict):
    """Per-attempt and whole-call time limits. Unset fields inherit (route <- upstream <- defaults)."""

    connect: Duration | None = None
    first_token: Duration | None = None
    idle: Duration | None = None
    total: Duration | None = None


class Pool(Strict):
    """The upstream's connection pool: one aiohttp session per upstream, kept alive."""

    max_connections: int = Field(default=1024, ge=1, le=100_000)
    keepalive: Duration = 3.0
    """Idle keep-alive: shorter than vLLM's 5 s server default so we never reuse a socket it closed."""


class Limits(Strict):
    """Rate limits. Every limit that applies to a request (tenant, route, route per tenant, upstream)
    must admit it, and so must every rate of one limit (each unit is its own sliding window: a limit may
    give requests per minute and per day together, as vendors publish them). An upstream's are checked
    per attempt, on the upstream the attempt is sent to."""

    requests_per_second: int | None = Field(default=None, ge=1)
    requests_per_minute: int | None = Field(default=None, ge=1)
    requests_per_hour: int | None = Field(default=None, ge=1)
    requests_per_day: int | None = Field(default=None, ge=1)
    tokens_per_second: int | None = Field(default=None, ge=1)
    tokens_per_minute: int | None = Field(default=None, ge=1)
    """Prompt estimate + max output tokens reserved at admission (an upstream's: per attempt), settled with the real
    `usage`; the same for every `tokens_per_*`."""
    tokens_per_hour: int | None = Field(default=None, ge=1)
    tokens_per_day: int | None = Field(default=None, ge=1)
    concurrent: int | None = Field(default=None, ge=1)


class RouteLimits(Limits):
    per_tenant: Limits | None = None
    """Applied to each (route, tenant) pair on its own."""


class Shed(Strict):
    waiting: int | None = Field(default=None, ge=1)
    """From this many waiting requests, an arrival pushes out the newest waiter of the lowest class below
    its own (or is refused itself when no lower class waits)."""
    wait: Duration | None = None
    """The same, when an arrival's estimated wait passes this."""


class Queue(Strict):
    """A named waiting room; routes that name the same queue share its slots."""

    concurrency: int | None = Field(default=None, ge=1)
    """Requests in flight at once (unset: no slot limit; the queue only bounds waits for limits)."""
    max_waiting: int = Field(default=1000, ge=0, le=1_000_000)
    max_wait: Duration = 30.0
    """Longest wait from arrival, for a slot or for a limit, before a 429."""
    ageing: Duration | None = None
    """A waiting request moves up one priority class per `ageing` waited (starvation guard)."""
    heartbeat_while_queued: bool = False
    """Streams that must wait get their 200 + SSE headers at once and `: queued position=N` comments."""
    shed: Shed | None = None
    """Class-aware load shedding: past a threshold the lowest class waiting is refused first."""
    reserve: dict[str, Percent] = Field(default_factory=dict)
    """Priority class -> share of every limit its requests wait in (requests and tokens at every unit,
    concurrency) kept free for it and the classes above it: a lower class is refused while taking one
    would leave less than the reserves of all the classes above it. Holds across replicas with Redis."""

    @field_validator("reserve")
    @classmethod
    def _reserve_below_all(cls, value: dict[str, float]) -> dict[str, float]:
        if sum(value.values()) >= 100:
            raise ValueError("the reserves add up to 100% or more: the lowest class would get nothing")
        return value


class TokenSettings(Strict):
    default_max_tokens: int = Field(default=1024, ge=0)
    """Output tokens reserved when a request sets neither max_tokens nor max_completion_tokens."""


class MockFaultSpec(Strict):
    kind: Literal["status", "stall", "drop"]
    probability: float = Field(default=1.0, ge=0.0, le=1.0)
    status: int = Field(default=503, ge=400, le=599)
    retry_after: Duration | None = None
    stall: Duration = 0.0
    after_events: int = Field(default=3, ge=0)


class MockSpec(Strict):
    """Behaviour of the built-in mock upstream (`provider: mock`)."""

    ttft: Duration = 0.0
    token_delay: Duration = 0.0
    output_tokens: int = Field(default=16, ge=0, le=100_000)
    embedding_dim: int = Field(default=8, ge=1, le=16_384)
    faults: list[MockFaultSpec] = Field(default_factory=list)
    seed: int | None = None


# --- resilience: retries, breakers, pacing, pools (README: Retries, timeouts, circuit breakers and fallbacks)

NEVER_RETRIED = frozenset({400, 401, 403, 404, 413, 422})
RetryOutcome = int | Literal["connect_error", "timeout"]


class Backoff(Strict):
    base: Duration | None = None
    """Full-jitter exponential backoff: retry n waits a random time in [0, min(max, base x 2^n)). Default 250ms."""
    max: Duration | None = None
    """Default 5s."""


class RetryBudget(Strict):
    """Per route, over the last 10 s: retries sent at most `percent` % of the requests sent upstream,
    or `min_retries` a second, whichever is larger, so an outage cannot turn into a retry storm."""

    percent: float | None = Field(default=None, ge=0, le=100)
    """Default 20."""
    min_retries: int | None = Field(default=None, ge=0, le=100_000)
    """Retries a second always allowed (light traffic). Default 3."""


class Retry(Strict):
    """Retry behaviour, in one place: on the policy (defaults for every route) and on a route; for each
    field the route's setting wins, then the policy's, then the built-in default."""

    attempts: int | None = Field(default=None, ge=1, le=10)
    """Upstream calls per pool, the first included. Default 1: no retries until a policy asks (3 is usual)."""
    retry_on: list[RetryOutcome] | None = None
    """What is retried (Envoy's name; a bare `on` would be a YAML boolean). Default
    [429, 500, 502, 503, 504, 529, connect_error]; add `timeout` to retry timeouts before the first byte."""
    backoff: Backoff | None = None
    max_retry_after: Duration | None = None
    """Longest upstream hint (retry-after, rate-limit reset) the proxy waits out. Default 2s; a longer
    hint moves the retry to another deployment (or relays the answer)."""
    budget: RetryBudget | None = None

    @field_validator("retry_on")
    @classmethod
    def _retriable(cls, value: list[int | str] | None) -> list[int | str] | None:
        for item in value or ():
            if isinstance(item, int) and (item in NEVER_RETRIED or not 400 <= item <= 599):
                raise ValueError(
                    f"{item} is not retriable: list 408, 409, 429 or 5xx statuses, connect_error or timeout "
                    "(400, 401, 403, 404, 413 and 422 are always relayed at once)"
                )
        return value


class Breaker(Strict):
    """Circuit breaker for each deployment of an upstream (set on the policy for all, or on an upstream;
    per field the upstream wins). Failures: 5xx (529 included), connect errors, timeouts."""

    consecutive_failures: int | None = Field(default=None, ge=0, le=10_000)
    """Open after this many failures in a row (0: off). Default 10."""
    failure_ratio: float | None = Field(default=None, ge=0, le=1)
    """Open when this share of calls in `window` failed (0: off). Default 0.5."""
    min_requests: int | None = Field(default=None, ge=1, le=1_000_000)
    """Calls in `window` before the ratio counts. Default 20."""
    window: Duration | None = None
    """Default 30s."""
    cooldown: Duration | None = None
    """Open time before one probe is let through; doubles at each re-opening. Default 5s."""
    max_cooldown: Duration | None = None
    """Default 5m."""


class Pacing(Strict):
    """Adaptive pacing: after a 429 with a reset hint, or a response reporting no requests/tokens left,
    hold new dispatches to that deployment until the reset instead of sending sure rejections."""

    enabled: bool = True
    max_hold: Duration = 60.0


class Deployment(Strict):
    upstream: str
    model: str | None = None
    """The model name sent to this upstream (a rewrite); unset: the client's."""
    weight: float = Field(default=1.0, gt=0, le=1000)
    """Share of traffic under `balance: weighted`; divides the outstanding count under least_outstanding."""


class Upstream(Strict):
    provider: Literal["openai", "anthropic", "mock"]
    base_url: str | None = None
    """Up to and including the API version segment, e.g. https://api.openai.com/v1. Not for `mock`.
    `user:password@` in it is sent as Basic auth (`Authorization`), never shown (explain masks it)."""
    api_key: SecretStr | None = None
    auth_header: Literal["authorization", "api-key", "x-api-key"] | None = None
    """How the key is sent: `Authorization: Bearer` (OpenAI-compatible default), `api-key` (Azure),
    `x-api-key` (Anthropic default)."""
    headers: dict[str, str] = Field(default_factory=dict)
    query: dict[str, str] = Field(default_factory=dict)
    """Added to every upstream URL, e.g. Azure's `api-version`."""
    pool: Pool = Field(default_factory=Pool)
    timeouts: Timeouts = Field(default_factory=Timeouts)
    mock: MockSpec | None = None
    limits: Limits | None = None
    """Protects the vendor key's own quota: counts every call sent to this upstream (each attempt, whatever
    route, deployment, retry or fallback sends it); a deployment whose upstream is over it is skipped."""
    breaker: Breaker | None = None
    pacing: Pacing = Field(default_factory=Pacing)
    hide_response_headers: list[str] = Field(default_factory=list)
    """Upstream response headers never relayed to clients (names or globs, any case), e.g.
    `openai-organization`, `anthropic-organization-id`, `x-ratelimit-*`: what the vendor says about the
    platform's account stays with the platform. Content-Type is always relayed."""

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
        return self


def _parses_as_url(url: str) -> bool:
    try:
        URL(url)
    except ValueError:
        return False
    return True


class Tenant(Strict):
    keys: list[SecretStr] = Field(default_factory=list)
    """Proxy API keys that identify this tenant (`Authorization: Bearer` or `x-api-key`)."""
    models: list[str] | None = None
    """Optional allow-list of model globs; unset means every route the tenant reaches."""
    priority: str | None = None
    """Default priority class (one of `priorities`); unset: the middle class."""
    max_priority: str | None = None
    """Highest class the x-signalbox-priority header may ask for; unset: the tenant's default."""
    weight: float = Field(default=1.0, gt=0, le=1000)
    """Share of the queue against other tenants of the same class (deficit round robin)."""
    limits: Limits | None = None


class Identify(Strict):
    """How a request is tied to a tenant."""

    mode: Literal["api_key", "header", "single", "passthrough"] = "api_key"
    header: str = "x-signalbox-tenant"
    tenant: str | None = None
    """The tenant for `single` and `passthrough` (when the header is absent)."""

    @model_validator(mode="after")
    def _tenant_needed(self) -> Identify:
        if self.mode == "single" and not self.tenant:
            raise ValueError("mode single needs `tenant`: the tenant every request belongs to")
        return self


class Match(Strict):
    path: str | list[str] = "/v1/*"
    model: str | list[str] = "*"
    tenants: list[str] | None = None


class StreamOptions(Strict):
    """How the relay treats this route's streams; unset fields keep the process settings."""

    heartbeat: Duration | None = None
    """Write a `: ping` comment after this much downstream silence (0 turns heartbeats off)."""
    slow_client: Duration | None = None
    """End a stream whose client has not taken a write for this long."""

    @field_validator("slow_client")
    @classmethod
    def _positive(cls, value: float | None) -> float | None:
        if value is not None and value <= 0:
            raise ValueError("slow_client must be longer than 0s")
        return value


class Batch(Strict):
    """Coalesce concurrent embedding calls into one upstream call (README: Batching embeddings)."""

    max_items: int = Field(default=256, ge=1, le=2048)
    """Inputs in one upstream call (OpenAI accepts at most 2,048)."""
    max_tokens: int = Field(default=100_000, ge=1, le=10_000_000)
    """Estimated tokens in one upstream call (OpenAI accepts at most 300,000)."""
    max_wait: Duration = 0.010
    """Longest a call waits for others to join before its batch is sent."""
    cross_tenant: bool = False
    """Let different tenants' inputs share one upstream call (off: batch within a tenant only)."""

    @field_validator("max_wait")
    @classmethod
    def _bounded_wait(cls, value: float) -> float:
        if value > 10:
            raise ValueError("max_wait must be at most 10s: every batched call waits up to this long")
        return value


def _embedding_paths(path: str | list[str]) -> bool:
    paths = [path] if isinstance(path, str) else path
    return bool(paths) and all(p.endswith("/embeddings") and not any(c in p for c in "*?[") for p in paths)


def _upstream_optional(schema: dict[str, Any]) -> None:
    """In the JSON Schema `upstream` is optional: a route may give `deployments` instead."""
    required = schema.get("required")
    if isinstance(required, list) and "upstream" in required:
        required.remove("upstream")


class Route(Strict):
    model_config = ConfigDict(json_schema_extra=_upstream_optional)

    name: str = Field(pattern=NAME_PATTERN)
    match: Match = Field(default_factory=Match)
    upstream: str
    """Shorthand for a pool of one deployment (with `model`); with `deployments` it is left out and
    filled in with the first deployment's upstream."""
    model: str | None = None
    """Rewrite the request's model to this name before sending it upstream."""
    deployments: list[Deployment] | None = Field(default=None, min_length=1)
    balance: Literal["weighted", "least_outstanding"] = "weighted"
    retry: Retry | None = None
    fallbacks: list[str] = Field(default_factory=list)
    """Route names tried in order (same deadline) once this route's pool has given up or is all open."""
    timeouts: Timeouts = Field(default_factory=Timeouts)
    limits: RouteLimits | None = None
    on_limit: Literal["reject", "queue"] = "reject"
    """Over a limit: answer 429 at once, or wait (up to the queue's max_wait) for capacity."""
    queue: str | None = None
    """The named queue (see `queues`) this route's requests wait in for a slot."""
    tokens: TokenSettings = Field(default_factory=TokenSettings)
    stream: StreamOptions | None = None
    batch: Batch | None = None
    """Merge concurrent embedding calls into one upstream call; only on embedding paths."""

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
        if self.batch is not None and not _embedding_paths(self.match.path):
            raise ValueError(
                "batch applies only to embeddings: set match.path to /v1/embeddings "
                "(only embedding calls can be merged into one upstream call)"
            )
        return self


REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel", "redis+cluster", "rediss+cluster")


class StateBreaker(Strict):
    """The limiter store's own circuit breaker (Redis only)."""

    failures: int = Field(default=3, ge=1, le=100)
    """Consecutive failed Redis calls that switch the proxy to local limits."""
    cooldown: Duration = 1.0
    """How long to stay on local limits before Redis is tried again (one probe at a time)."""


class State(Strict):
    """Where limit counters live (read at start-up; changing it needs a restart). `memory`: in this
    process. `redis`: shared by every replica that names the same Redis and `key_prefix`."""

    backend: Literal["memory", "redis"] = "memory"
    url: str | None = None
    """`redis://[user:pass@]host:6379/0`, `rediss://...` (TLS), `unix:///path`,
    `redis+sentinel://host:26379[,host:port]/<service>[/db]`, `redis+cluster://host:port[,host:port]`.
    Write `${REDIS_URL}` to keep passwords out of the policy."""
    key_prefix: str = Field(default="signalbox", pattern=r"^[A-Za-z0-9_.:\-]+$")
    timeout: Duration = 1.0
    """Longest one Redis call may take before the request is decided locally (a slow answer is not an
    outage: far above a healthy round trip, it covers a cold pool's connect and a busy event loop)."""
    expected_replicas: int = Field(default=1, ge=1, le=100_000)
    """Replicas sharing the limits: while Redis is unreachable each applies limit ÷ this locally."""
    lease_ttl: Duration = 30.0
    """Concurrency leases expire after this unless renewed (every third of it) by a live replica."""
    max_connections: int = Field(default=64, ge=1, le=10_000)
    breaker: StateBreaker = Field(default_factory=StateBreaker)

    @model_validator(mode="after")
    def _redis_needs_url(self) -> State:
        if self.backend == "memory":
            return self
        if not self.url:
            raise ValueError("backend redis needs `url` (for example url: ${REDIS_URL})")
        scheme = self.url.partition("://")[0].lower() if "://" in self.url else ""
        if scheme not in REDIS_SCHEMES:
            # Never echo the URL: it may carry a password.
            raise ValueError(f"url must start with one of {', '.join(s + '://' for s in REDIS_SCHEMES)}")
        if not 0 < self.timeout <= 5:
            raise ValueError("timeout must be more than 0s and at most 5s (tens of ms is usual)")
        if self.lease_ttl < 0.2:
            raise ValueError("lease_ttl must be at least 200ms")
        return self


class Policy(Strict):
    """One policy set: the union of every file in the policy directory."""

    version: Literal[1] = 1
    identify: Identify = Field(default_factory=Identify)
    upstreams: dict[str, Upstream] = Field(default_factory=dict)
    tenants: dict[str, Tenant] = Field(default_factory=dict)
    routes: list[Route] = Field(default_factory=list)
    timeouts: Timeouts = Field(default_factory=Timeouts)
    """Defaults for every upstream and route."""
    max_body_size: ByteSize = 32 * 1024 * 1024
    max_buffered_response: ByteSize = 32 * 1024 * 1024
    """Largest non-streamed upstream answer held in memory; a larger pass-through success is streamed
    through as it arrives, one that must be translated or normalised gets 502."""
    priorities: list[str] = Field(default_factory=lambda: ["standard"], min_length=1)
    """Priority classes, highest first."""
    queues: dict[str, Queue] = Field(default_factory=dict)
    retry: Retry = Field(default_factory=Retry)
    """Retry defaults for every route (a route's `retry` fields win)."""
    breaker: Breaker = Field(default_factory=Breaker)
    """Circuit-breaker defaults for every upstream (an upstream's `breaker` fields win)."""
    # Names used across sections (upstreams, tenants, queues, priority classes) are checked by the
    # loader (policy/checks.py), which knows each value's file:line.
    state: State = Field(default_factory=State)
    """Where limit counters live: this process (memory) or Redis shared by replicas."""

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
