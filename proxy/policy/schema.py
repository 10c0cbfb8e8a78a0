"""The policy file format as pydantic models: validation only, no behaviour.

Every model forbids unknown keys (the loader turns those into "did you mean" hints). Later
capabilities add their own sections here (limits, queue, batch, retry, breaker, fallbacks) as
optional fields, so older policy files keep validating.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from proxy.policy.units import ByteSize, Duration

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"


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
    must admit it; minutes are sliding windows."""

    requests_per_minute: int | None = Field(default=None, ge=1)
    tokens_per_minute: int | None = Field(default=None, ge=1)
    """Prompt estimate + max output tokens reserved at admission, settled with the real `usage`."""
    concurrent: int | None = Field(default=None, ge=1)


class RouteLimits(Limits):
    per_tenant: Limits | None = None
    """Applied to each (route, tenant) pair on its own."""


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


class Upstream(Strict):
    provider: Literal["openai", "anthropic", "mock"]
    base_url: str | None = None
    """Up to and including the API version segment, e.g. https://api.openai.com/v1. Not for `mock`."""
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
    """Protects the vendor key's own quota: counts every request routed to this upstream."""

    @model_validator(mode="after")
    def _base_url_matches_provider(self) -> Upstream:
        if self.provider == "mock":
            if self.base_url is not None:
                raise ValueError("a mock upstream runs in-process: remove base_url")
        elif not self.base_url:
            raise ValueError(f"base_url is required for provider {self.provider}")
        elif not self.base_url.startswith(("http://", "https://")):
            raise ValueError("base_url must start with http:// or https://")
        if self.mock is not None and self.provider != "mock":
            raise ValueError("the mock section applies only to provider: mock")
        return self


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


class Route(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    match: Match = Field(default_factory=Match)
    upstream: str
    model: str | None = None
    """Rewrite the request's model to this name before sending it upstream."""
    timeouts: Timeouts = Field(default_factory=Timeouts)
    limits: RouteLimits | None = None
    on_limit: Literal["reject", "queue"] = "reject"
    """Over a limit: answer 429 at once, or wait (up to the queue's max_wait) for capacity."""
    queue: str | None = None
    """The named queue (see `queues`) this route's requests wait in for a slot."""
    tokens: TokenSettings = Field(default_factory=TokenSettings)
    stream: StreamOptions | None = None

    @model_validator(mode="after")
    def _queue_for_waits(self) -> Route:
        if self.on_limit == "queue" and self.queue is None:
            raise ValueError("on_limit: queue needs `queue: <name>`: that queue's max_wait bounds the wait")
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
    priorities: list[str] = Field(default_factory=lambda: ["standard"], min_length=1)
    """Priority classes, highest first."""
    queues: dict[str, Queue] = Field(default_factory=dict)

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

    @model_validator(mode="after")
    def _references(self) -> Policy:
        """Names used by tenants and routes must exist (queues, priority classes)."""
        classes = self.priorities
        problems = []
        for name, tenant in self.tenants.items():
            wanted = {"priority": tenant.priority, "max_priority": tenant.max_priority}
            for key, value in wanted.items():
                if value is not None and value not in classes:
                    known = ", ".join(classes)
                    problems.append(f"tenants.{name}.{key}: unknown class '{value}' (priorities: {known})")
            own, top = tenant.priority, tenant.max_priority
            if own in classes and top in classes and classes.index(top) > classes.index(own):
                problems.append(f"tenants.{name}.max_priority: '{top}' is below its priority '{own}'")
        for i, route in enumerate(self.routes):
            if route.queue is not None and route.queue not in self.queues:
                known = ", ".join(sorted(self.queues)) or "none defined"
                problems.append(f"routes[{i}].queue: undefined queue '{route.queue}' (queues: {known})")
        if problems:
            raise ValueError("; ".join(problems))
        return self
