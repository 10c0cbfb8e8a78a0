"""Policy models for a route's options: what it matches, its pool's deployments, streams and batching, and
the batch limits an upstream declares (what one embeddings request to it may hold)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from proxy.policy.schema_base import Strict
from proxy.policy.units import ByteSize, Duration


class Deployment(Strict):
    """One member of a route's pool: an upstream, the model name sent to it and a weight. Named `upstream`
    or `upstream/model` in metrics, logs, the admin API and `x-signalbox-deployment`."""

    upstream: str
    """The upstream's name (a key of `upstreams`)."""
    model: str | None = None
    """The model name sent to this upstream (a rewrite); unset: the client's."""
    weight: float = Field(default=1.0, gt=0, le=1000)
    """Share of traffic under `balance: weighted`; divides the outstanding count under least_outstanding."""



class Match(Strict):
    """When a route applies: path, then model, then tenant. Globs: `*` matches any run of characters
    (including `/`), `?` one character, `[abc]` a set; all compiled when the policy loads."""

    path: str | list[str] = "/v1/*"
    """A glob or a list of globs on the request path."""
    model: str | list[str] = "*"
    """A glob or a list of globs on the body's `model`. Names without glob characters are what
    `GET /v1/models` lists."""
    tenants: list[str] | None = None
    """Only these tenants; unset: all."""


class Resumable(Strict):
    """Keep this route's streams resumable (docs/apps/resumable-streams.md): every relayed event gets an
    SSE `id:`, the response names its stream in `x-signalbox-stream-id`, a client that drops its connection
    may come back with `Last-Event-ID`, and the generation goes on without it meanwhile (bounded by
    `timeouts.total`, `buffer` and `ttl`)."""

    buffer: ByteSize = Field(default=4 * 1024 * 1024, ge=1024, le=256 * 1024 * 1024)
    """Bytes of events kept per stream for a resume. Past it the oldest events are dropped; a resume from
    a dropped id is refused (the newest events are always kept)."""
    ttl: Duration = Field(default=300.0, gt=0, le=86400)
    """How long a stream waits for its client to come back: a generation nobody reads for this long is
    stopped, and an ended stream's events stay resumable this long after its end."""


class StreamOptions(Strict):
    """How the relay treats this route's streams; unset fields keep the process settings."""

    heartbeat: Duration | None = None
    """Write a `: ping` comment after this much downstream silence (0 turns heartbeats off)."""
    slow_client: Duration | None = None
    """End a stream whose client has not taken a write for this long."""
    resumable: Resumable | None = None
    """Make streams on this route resumable after a dropped connection (unset: not resumable)."""

    @field_validator("slow_client")
    @classmethod
    def _positive(cls, value: float | None) -> float | None:
        if value is not None and value <= 0:
            raise ValueError("slow_client must be longer than 0s")
        return value


class Batch(Strict):
    """Coalesce concurrent embedding calls into one upstream call (docs/policy/batching.md)."""

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


def embedding_paths(path: str | list[str]) -> bool:
    paths = [path] if isinstance(path, str) else path
    return bool(paths) and all(p.endswith("/embeddings") and not any(c in p for c in "*?[") for p in paths)



class BatchLimits(Strict):
    """The most one embeddings request to this upstream may hold (docs/policy/batching.md): a larger one is
    split into several upstream calls, and merged batches stay within it. Unset fields: no limit."""

    max_inputs: int | None = Field(default=None, ge=1, le=1_000_000)
    """Inputs (strings or token arrays) in one upstream call; OpenAI accepts at most 2,048."""
    max_tokens: int | None = Field(default=None, ge=1, le=100_000_000)
    """Tokens summed over the inputs of one upstream call; OpenAI accepts at most 300,000. Text is estimated
    at 4 UTF-8 bytes per token (token arrays are exact): leave a margin for dense scripts."""
    concurrency: int = Field(default=2, ge=1, le=64)
    """Parts of one split request in flight at once (each part is one upstream call, with its own
    retries, breaker and upstream limits)."""

    @model_validator(mode="after")
    def _some_limit(self) -> BatchLimits:
        if self.max_inputs is None and self.max_tokens is None:
            raise ValueError("batch_limits needs max_inputs or max_tokens (or leave batch_limits out)")
        return self


class Cache(Strict):
    """Serve repeated identical requests from a stored answer instead of the upstream (docs/policy/caching.md).
    Only whole 2xx answers without `Set-Cookie` are kept, as long as the upstream's `Cache-Control`
    allows; on an embeddings path each input is its own entry."""

    ttl: Duration = 600.0
    """How long an answer is served from the cache; an upstream `max-age` (or `s-maxage`) below it wins."""
    max_entry: ByteSize = 1024 * 1024
    """Larger answers (or embedding vectors) are served but not kept."""
    scope: Literal["tenant", "shared"] = "tenant"
    """`tenant`: each tenant has its own entries (one never gets what another fetched). `shared`: every
    tenant of the route gets the same answer to the same request; use it only for public content."""

    @field_validator("ttl")
    @classmethod
    def _ttl(cls, value: float) -> float:
        if not 1 <= value <= 30 * 86400:
            raise ValueError("ttl must be between 1s and 30 days (720h)")
        return value

    @field_validator("max_entry")
    @classmethod
    def _max_entry(cls, value: int) -> int:
        if not 1 <= value <= 64 * 1024 * 1024:
            raise ValueError("max_entry must be between 1 byte and 64MiB")
        return value
