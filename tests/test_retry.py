"""Pure retry decisions: classification, backoff sequence and caps, upstream hint parsing (every format,
garbage included), budget arithmetic, deployment choice, and the compiled retry settings' precedence.
No sockets, no sleeping: time and randomness are passed in."""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.policy.plan import DeploymentSpec, Plan, RetrySpec
from proxy.upstream import balance, budget, hints, retry

NOW = 1_750_000_000.0  # a fixed wall clock
ON = RetrySpec(attempts=3, timeouts=True)


# --- classification ------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504, 529])
def test_overload_and_server_errors_retry(status: int) -> None:
    assert retry.status_retriable(status, ON)


@pytest.mark.parametrize("status", [200, 201, 204, 301, 400, 401, 403, 404, 413, 422, 501, 409, 408])
def test_success_client_errors_and_unlisted_statuses_do_not(status: int) -> None:
    assert not retry.status_retriable(status, ON)


def test_the_upstreams_x_should_retry_overrides_the_list_but_never_for_client_errors() -> None:
    assert not retry.status_retriable(503, ON, "false")
    assert retry.status_retriable(409, ON, "true")
    assert retry.status_retriable(503, ON, " TRUE ")
    assert not retry.status_retriable(400, ON, "true")  # a bad request stays bad
    assert not retry.status_retriable(200, ON, "true")
    assert retry.status_retriable(503, ON, "maybe")  # garbage: ignored


def test_errors_retry_as_configured() -> None:
    assert retry.error_retriable("connect_error", ON) and retry.error_retriable("timeout", ON)
    default = RetrySpec()
    assert retry.error_retriable("connect_error", default) and not retry.error_retriable("timeout", default)
    off = RetrySpec(connect_errors=False)
    assert not retry.error_retriable("connect_error", off)


def test_what_counts_against_a_circuit() -> None:
    assert [s for s in (200, 400, 429, 500, 503, 529) if retry.breaker_failure(s)] == [500, 503, 529]


# --- backoff ---------------------------------------------------------------------------------------------


def test_full_jitter_backoff_doubles_up_to_the_cap() -> None:
    spec = RetrySpec(backoff_base=0.25, backoff_max=5.0)
    tops = [retry.backoff(n, spec.backoff_base, spec.backoff_max, 0.999999) for n in range(8)]
    assert [round(t, 3) for t in tops] == [0.25, 0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]
    assert retry.backoff(3, 0.25, 5.0, 0.0) == 0.0
    assert retry.backoff(3, 0.25, 5.0, 0.5) == pytest.approx(1.0)


def test_backoff_sequence_from_a_seeded_random_source_is_reproducible_and_bounded() -> None:
    def sequence(seed: int) -> list[float]:
        rng = random.Random(seed)
        return [retry.backoff(n, 0.1, 1.0, rng.random()) for n in range(6)]

    assert sequence(7) == sequence(7) != sequence(8)
    for n, value in enumerate(sequence(7)):
        assert 0.0 <= value < min(1.0, 0.1 * 2**n)


@given(st.integers(min_value=0, max_value=10_000), st.floats(min_value=0, max_value=1, exclude_max=True))
def test_backoff_never_exceeds_the_cap(n: int, rand: float) -> None:
    assert 0.0 <= retry.backoff(n, 0.25, 5.0, rand) <= 5.0


def test_a_hint_replaces_the_backoff_and_a_long_one_is_not_waited_out() -> None:
    spec = RetrySpec(max_retry_after=2.0)
    assert retry.delay(0, 0.2, spec, 0.9) == 0.2
    assert retry.delay(0, None, spec, 0.5) == pytest.approx(0.125)
    assert not retry.hint_too_long(2.0, spec) and retry.hint_too_long(2.01, spec)
    assert not retry.hint_too_long(None, spec)


def test_never_sleep_past_the_deadline() -> None:
    assert retry.fits(10.0, 0.5, 11.0)
    assert not retry.fits(10.0, 1.0, 11.0)
    assert not retry.fits(10.0, 2.0, 11.0)
    assert retry.stop_reason_final("deadline")
    assert not retry.stop_reason_final("attempts") and not retry.stop_reason_final("budget")


# --- hints -----------------------------------------------------------------------------------------------


def test_retry_after_ms_is_read_first() -> None:
    assert hints.retry_hint({"retry-after-ms": "250", "retry-after": "7"}, NOW) == 0.25
    assert hints.retry_hint({"retry-after-ms": "12.5"}, NOW) == 0.0125


