"""Dispatch's side of retry rules (`retry.rules`): what one pool remembers between attempts (each rule's
failures, what the last outcome was judged) and the wait it plans before the next retry. The decisions
themselves are rules.py (pure); attempt.py calls these only for a route with rules, so a route in the
single form (every LLM route by default) runs the code it always ran.
"""

from __future__ import annotations

from collections.abc import Callable

from proxy.policy.plan import RetrySpec
from proxy.upstream import retry, rules


class RuleTrack:
    """One pool's rule state: failures counted per rule, and the verdict on the last outcome."""

    __slots__ = ("used", "verdict", "index")

    def __init__(self, count: int) -> None:
        self.used = [0] * count
        self.verdict: rules.RuleVerdict = "relay"
        self.index: int | None = None

    def judge(self, status: int, error: retry.ErrorKind | None, bound: bool, should_retry: str | None,
              hint: float | None, spec: RetrySpec) -> rules.RuleVerdict:
        verdict, index = rules.judge(status, error, bound, should_retry, hint, self.used, spec)
        self.verdict, self.index = verdict, index
        if verdict in ("retry", "spent") and index is not None:
            self.used[index] += 1
        return verdict

    def plan(self, hint: float | None, spec: RetrySpec, now: float, draw: Callable[[], float]
             ) -> tuple[float | None, float | None, str]:
        """After a "retry": (when the deployment may be tried again or None when not in this pool, the
        wait chosen, how it was chosen)."""
        assert self.index is not None
        rule = spec.rules[self.index]
        wait = rules.delay(rule, self.used[self.index] - 1, hint, draw)
        return (None if wait is None else now + wait), wait, rules.waited_as(rule, hint)
