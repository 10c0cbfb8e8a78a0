"""Retry by outcome (pure): which `retry.rules` rule an attempt's outcome falls under, whether it is
retried, and when. The clock's reading and the random source are passed in.

Semantics (docs/policy/retries.md#retry-rules): an outcome is a status or `connect_error` / `timeout`;
the first rule whose `on` lists it decides (validation refuses an outcome listed twice). Each rule counts
its own failures in the pool being tried: after the k-th, it is retried while k < the rule's `attempts`,
else the pool gives up as when `attempts` run out in the single form (fallbacks, then the last answer).
Statuses that are never retried (400, 401, 403, 404, 413, 422), an `x-should-retry: false`, and a method
the retry does not allow are relayed at once whatever the rules say. Every backoff kind waits out an
upstream hint up to the rule's `max_wait`; without one, `exponential` is full jitter, `fixed` its wait,
and `reset` does not retry (a rate limit whose reset is unknown is not retried blind). The deadline and
the retry budget are checked by dispatch before every retry, as for the single form.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

from proxy.policy.outcome_rules import OutcomeRule
from proxy.policy.plan import RetrySpec
from proxy.upstream import retry

RuleVerdict = Literal["relay", "retry", "spent", "stop", "raise"]
"""relay / raise: the answer or error goes to the client as it is; retry: another attempt in this pool;
spent: the rule's attempts are used up (the pool gives up: fallbacks, then the last answer); stop: the
deadline, not the deployment, ran out."""


def method_retriable(method: str, spec: RetrySpec) -> bool:
    return spec.methods is None or method in spec.methods


def rule_of(status: int, error: retry.ErrorKind | None, should_retry: str | None, spec: RetrySpec) -> int | None:
    """The index of the rule covering this outcome, or None when it is not retried at all."""
    if error is None:
        if status < 400 or status in retry.NEVER_RETRIED:
            return None
        if should_retry is not None and should_retry.strip().lower() == "false":
            return None
    for index, rule in enumerate(spec.rules):
        if rule.covers(status, error):
            return index
    return None


def judge(
    status: int, error: retry.ErrorKind | None, deadline_bound: bool, should_retry: str | None,
    hint: float | None, used: Sequence[int], spec: RetrySpec,
) -> tuple[RuleVerdict, int | None]:
    """One attempt's outcome under `spec.rules`: an answer with `status` (`error` None) or an `error`;
    `hint` is the upstream's wait hint, `used[i]` the failures rule i already counted in this pool (this
    one not included). With the index of the rule that decided (None when no rule did)."""
    if error == "timeout" and deadline_bound:
        return "stop", None
    index = rule_of(status, error, should_retry, spec)
    final: RuleVerdict = "relay" if error is None else "raise"
    if index is None:
        return final, None
    rule = spec.rules[index]
    if rule.backoff == "reset" and hint is None:
        return final, index
    if used[index] + 1 >= rule.attempts:
        return "spent", index
    return "retry", index


def delay(rule: OutcomeRule, retry_no: int, hint: float | None, draw: Callable[[], float]) -> float | None:
    """The wait before retrying the deployment that failed (`retry_no`: this rule's failures in the pool,
    from 0): the upstream's hint, else the rule's backoff. None when the hint is longer than `max_wait`
    (not this deployment again in this pool). `draw` is called only for an exponential backoff."""
    if hint is not None:
        return None if hint > rule.max_wait else hint
    if rule.backoff == "fixed":
        return rule.fixed
    return retry.backoff(retry_no, rule.base, rule.cap, draw())


def waited_as(rule: OutcomeRule, hint: float | None) -> str:
    """How the wait was chosen, for the access log: `hint` when the upstream's replaced the rule's kind."""
    return rule.backoff if hint is None or rule.backoff == "reset" else "hint"

