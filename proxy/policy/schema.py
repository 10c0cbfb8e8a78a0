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


class Route(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    match: Match = Field(default_factory=Match)
    upstream: str
    model: str | None = None
    """Rewrite the request's model to this name before sending it upstream."""
    timeouts: Timeouts = Field(default_factory=Timeouts)


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

    @field_validator("upstreams", "tenants")
    @classmethod
    def _names(cls, value: dict[str, object]) -> dict[str, object]:
        import re

        for name in value:
            if not re.match(NAME_PATTERN, name):
                raise ValueError(f"invalid name {name!r}: use letters, digits, '_', '-' and '.'")
        return value
