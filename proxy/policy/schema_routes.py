"""Policy models for a route's options: what it matches, its pool's deployments, streams and batching."""

from __future__ import annotations

from pydantic import Field, field_validator

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

