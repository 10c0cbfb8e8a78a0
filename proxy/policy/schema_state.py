"""Policy models for where limit counters live: this process, or a Redis shared by the replicas."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from proxy.policy.schema_base import Strict
from proxy.policy.units import Duration

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
    """`redis` shares the limits; `memory` keeps them per process."""
    url: str | None = None
    """`redis://[user:pass@]host:6379/0`, `rediss://...` (TLS), `unix:///path`,
    `redis+sentinel://host:26379[,host:port]/<service>[/db]`, `redis+cluster://host:port[,host:port]`.
    Write `${REDIS_URL}` to keep passwords out of the policy."""
    key_prefix: str = Field(default="signalbox", pattern=r"^[A-Za-z0-9_.:\-]+$")
    """The first part of every key; proxies sharing limits use the same prefix (and Redis), and two fleets
    with different prefixes never share."""
    timeout: Duration = 1.0
    """Longest one Redis call may take before the request is decided locally (a slow answer is not an
    outage: far above a healthy round trip, it covers a cold pool's connect and a busy event loop)."""
    expected_replicas: int = Field(default=1, ge=1, le=100_000)
    """Replicas sharing the limits: while Redis is unreachable each applies limit ÷ this locally."""
    lease_ttl: Duration = 30.0
    """Concurrency leases expire after this unless renewed (every third of it) by a live replica."""
    max_connections: int = Field(default=64, ge=1, le=10_000)
    """Pooled connections per replica; a request waits for a free one within its call's bound."""
    breaker: StateBreaker = Field(default_factory=StateBreaker)
    """When the replica switches to local limits, and when it tries Redis again."""

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

