"""Contradictions in `retry` (the policy's and each route's), found after the schema so each points at the
value at fault (file:line): a rule list next to the single form in the same section, an outcome listed by
two rules, and `backoff: reset` on outcomes that carry no reset headers."""

from __future__ import annotations

from collections.abc import Iterator

from proxy.policy.problems import Loc
from proxy.policy.schema import Retry

Finding = tuple[Loc, str]
_NO_HEADERS = ("timeout", "connect_error")


def retry_findings(retry: Retry | None, at: Loc) -> Iterator[Finding]:
    if retry is None or retry.rules is None:
        return
    for single in ("attempts", "retry_on"):
        if getattr(retry, single) is not None:
            yield at + (single,), (
                f"`{single}` and `rules` in the same retry section contradict each other: with rules, each rule "
                "gives its outcomes and attempts (remove one of them)"
            )
    first: dict[object, int] = {}
    for j, rule in enumerate(retry.rules):
        for k, outcome in enumerate(rule.on):
            if outcome in first and first[outcome] != j:
                yield at + ("rules", j, "on", k), (
                    f"{outcome} is already retried by rules[{first[outcome]}]: an outcome may appear in one rule only"
                )
            elif outcome in first:
                yield at + ("rules", j, "on", k), f"{outcome} is listed twice in this rule"
            first.setdefault(outcome, j)
        if rule.backoff == "reset":
            for k, outcome in enumerate(rule.on):
                if outcome in _NO_HEADERS:
                    yield at + ("rules", j, "on", k), (
                        f"backoff: reset waits for the upstream's retry-after or rate-limit reset headers, and a "
                        f"{outcome} has no response to carry them: give {outcome} its own rule with exponential "
                        "or fixed backoff"
                    )
