"""Retry decisions (pure): what an attempt's outcome means, and how long to wait before the next one.

Semantics after Envoy's retry policy and the Stainless SDKs (PROTOCOLS.md §1.5, §6): retries happen
only before the first byte went to the client (dispatch returns at the response headers, so this module
never sees a started stream); an upstream `x-should-retry` header overrides the status list; backoff is
full jitter; an upstream hint replaces the backoff, and a hint longer than `max_retry_after` is not
waited out (the caller moves to another deployment instead).
"""

from __future__ import annotations

from typing import Literal

from proxy.policy.plan import RetrySpec

NEVER_RETRIED = frozenset({400, 401, 403, 404, 413, 422})
ErrorKind = Literal["connect_error", "timeout"]


def status_retriable(status: int, spec: RetrySpec, should_retry: str | None = None) -> bool:
    """May a response with this status be retried? (2xx/3xx never are; the client errors above never are.)"""
    if status < 400 or status in NEVER_RETRIED:
        return False
    if should_retry is not None:
        value = should_retry.strip().lower()
        if value == "false":
            return False
        if value == "true":
            return True
    return status in spec.statuses


def error_retriable(kind: ErrorKind, spec: RetrySpec) -> bool:
    return spec.connect_errors if kind == "connect_error" else spec.timeouts


def breaker_failure(status: int) -> bool:
    """What counts against a deployment's circuit: 5xx (529 included). 429 is pacing's business."""
    return status >= 500


def backoff(retry: int, base: float, cap: float, rand: float) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2**retry)); `retry` counts from 0, `rand` in [0, 1)."""
    return rand * min(cap, base * 2.0 ** min(retry, 62))


def delay(retry: int, hint: float | None, spec: RetrySpec, rand: float) -> float:
    """Wait before retrying the same deployment: the upstream's hint if it gave one, else the backoff."""
    if hint is not None:
        return hint
    return backoff(retry, spec.backoff_base, spec.backoff_max, rand)


def hint_too_long(hint: float | None, spec: RetrySpec) -> bool:
    return hint is not None and hint > spec.max_retry_after


def fits(now: float, wait: float, deadline: float) -> bool:
    """Never sleep past the deadline: a wait that ends at or after it is not worth starting."""
    return now + wait < deadline


def stop_reason_final(reason: str) -> bool:
    """Stops after which the client should not retry either (x-should-retry: false): only the deadline
    (the time the route gives a call is spent). A retry-budget refusal is not final: it means the proxy
    spent what it may add to this route's traffic, not that another try is bound to fail (under 27 %
    faults it succeeds 3 times in 4), and the SDK's own retries are few, backed off and its user's to
    spend. The upstream's answer is relayed as it came, with its own x-should-retry if it sent one."""
    return reason == "deadline"