def test_retry_after_in_seconds_and_as_an_http_date() -> None:
    assert hints.retry_hint({"retry-after": "0.2"}, NOW) == 0.2
    assert hints.retry_hint({"retry-after": "7"}, NOW) == 7.0
    when = datetime.fromtimestamp(NOW, tz=UTC) + timedelta(seconds=30)
    assert hints.retry_hint({"retry-after": format_datetime(when, usegmt=True)}, NOW) == pytest.approx(30.0)
    past = datetime.fromtimestamp(NOW, tz=UTC) - timedelta(seconds=30)
    assert hints.retry_after(format_datetime(past, usegmt=True), NOW) == 0.0


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("1s", 1.0), ("6m0s", 360.0), ("20ms", 0.02), ("1h2m3.5s", 3723.5), ("500us", 0.0005), ("0s", 0.0),
     ("1.5s", 1.5), ("2", 2.0), ("7µs", 7e-6)],
)
def test_openai_reset_durations(value: str, seconds: float) -> None:
    assert hints.go_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["", "s", "1x", "1s2", "-1s", "ms1", "1 s", "abc", "1s-", "nan", "inf", "99999h"])
def test_garbage_durations_give_nothing(value: str) -> None:
    assert hints.go_duration(value) is None


def test_openai_reset_headers_pick_the_exhausted_limit() -> None:
    headers = {
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "1s",
        "x-ratelimit-remaining-tokens": "5000",
        "x-ratelimit-reset-tokens": "6m0s",
    }
    assert hints.retry_hint(headers, NOW) == 1.0
    assert hints.exhausted_for(headers, NOW) == 1.0
    # A 429 that names no exhausted limit: the latest reset given.
    assert hints.retry_hint({"x-ratelimit-reset-tokens": "20ms", "x-ratelimit-reset-requests": "1s"}, NOW) == 1.0
    # A success with limits left is no reason to hold.
    assert hints.exhausted_for({"x-ratelimit-remaining-requests": "9", "x-ratelimit-reset-requests": "1s"}, NOW) is None


def test_anthropic_reset_timestamps() -> None:
    reset = datetime.fromtimestamp(NOW + 12, tz=UTC).isoformat().replace("+00:00", "Z")
    headers = {"anthropic-ratelimit-requests-remaining": "0", "anthropic-ratelimit-requests-reset": reset}
    assert hints.retry_hint(headers, NOW) == pytest.approx(12.0)
    assert hints.exhausted_for(headers, NOW) == pytest.approx(12.0)
    tokens = {"anthropic-ratelimit-output-tokens-remaining": "0", "anthropic-ratelimit-output-tokens-reset": reset}
    assert hints.exhausted_for(tokens, NOW) == pytest.approx(12.0)
    assert hints.rfc3339("2020-01-01T00:00:00Z", NOW) == 0.0  # in the past: now
    assert hints.rfc3339("2026-13-01T00:00:00Z", NOW) is None
    assert hints.rfc3339("2026-01-01T00:00:00", NOW) is None  # no zone: ambiguous, ignored


@pytest.mark.parametrize(
    "headers",
    [
        {"retry-after": "soon"},
        {"retry-after": "-5"},
        {"retry-after": "nan"},
        {"retry-after": "1e9"},
        {"retry-after-ms": "-1"},
        {"retry-after-ms": "lots"},
        {"retry-after": "Wed, 99 Foo 2026 99:99:99 GMT"},
        {"x-ratelimit-reset-requests": "later"},
        {"anthropic-ratelimit-tokens-reset": "yesterday"},
        {},
    ],
)
def test_garbage_hints_give_nothing(headers: dict[str, str]) -> None:
    assert hints.retry_hint(headers, NOW) is None


