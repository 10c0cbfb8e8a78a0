"""Retry rules: the pure decisions (upstream/rules.py), how `retry` compiles into them (policy/resilience.py),
and the contradictions validation refuses with file:line."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest
from test_policy_load import problems_of, write

from proxy.policy.outcome_rules import OutcomeRule
from proxy.policy.plan import Plan, RetrySpec
from proxy.policy.resilience import retry_spec
from proxy.policy.schema import Retry
from proxy.upstream import rules

TIMEOUTS = OutcomeRule(frozenset(), connect_error=True, timeout=True, attempts=3, base=0.1, cap=1.0)
UNAVAILABLE = OutcomeRule(frozenset({503}), False, False, attempts=5, backoff="fixed", fixed=1.0)
LIMITED = OutcomeRule(frozenset({429}), False, False, attempts=10, backoff="reset", max_wait=30.0)
SPEC = RetrySpec(attempts=16, rules=(TIMEOUTS, UNAVAILABLE, LIMITED))


def draws(*values: float) -> Callable[[], float]:
    found = iter(values)
    return lambda: next(found)


def test_each_outcome_finds_its_rule_and_never_retried_statuses_find_none() -> None:
    assert rules.rule_of(0, "timeout", None, SPEC) == 0
    assert rules.rule_of(0, "connect_error", None, SPEC) == 0
    assert rules.rule_of(503, None, None, SPEC) == 1
    assert rules.rule_of(429, None, None, SPEC) == 2
    assert rules.rule_of(500, None, None, SPEC) is None  # listed by no rule
    assert rules.rule_of(503, None, "false", SPEC) is None  # the upstream said no
    for status in (400, 401, 403, 404, 413, 422, 200, 304):
        assert rules.rule_of(status, None, "true", SPEC) is None


def test_a_rule_retries_until_its_own_attempts_are_spent() -> None:
    used = [0, 0, 0]
    verdicts = []
    for _ in range(5):
        verdict, index = rules.judge(503, None, False, None, None, used, SPEC)
        verdicts.append(verdict)
        used[index or 0] += 1
    assert verdicts == ["retry", "retry", "retry", "retry", "spent"]  # 5 attempts: 4 retries
    # Another rule's count is its own: timeouts still have all their retries.
    assert rules.judge(0, "timeout", False, None, None, used, SPEC) == ("retry", 0)
    assert rules.judge(0, "timeout", False, None, None, [2, 4, 0], SPEC) == ("spent", 0)


def test_reset_needs_the_upstreams_hint_and_the_deadline_stops_a_timeout() -> None:
    assert rules.judge(429, None, False, None, None, [0, 0, 0], SPEC) == ("relay", 2)  # nothing said: not blind
    assert rules.judge(429, None, False, None, 2.0, [0, 0, 0], SPEC) == ("retry", 2)
    assert rules.judge(0, "timeout", True, None, None, [0, 0, 0], SPEC) == ("stop", None)
    only_503 = RetrySpec(rules=(UNAVAILABLE,))
    assert rules.judge(0, "connect_error", False, None, None, [0], only_503) == ("raise", None)
    assert rules.judge(500, None, False, None, None, [0], only_503) == ("relay", None)


def test_each_backoff_kind_waits_its_own_way_and_a_hint_wins() -> None:
    assert rules.delay(UNAVAILABLE, 0, None, draws()) == 1.0
    assert rules.delay(UNAVAILABLE, 3, None, draws()) == 1.0  # fixed: no growth, no jitter, no draw
    assert rules.delay(TIMEOUTS, 0, None, draws(0.5)) == pytest.approx(0.05)
    assert rules.delay(TIMEOUTS, 2, None, draws(0.5)) == pytest.approx(0.2)
    assert rules.delay(TIMEOUTS, 9, None, draws(0.999)) < 1.0  # capped
    assert rules.delay(LIMITED, 0, 12.0, draws()) == 12.0
    assert rules.delay(UNAVAILABLE, 0, 1.5, draws()) == 1.5  # a hint replaces the rule's wait
    assert rules.delay(UNAVAILABLE, 0, 2.5, draws()) is None  # longer than max_wait (2s): not here again
    assert rules.delay(LIMITED, 0, 31.0, draws()) is None
    assert rules.waited_as(UNAVAILABLE, 1.5) == "hint" and rules.waited_as(LIMITED, 3.0) == "reset"
    assert rules.waited_as(TIMEOUTS, None) == "exponential"


def test_the_methods_a_retry_allows() -> None:
    idempotent = RetrySpec(methods=frozenset({"GET", "PUT"}))
    assert rules.method_retriable("GET", idempotent) and not rules.method_retriable("POST", idempotent)
    assert rules.method_retriable("POST", RetrySpec())


def test_rules_compile_with_their_defaults_and_the_pool_bound() -> None:
    spec = retry_spec(Retry.model_validate({
        "backoff": {"base": "100ms"},
        "max_retry_after": "3s",
        "rules": [
            {"on": ["timeout", "connect_error"], "attempts": 3},
            {"on": [503, 502], "attempts": 5, "backoff": {"fixed": "1s"}},
            {"on": [429], "attempts": 10, "backoff": "reset", "max_wait": "1m"},
            {"on": [500], "attempts": 2, "backoff": {"exponential": {"max": "2s"}}},
        ],
    }), Retry())
    assert spec.attempts == 1 + 2 + 4 + 9 + 1
    first, second, third, fourth = spec.rules
    assert (first.timeout, first.connect_error, first.backoff, first.base, first.cap) == (True, True, "exponential",
                                                                                         0.1, 5.0)
    assert (second.statuses, second.backoff, second.fixed, second.max_wait) == (frozenset({502, 503}), "fixed", 1.0,
                                                                                3.0)
    assert (third.backoff, third.max_wait) == ("reset", 60.0)
    assert (fourth.base, fourth.cap) == (0.1, 2.0)
    assert third.describe() == {"on": [429], "attempts": 10, "backoff": "reset", "max_wait": 60.0}


def test_the_nearest_section_that_says_what_is_retried_chooses_the_form() -> None:
    policy = Retry.model_validate({"rules": [{"on": [503], "attempts": 4}]})
    assert retry_spec(None, policy).rules and retry_spec(None, policy).attempts == 4
    assert retry_spec(Retry.model_validate({"max_retry_after": "1s"}), policy).rules  # still the policy's rules
    single = retry_spec(Retry.model_validate({"attempts": 2}), policy)
    assert single.rules == () and single.attempts == 2
    both = retry_spec(Retry.model_validate({"rules": [{"on": [429], "attempts": 3}]}),
                      Retry.model_validate({"attempts": 5}))
    assert [r.statuses for r in both.rules] == [frozenset({429})]


def test_tool_routes_retry_only_idempotent_methods_unless_told() -> None:
    assert retry_spec(None, Retry()).methods is None
    assert retry_spec(None, Retry(), tool=True).methods == frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
    told = retry_spec(Retry.model_validate({"methods": ["GET", "POST"]}), Retry(), tool=True)
    assert told.methods == frozenset({"GET", "POST"})


def test_the_single_form_and_one_rule_decide_alike() -> None:
    """The single form is one exponential rule: over random outcomes, both give the same verdicts and waits
    (but for x-should-retry: true on an unlisted status, which only the single form follows)."""
    from proxy.upstream import judge

    single = RetrySpec(attempts=4, statuses=frozenset({429, 503}), connect_errors=True, timeouts=False)
    rule = OutcomeRule(frozenset({429, 503}), True, False, attempts=4, base=single.backoff_base,
                       cap=single.backoff_max, max_wait=single.max_retry_after)
    ruled = RetrySpec(attempts=4, rules=(rule,))
    rng = random.Random(7)
    outcomes: list[tuple[int, rules.retry.ErrorKind | None]] = [
        (429, None), (503, None), (500, None), (0, "connect_error"), (0, "timeout"), (200, None), (401, None)]
    for _ in range(300):
        status, error = rng.choice(outcomes)
        hint = rng.choice([None, 0.5, 3.0])
        old = judge.judge(status, error, False, None, single)
        new, index = rules.judge(status, error, False, None, hint, [0], ruled)
        assert old == new, (status, error)
        if old == "retry":
            same = draws(*[rng.random()] * 2)
            ready = judge.ready_at(1, hint, single, 100.0, same)
            wait = rules.delay(rule, 1, hint, same)
            assert ready == (None if wait is None else 100.0 + wait)


RULES_PROBLEMS = """
    upstreams:
      main: {provider: openai, base_url: "http://127.0.0.1:1/v1"}
    retry:
      attempts: 3
      rules:
        - {on: [timeout, 503], attempts: 3}
        - on: [503, 429, connect_error]
          attempts: 2
          backoff: reset
        - {on: [500, 500], attempts: 2}
    routes:
      - name: chat
        upstream: main
        retry: {rules: [{on: [429], attempts: 2, backoff: {fixed: 1s}}], retry_on: [429]}
    """


def test_contradictions_in_rules_are_refused_with_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path / "p.yaml", RULES_PROBLEMS)
    found = [(p.mark.line if p.mark else 0, p.path, p.message.split(":")[0]) for p in problems_of(path)]
    assert found == [
        (4, "retry.attempts", "`attempts` and `rules` in the same retry section contradict each other"),
        (7, "retry.rules[1].on[0]", "503 is already retried by rules[0]"),
        (7, "retry.rules[1].on[2]", "backoff"),  # reset on a connect error: no headers to follow
        (10, "retry.rules[2].on[1]", "500 is listed twice in this rule"),
        (14, "routes[0].retry.retry_on", "`retry_on` and `rules` in the same retry section contradict each other"),
    ]


def test_rules_outside_the_schema_are_refused_with_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path / "p.yaml", """
        upstreams:
          main: {provider: openai, base_url: "http://127.0.0.1:1/v1"}
        routes:
          - name: chat
            upstream: main
            retry:
              rules:
                - {on: [500], attempts: 0}
                - {on: [401], attempts: 2, backoff: linear}
        """)
    found = {(p.mark.line if p.mark else 0, p.path) for p in problems_of(path)}
    assert (8, "routes[0].retry.rules[0].attempts") in found  # attempts below 1
    assert (9, "routes[0].retry.rules[1].on") in found  # 401 is never retried
    assert any(line == 9 and where.startswith("routes[0].retry.rules[1].backoff") for line, where in found)


def test_a_plain_on_key_is_the_word_not_a_boolean(make_plan: Callable[[str], Plan]) -> None:
    plan = make_plan("""
        upstreams:
          main: {provider: openai, base_url: "http://127.0.0.1:1/v1"}
        routes:
          - name: chat
            upstream: main
            retry:
              rules:
                - on: [503]
                  attempts: 2
        """)
    assert plan.routes[0].retry.rules[0].statuses == frozenset({503})
