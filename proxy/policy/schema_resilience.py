"""Policy models for resilience: retries and their budget, circuit breakers, adaptive pacing."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from proxy.policy.schema_base import Strict
from proxy.policy.units import Duration

NEVER_RETRIED = frozenset({400, 401, 403, 404, 413, 422})
RetryOutcome = int | Literal["connect_error", "timeout"]


class Backoff(Strict):
    """Full-jitter exponential backoff between retries of the same deployment."""

    base: Duration | None = None
    """Full-jitter exponential backoff: retry n waits a random time in [0, min(max, base x 2^n)). Default 250ms."""
    max: Duration | None = None
    """The longest backoff wait. Default 5s."""


class RetryBudget(Strict):
    """Per route, over the last 10 s: retries sent at most `percent` % of the requests sent upstream,
    or `min_retries` a second, whichever is larger, so an outage cannot turn into a retry storm."""

    percent: float | None = Field(default=None, ge=0, le=100)
    """Retries a route may send, in % of the requests it sent upstream in the last 10 s. Default 20."""
    min_retries: int | None = Field(default=None, ge=0, le=100_000)
    """Retries a second always allowed (light traffic). Default 3."""


IDEMPOTENT_METHODS = ("GET", "HEAD", "OPTIONS", "PUT", "DELETE")
"""RFC 9110 §9.2.2: sending these twice has the effect of sending them once (TRACE is never proxied)."""
HTTP_METHODS = ("GET", "HEAD", "OPTIONS", "PUT", "DELETE", "POST", "PATCH")


class FixedBackoff(Strict):
    """The same wait before every retry of the rule."""

    fixed: Duration
    """The wait, e.g. `1s`."""


class ExponentialBackoff(Strict):
    """Full-jitter exponential backoff with the rule's own base and cap."""

    exponential: Backoff
    """`{base: 100ms, max: 2s}`; unset fields take the retry's `backoff`, then 250ms and 5s."""


RuleBackoff = Literal["exponential", "reset"] | FixedBackoff | ExponentialBackoff


class RetryRule(Strict):
    """One outcome rule: which outcomes it covers, how many attempts they may use, and the wait before each
    retry (docs/policy/retries.md#retry-rules)."""

    on: list[RetryOutcome] = Field(min_length=1)
    """The outcomes this rule retries: statuses (408, 409, 429, 5xx), `connect_error`, `timeout`. An outcome
    may appear in one rule only; an outcome in no rule is not retried."""
    attempts: int = Field(ge=1, le=20)
    """Upstream calls a request may make while its failures are of this rule's outcomes, the first included
    (each rule counts its own failures; 1: this outcome is not retried)."""
    backoff: RuleBackoff = "exponential"
    """`exponential` (full jitter, the retry's `backoff` base and max), `{exponential: {base, max}}`,
    `{fixed: 1s}`, or `reset`: wait what the upstream said (retry-after-ms, retry-after, the rate-limit reset
    headers), and relay an answer that says nothing at once. Every kind waits an upstream hint out when one
    is given."""
    max_wait: Duration | None = None
    """Longest upstream hint this rule waits out (default: the retry's `max_retry_after`); a longer one moves
    the retry to another deployment, or the answer is relayed."""

    @field_validator("on")
    @classmethod
    def _retriable(cls, value: list[int | str]) -> list[int | str]:
        return _retriable_outcomes(value)


def _retriable_outcomes(value: list[int | str]) -> list[int | str]:
    for item in value:
        if isinstance(item, int) and (item in NEVER_RETRIED or not 400 <= item <= 599):
            raise ValueError(
                f"{item} is not retriable: list 408, 409, 429 or 5xx statuses, connect_error or timeout "
                "(400, 401, 403, 404, 413 and 422 are always relayed at once)"
            )
    return value


class Retry(Strict):
    """Retry behaviour, in one place: on the policy (defaults for every route) and on a route; for each
    field the route's setting wins, then the policy's, then the built-in default."""

    attempts: int | None = Field(default=None, ge=1, le=10)
    """Upstream calls per pool, the first included. Default 1: no retries until a policy asks (3 is usual)."""
    retry_on: list[RetryOutcome] | None = None
    """What is retried (Envoy's name; a bare `on` would be a YAML boolean). Default
    [429, 500, 502, 503, 504, 529, connect_error]; add `timeout` to retry timeouts before the first byte."""
    backoff: Backoff | None = None
    """The wait before retrying a deployment already tried, when the upstream gave no hint."""
    max_retry_after: Duration | None = None
    """Longest upstream hint (retry-after, rate-limit reset) the proxy waits out. Default 2s; a longer
    hint moves the retry to another deployment (or relays the answer)."""
    budget: RetryBudget | None = None
    """The retry budget: bounds the rate of retries a route sends (default 20 % of its requests, or 3 a
    second)."""

    rules: list[RetryRule] | None = Field(default=None, min_length=1)
    """Per-outcome rules instead of `attempts` + `retry_on` + `backoff`, e.g. `[{on: [timeout,
    connect_error], attempts: 3}, {on: [503], attempts: 5, backoff: {fixed: 1s}}, {on: [429], attempts: 10,
    backoff: reset}]`. The route's `rules` replace the policy's as a whole."""
    methods: list[Literal["GET", "HEAD", "OPTIONS", "PUT", "DELETE", "POST", "PATCH"]] | None = None
    """HTTP methods that may be retried. Default: every method on LLM routes (their POSTs are generations the
    SDKs retry too), the idempotent ones (GET, HEAD, OPTIONS, PUT, DELETE) on `provider: http` routes: a
    tool's POST may not be safe to send twice. List POST or PATCH to retry them anyway."""

    @field_validator("retry_on")
    @classmethod
    def _retriable(cls, value: list[int | str] | None) -> list[int | str] | None:
        return _retriable_outcomes(value) if value is not None else None


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
    """The window `failure_ratio` and `min_requests` count over. Default 30s."""
    cooldown: Duration | None = None
    """Open time before one probe is let through; doubles at each re-opening. Default 5s."""
    max_cooldown: Duration | None = None
    """Cap of the cooldown; after a healthy spell this long it starts again from `cooldown`. Default 5m."""


class Pacing(Strict):
    """Adaptive pacing: after a 429 with a reset hint, or a response reporting no requests/tokens left,
    hold new dispatches to that deployment until the reset instead of sending sure rejections."""

    enabled: bool = True
    """Hold dispatches to a deployment whose answer reported a limit used up, until its reset."""
    max_hold: Duration = 60.0
    """The longest one hold lasts, whatever reset the upstream reported."""

