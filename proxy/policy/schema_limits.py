"""Policy models for limits, queues and timeouts: what a request needs, and how long it may wait."""

from __future__ import annotations

from pydantic import Field, field_validator

from proxy.policy.schema_base import Strict
from proxy.policy.units import Duration, Percent


class Timeouts(Strict):
    """Per-attempt and whole-call time limits. Unset fields inherit (route <- upstream <- defaults)."""

    connect: Duration | None = None
    """TCP (and TLS) connect to the upstream, per attempt. Default 10s."""
    first_token: Duration | None = None
    """Per attempt, from sending the request to the response headers, and for streams to the first event;
    also the longest silence while a whole (not streamed) answer's body is read. Cut to what is left of
    `total`. Default 300s."""
    idle: Duration | None = None
    """Longest silence between two stream events (upstream keep-alive comments do not count as progress;
    events dropped in translation, such as thinking, do). Default 300s."""
    total: Duration | None = None
    """One deadline for the whole call, every retry, backoff and fallback included, counted from the moment
    the request got its queue slot. Default 30m."""


class Limits(Strict):
    """Rate limits. Every limit that applies to a request (tenant, route, route per tenant, upstream)
    must admit it, and so must every rate of one limit (each unit is its own sliding window: a limit may
    give requests per minute and per day together, as vendors publish them). An upstream's are checked
    per attempt, on the upstream the attempt is sent to."""

    requests_per_second: int | None = Field(default=None, ge=1)
    """Requests admitted per sliding second."""
    requests_per_minute: int | None = Field(default=None, ge=1)
    """Requests admitted per sliding minute."""
    requests_per_hour: int | None = Field(default=None, ge=1)
    """Requests admitted per sliding hour."""
    requests_per_day: int | None = Field(default=None, ge=1)
    """Requests admitted per sliding day."""
    tokens_per_second: int | None = Field(default=None, ge=1)
    """Tokens per sliding second (see `tokens_per_minute` for how tokens are counted)."""
    tokens_per_minute: int | None = Field(default=None, ge=1)
    """Prompt estimate + max output tokens reserved at admission (an upstream's: per attempt), settled with the real
    `usage`; the same for every `tokens_per_*`."""
    tokens_per_hour: int | None = Field(default=None, ge=1)
    """Tokens per sliding hour."""
    tokens_per_day: int | None = Field(default=None, ge=1)
    """Tokens per sliding day."""
    concurrent: int | None = Field(default=None, ge=1)
    """Requests in flight at once (an upstream's: attempts, held until the response is finished)."""


class RouteLimits(Limits):
    """A route's limits: every request on the route, all tenants together, plus `per_tenant`."""

    per_tenant: Limits | None = None
    """Applied to each (route, tenant) pair on its own."""


class Shed(Strict):
    """Class-aware shedding: keeps a queue short under overload by refusing the lowest classes first. The
    waiter pushed out gets a 429 with `retry-after` from the estimate and `x-should-retry: true`."""

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
    """Waiting requests beyond this get a 429 at once with `x-should-retry: false` (a retry would only add
    load)."""
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
    """How a route's token limits estimate a request."""

    default_max_tokens: int = Field(default=1024, ge=0)
    """Output tokens reserved when a request sets neither max_tokens nor max_completion_tokens."""

