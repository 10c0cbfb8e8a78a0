"""Compiled retry rules (`retry.rules`): one frozen rule per outcome group, attached to a route's RetrySpec.

Kept out of plan.py (which holds every other compiled spec) so the plan module stays one screen of
types; `RetrySpec.rules` refers to these. The decisions over them are proxy/upstream/rules.py (pure).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

BackoffKind = Literal["exponential", "fixed", "reset"]


@dataclass(frozen=True, slots=True)
class OutcomeRule:
    """The outcomes it covers, the attempts they may use and the wait before each of their retries."""

    statuses: frozenset[int]
    connect_error: bool
    timeout: bool
    attempts: int
    """Upstream calls while failures are of this rule's outcomes, the first included."""
    backoff: BackoffKind = "exponential"
    base: float = 0.25
    cap: float = 5.0
    """`exponential`: full jitter in [0, min(cap, base x 2^n))."""
    fixed: float = 0.0
    """`fixed`: the wait."""
    max_wait: float = 2.0
    """Longest upstream hint waited out; a longer one: not this deployment again in this pool."""

    def covers(self, status: int, error: str | None) -> bool:
        if error is None:
            return status in self.statuses
        return self.connect_error if error == "connect_error" else self.timeout

    def describe(self) -> dict[str, object]:
        """What `explain` shows: the effective rule, every default filled in."""
        on: list[object] = list(sorted(self.statuses))
        on += [kind for kind, flag in (("connect_error", self.connect_error), ("timeout", self.timeout)) if flag]
        backoff: object
        if self.backoff == "exponential":
            backoff = {"exponential": {"base": self.base, "max": self.cap}}
        elif self.backoff == "fixed":
            backoff = {"fixed": self.fixed}
        else:
            backoff = "reset"
        return {"on": on, "attempts": self.attempts, "backoff": backoff, "max_wait": self.max_wait}


def pool_attempts(rules: Sequence[OutcomeRule]) -> int:
    """The most attempts one pool can make: the first, plus every rule's retries."""
    return 1 + sum(rule.attempts - 1 for rule in rules)