def test_a_garbage_retry_after_falls_through_to_the_reset_headers() -> None:
    headers = {"retry-after": "soon", "x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "3s"}
    assert hints.retry_hint(headers, NOW) == 3.0


@given(st.text(max_size=40))
def test_hint_parsing_never_raises(value: str) -> None:
    for name in ("retry-after", "retry-after-ms", "x-ratelimit-reset-tokens", "anthropic-ratelimit-requests-reset"):
        result = hints.retry_hint({name: value, "x-ratelimit-remaining-tokens": "0"}, NOW)
        assert result is None or 0.0 <= result <= hints.MAX_HINT


# --- budget ------------------------------------------------------------------------------------------------


def test_retry_budget_is_a_share_of_the_first_attempts_in_a_ten_second_window() -> None:
    b = budget.RetryBudget()
    now = 1000.0
    assert b.allows(now, 20, 0) is False  # no traffic, no floor: nothing to retry
    assert b.allows(now, 20, 1) is True  # the floor: 1 a second, 10 in the window
    for i in range(100):
        b.request(now + i * 0.05)  # 100 first attempts over 5 s
    now += 5.0
    for _ in range(20):
        assert b.allows(now, 20, 0)
        b.retry(now)
    assert not b.allows(now, 20, 0)  # 20 % of 100
    assert b.allows(now, 20, 3)  # the floor, 3 a second = 30 in the window, is larger
    assert b.counts(now) == (100, 20)
    # A retry costs once, whatever it then waits: later first attempts make room again.
    for _ in range(10):
        b.request(now)
    assert b.allows(now, 20, 0) and b.counts(now) == (110, 20)
    # Slots age out second by second: 10 s after the first second, its 20 requests have gone.
    assert b.counts(now + 5.0) == (110 - 20, 20)
    assert b.counts(now + 60.0) == (0, 0)
    assert budget.allowance(7, 20, 0) == 1 and budget.allowance(7, 20, 1) == 10


# --- balancing ----------------------------------------------------------------------------------------------


def test_weighted_choice_follows_the_weights() -> None:
    rng = random.Random(1)
    counts = [0, 0, 0]
    for _ in range(6000):
        counts[balance.pick("weighted", [1.0, 2.0, 3.0], [0, 0, 0], [0, 1, 2], rng.random())] += 1
    assert [round(c / 1000) for c in counts] == [1, 2, 3]
    assert balance.weighted([1.0, 2.0], [1], 0.99) == 1  # only candidates are chosen


def test_least_outstanding_per_weight_and_random_ties() -> None:
    assert balance.pick("least_outstanding", [1.0, 1.0, 1.0], [4, 1, 2], [0, 1, 2], 0.0) == 1
    assert balance.pick("least_outstanding", [1.0, 4.0], [2, 4], [0, 1], 0.0) == 1  # 4/4 < 2/1
    assert {balance.pick("least_outstanding", [1.0, 1.0], [0, 0], [0, 1], r) for r in (0.1, 0.9)} == {0, 1}


# --- compiled settings and their precedence ----------------------------------------------------------------


def test_retry_settings_precedence_route_then_policy_then_default(make_plan: Callable[[str], Plan]) -> None:
    plan = make_plan(
        """
        upstreams:
          a: {provider: mock}
          b: {provider: mock, breaker: {cooldown: 2s}, timeouts: {first_token: 9s}}
        tenants:
          t: {keys: [k]}
        retry: {attempts: 2, max_retry_after: 1s, budget: {percent: 10}}
        breaker: {consecutive_failures: 3}
        routes:
          - name: pool
            match: {model: pool}
            deployments: [{upstream: a, model: x, weight: 3}, {upstream: b}]
            balance: least_outstanding
            retry: {attempts: 4, retry_on: [503, timeout], backoff: {base: 10ms}}
            fallbacks: [plain]
          - name: plain
            upstream: a
            model: y
        """
    )
    pool, plain = plan.routes
    assert pool.retry == RetrySpec(
        attempts=4, statuses=frozenset({503}), connect_errors=False, timeouts=True, backoff_base=0.01,
        backoff_max=5.0, max_retry_after=1.0, budget_percent=10.0, budget_min=3,
    )
    assert plain.retry.attempts == 2 and plain.retry.statuses == frozenset({429, 500, 502, 503, 504, 529})
    assert pool.balance == "least_outstanding" and pool.fallbacks == ("plain",)
    a, b = pool.deployments
    assert (a.id, a.upstream, a.model, a.weight) == ("a/x", "a", "x", 3.0)
    assert (b.id, b.model, b.timeouts.first_token) == ("b", None, 9.0)
    assert a.breaker.consecutive_failures == b.breaker.consecutive_failures == 3
    assert (a.breaker.cooldown, b.breaker.cooldown) == (5.0, 2.0)
    assert pool.upstream == "a"  # the first deployment's, for limits and explain
    assert plain.deployments == (DeploymentSpec("a/y", "a", "y", 1.0, a.timeouts, a.breaker, a.pacing),)
    assert plan.routes_by_name["plain"] is plain


@pytest.mark.parametrize(
    ("route", "fragment"),
    [
        ("upstream: a, deployments: [{upstream: a}]", "not both"),
        ("deployments: [{upstream: nope}]", "undefined upstream 'nope'"),
        ("upstream: a, fallbacks: [ghost]", "undefined route 'ghost'"),
        ("upstream: a, fallbacks: [r]", "own fallback"),
        ("upstream: a, retry: {retry_on: [404]}", "not retriable"),
        ("upstream: a, retry: {attempts: 0}", "greater than or equal to 1"),
        ("deployments: []", "at least 1"),
    ],
)
def test_invalid_pools_and_retry_sections_are_refused(
    make_plan: Callable[[str], Plan], route: str, fragment: str
) -> None:
    from proxy.policy.load import PolicyError

    with pytest.raises(PolicyError) as info:
        make_plan(
            f"""
            upstreams:
              a: {{provider: mock}}
            routes:
              - {{name: r, {route}}}
            """
        )
    assert fragment in str(info.value)
