"""Rate units and headroom, pure: the sliding window at every unit (second, minute, hour, day) with a fake
clock, several units in one limit (each its own window, all must admit), headroom (the share of a limit a
lower priority class must leave free), the x-ratelimit-* meter of a limit with several windows, the 429
wording, and the policy side (`*_per_*` fields, `queues.NAME.reserve` validation and compilation)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from proxy.admission.limits import KeyState, Refusal, describe, ratelimit_headers
from proxy.admission.local import LocalStore
from proxy.admission.redis.degrade import local_share
from proxy.admission.store import Reservation
from proxy.policy.compile import compile_plan
from proxy.policy.explain import explain
from proxy.policy.explain_text import format_text
from proxy.policy.load import PolicyError, load_policy
from proxy.policy.plan import Limit, LimitSpec, Plan, QueueSpec, headroom_for

UNITS = {"second": 1.0, "minute": 60.0, "hour": 3600.0, "day": 86400.0}


class Clock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def limit(key: str = "tenant:a", **numbers: int) -> Limit:
    return Limit(key, f"tenant '{key}'", "a", LimitSpec(**numbers))  # type: ignore[arg-type]


def at_unit(unit: str, windows: float, rate: str, value: int) -> tuple[float, Clock, LocalStore, Limit]:
    """(the unit's length, a clock `windows` of them in, a store on it, a limit of `value` `rate`s per unit)."""
    length = UNITS[unit]
    clock = Clock(windows * length)
    return length, clock, LocalStore(clock), limit(**{f"{rate}_per_{unit}": value})


# --- every unit: the same sliding window, scaled ---------------------------------------------------------


@pytest.mark.parametrize("unit", list(UNITS))
async def test_each_unit_is_a_sliding_window_of_its_own_length(unit: str) -> None:
    length, clock, store, lim = at_unit(unit, 10.25, "requests", 4)  # a quarter into a window
    for _ in range(4):
        assert isinstance(await store.try_acquire([lim], 0), Reservation)
    refused = await store.try_acquire([lim], 0)
    assert isinstance(refused, Refusal) and refused.dimension == "requests" and refused.unit == unit
    assert refused.exact
    # All 4 were counted in this window: one fits once a quarter of them has slid out of the next one,
    # i.e. a quarter into the next window (the same arithmetic as per minute, scaled to the unit).
    assert refused.retry_after == pytest.approx(length, rel=1e-9)
    clock.now += refused.retry_after * (1 - 1e-6)
    assert isinstance(await store.try_acquire([lim], 0), Refusal)  # a moment before: still refused
    clock.now += refused.retry_after * 2e-6
    assert isinstance(await store.try_acquire([lim], 0), Reservation)


@pytest.mark.parametrize("unit", list(UNITS))
async def test_tokens_per_unit_reserve_and_refund_into_the_window_they_were_counted_in(unit: str) -> None:
    length, clock, store, lim = at_unit(unit, 3, "tokens", 1000)
    held = await store.try_acquire([lim], 900)
    assert isinstance(held, Reservation)
    refused = await store.try_acquire([lim], 200)
    assert isinstance(refused, Refusal) and refused.dimension == "tokens" and refused.unit == unit
    assert not refused.exact  # 900 reserved, not settled: a refund may free them early
    clock.now += length * 0.5  # the settle comes later, still in the same window
    await store.settle(held, requests=1, tokens=100)
    assert isinstance(await store.try_acquire([lim], 200), Reservation)
    (usage,) = await store.remaining(["tenant:a"])
    assert usage.tokens is not None and usage.tokens.used == pytest.approx(300)
    assert usage.tokens.name == f"tokens_per_{unit}"


async def test_the_minute_of_a_test_store_scales_every_unit() -> None:
    """`LocalStore(window=...)` sets the length of a minute; a second is 1/60 of it, a day 1,440 minutes."""
    clock = Clock(0.0)
    store = LocalStore(clock, window=6.0)  # a "minute" of 6 s: a second is 0.1 s, an hour 360 s
    lim = limit(requests_per_second=1, requests_per_hour=2)
    assert isinstance(await store.try_acquire([lim], 0), Reservation)
    refused = await store.try_acquire([lim], 0)
    assert isinstance(refused, Refusal) and refused.unit == "second"
    assert refused.retry_after == pytest.approx(0.2)  # one 0.1 s window to close, then all of the next
    clock.now = 0.2
    assert isinstance(await store.try_acquire([lim], 0), Reservation)
    clock.now = 0.4
    refused = await store.try_acquire([lim], 0)
    assert isinstance(refused, Refusal) and refused.unit == "hour"
    assert refused.retry_after == pytest.approx(360 + 180 - 0.4)  # half of the next 360 s "hour"


# --- several units in one limit ----------------------------------------------------------------------


async def test_per_second_and_per_day_in_one_limit_both_bind() -> None:
    """OpenAI publishes a per-minute and a per-day limit together; a self-hosted server a per-second one.
    Each unit is its own window and all must admit: the second limits bursts, the day the total."""
    clock = Clock(86400.0 * 100 + 0.5)
    store = LocalStore(clock)
    lim = limit(requests_per_second=2, requests_per_day=5)
    admitted, refusals = 0, []
    for _ in range(12):  # 4 tries per second for 3 seconds
        for _ in range(4):
            result = await store.try_acquire([lim], 0)
            if isinstance(result, Reservation):
                admitted += 1
            else:
                refusals.append(result)
        clock.now += 1.0
    assert admitted == 5  # the day's five, spread two per second by the per-second window
    units = [r.unit for r in refusals]
    assert units[:2] == ["second", "second"]  # the first second: 2 admitted, 2 refused by the second
    assert units[-1] == "day"  # the day's five are gone: refused for the day, however quiet the second
    last = refusals[-1]
    assert last.retry_after is not None and last.retry_after > 86400 / 2  # not before the day slides
    (usage,) = await store.remaining(["tenant:a"])
    assert [(m.name, m.used) for m in usage.windows] == [
        ("requests_per_second", pytest.approx(0.0)), ("requests_per_day", pytest.approx(5.0)),
    ]


async def test_tokens_per_minute_and_per_day_both_bind_and_a_refusal_is_never_counted() -> None:
    clock = Clock(60.0 * 10)
    store = LocalStore(clock)
    lim = limit(tokens_per_minute=1000, tokens_per_day=1500)
    assert isinstance(await store.try_acquire([lim], 800), Reservation)
    refused = await store.try_acquire([lim], 300)
    assert isinstance(refused, Refusal) and refused.unit == "minute"
    clock.now += 120  # the minute is free again, the day is not
    refused = await store.try_acquire([lim], 800)
    assert isinstance(refused, Refusal) and refused.unit == "day"
    assert isinstance(await store.try_acquire([lim], 700), Reservation)
    (usage,) = await store.remaining(["tenant:a"])
    assert {m.name: m.used for m in usage.windows} == {"tokens_per_minute": 700, "tokens_per_day": 1500}


def test_a_reload_that_adds_a_unit_keeps_the_counts_of_the_units_it_keeps() -> None:
    state = KeyState(limit(requests_per_minute=10))
    for _ in range(6):
        state.take(5.0, 0)
    state.configure(limit(requests_per_minute=10, requests_per_day=100))
    usage = state.usage(6.0)
    assert {m.name: m.used for m in usage.windows} == {"requests_per_minute": 6, "requests_per_day": 0}
    state.configure(limit(requests_per_day=100))  # the minute is gone, the day kept
    assert [m.name for m in state.usage(6.0).windows] == ["requests_per_day"]


def test_headers_report_the_tightest_window_of_each_dimension() -> None:
    """OpenAI's x-ratelimit-*-requests name no unit: they report the window with the fewest left."""
    state = KeyState(limit(requests_per_second=10, requests_per_day=12))
    for _ in range(8):
        state.take(0.5, 0)
    headers = ratelimit_headers(state.usage(0.5))
    assert headers["x-ratelimit-limit-requests"] == "10"  # 2 left this second, 4 today
    assert headers["x-ratelimit-remaining-requests"] == "2"
    later = ratelimit_headers(state.usage(2.5))  # the second is empty again: the day binds
    assert (later["x-ratelimit-limit-requests"], later["x-ratelimit-remaining-requests"]) == ("12", "4")


def test_describe_names_the_unit_that_refused() -> None:
    spec = LimitSpec(requests_per_second=5, requests_per_day=1000, tokens_per_minute=20_000, concurrent=3)
    assert describe(spec, "requests", "second") == "allows 5 requests per second"
    assert describe(spec, "requests") == "allows 5 requests per second and 1000 requests per day"
    assert describe(spec, "tokens", "minute") == "allows 20000 tokens per minute"
    assert describe(spec, "concurrent") == "allows 3 requests at once"
    assert describe(spec, "requests", "day", 0.3) == (
        "allows 1000 requests per day (30% of it kept free for higher priority classes)"
    )


def test_local_share_divides_every_unit() -> None:
    shared = limit(requests_per_second=10, requests_per_day=1000, tokens_per_hour=90, concurrent=4)
    assert local_share(shared, 3).spec == LimitSpec(
        requests_per_second=3, requests_per_day=333, tokens_per_hour=30, concurrent=1
    )


# --- headroom --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("unit", list(UNITS))
async def test_headroom_keeps_a_share_of_each_window_free_for_higher_classes(unit: str) -> None:
    length, clock, store, lim = at_unit(unit, 7, "requests", 10)
    low = 0
    while isinstance(await store.try_acquire([lim], 0, headroom=0.2), Reservation):
        low += 1
    assert low == 8  # 20% of the window stays free for the classes above
    refused = await store.try_acquire([lim], 0, headroom=0.2)
    assert isinstance(refused, Refusal) and refused.exact and refused.headroom == 0.2
    # retry_after is when it fits above the headroom: 1 of the 8 must slide out of the next window.
    assert refused.retry_after == pytest.approx(length + length / 8)
    assert isinstance(await store.try_acquire([lim], 0, headroom=0.1), Reservation)  # a middle class: 9
    assert isinstance(await store.try_acquire([lim], 0, headroom=0.1), Refusal)
    assert isinstance(await store.try_acquire([lim], 0), Reservation)  # the top class takes the last one
    top = await store.try_acquire([lim], 0)
    assert isinstance(top, Refusal) and top.headroom == 0.0
    clock.now += refused.retry_after * (1 - 1e-9) - 1e-9 * length
    assert isinstance(await store.try_acquire([lim], 0, headroom=0.2), Refusal)


async def test_headroom_applies_to_tokens_and_concurrency_too() -> None:
    clock = Clock(0.5)
    store = LocalStore(clock)
    tokens = limit("route:t", tokens_per_minute=1000)
    assert isinstance(await store.try_acquire([tokens], 600, headroom=0.3), Reservation)
    refused = await store.try_acquire([tokens], 200, headroom=0.3)  # 800 > 700
    assert isinstance(refused, Refusal) and refused.dimension == "tokens"
    assert isinstance(await store.try_acquire([tokens], 100, headroom=0.3), Reservation)  # 700: fits
    never = await store.try_acquire([tokens], 800, headroom=0.3)  # bigger than 70% of the limit
    assert isinstance(never, Refusal) and never.retry_after is None
    slots = limit("route:c", concurrent=5)
    held = [await store.try_acquire([slots], 0, headroom=0.4) for _ in range(4)]
    assert [isinstance(h, Reservation) for h in held] == [True, True, True, False]  # 3 = 5 x 60%
    refusal = held[3]
    assert isinstance(refusal, Refusal) and refusal.dimension == "concurrent" and not refusal.exact
    assert isinstance(await store.try_acquire([slots], 0), Reservation)  # the top class: 4 and 5
    assert isinstance(await store.try_acquire([slots], 0), Reservation)
    assert isinstance(await store.try_acquire([slots], 0), Refusal)


# --- policy: units and reserves ----------------------------------------------------------------------------


POLICY = """
priorities: [host, planner, critic, reporter]
upstreams:
  llm: {{provider: mock, limits: {{requests_per_minute: 500, requests_per_day: 10000}}}}
tenants:
  app: {{keys: [sk-app], limits: {{requests_per_second: 5, tokens_per_hour: 90000}}}}
queues:
  agents: {{concurrency: 50{queue}}}
routes:
  - name: chat
    upstream: llm
    queue: agents
    limits: {{tokens_per_day: 1000000, per_tenant: {{requests_per_hour: 100}}}}
"""


def compile_text(write_policy: Callable[..., Path], text: str) -> Plan:
    return compile_plan(load_policy(write_policy(text)))


def test_every_unit_compiles_where_limits_are_written(write_policy: Callable[..., Path]) -> None:
    plan = compile_text(write_policy, POLICY.format(queue=""))
    route = plan.routes[0]
    assert plan.tenants["app"].limit is not None
    assert plan.tenants["app"].limit.spec == LimitSpec(requests_per_second=5, tokens_per_hour=90000)
    assert route.limit is not None and route.limit.spec == LimitSpec(tokens_per_day=1_000_000)
    (tenant, route_limit, pair) = route.limit_sets["app"].limits
    assert pair.spec == LimitSpec(requests_per_hour=100)
    assert route.limit_sets["app"].tokens  # tokens per hour and per day count tokens
    up = plan.upstreams["llm"].limit
    assert up is not None and up.spec == LimitSpec(requests_per_minute=500, requests_per_day=10000)
    assert route.deployments[0].limit == up and not route.upstream_tokens
    assert plan.queues["agents"].headroom == ()


def test_reserves_compile_into_the_headroom_each_class_leaves(write_policy: Callable[..., Path]) -> None:
    plan = compile_text(write_policy, POLICY.format(queue=", reserve: {host: 20%, planner: 10}"))
    queue = plan.queues["agents"]
    assert queue.headroom == pytest.approx((0.0, 0.2, 0.3, 0.3))
    assert [headroom_for(queue, c) for c in range(4)] == pytest.approx([0.0, 0.2, 0.3, 0.3])
    assert headroom_for(None, 2) == 0.0
    assert headroom_for(QueueSpec("q", None, 10, 1.0, None, False), 3) == 0.0


@pytest.mark.parametrize(
    ("reserve", "message"),
    [
        ("{hots: 20%}", "unknown priority class 'hots' (priorities: host, planner, critic, reporter)"),
        ("{reporter: 10%}", "'reporter' is the lowest priority class"),
        ("{host: 60%, planner: 40%}", "the reserves add up to 100% or more"),
        ("{host: 120%}", "invalid percentage"),
        ("{host: lots}", "invalid percentage"),
    ],
)
def test_bad_reserves_are_refused_with_their_place(
    write_policy: Callable[..., Path], reserve: str, message: str
) -> None:
    path = write_policy(POLICY.format(queue=f",\n    reserve: {reserve}"))
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    (problem,) = caught.value.problems
    assert message in problem.message
    assert problem.mark is not None and (problem.mark.file, problem.mark.line) == (str(path), 8)
    assert problem.path.startswith("queues.agents.reserve")


def test_explain_shows_every_unit_and_each_class_headroom(write_policy: Callable[..., Path]) -> None:
    loaded = load_policy(write_policy(POLICY.format(queue=", reserve: {host: 20%, planner: 10%}")))
    answer = explain(loaded, compile_plan(loaded), model="m", path="/v1/chat/completions", tenant="app")
    checks = {c["key"]: c for c in answer["limits"]["checks"]}
    assert checks["tenant:app"]["requests_per_second"] == 5 and checks["tenant:app"]["tokens_per_hour"] == 90000
    assert checks["route:chat"]["tokens_per_day"] == 1_000_000
    assert checks["upstream:llm"]["requests_per_day"] == 10000
    assert answer["queue"]["headroom_by_class"] == {
        "value": {"host": "0%", "planner": "20%", "critic": "30%", "reporter": "30%"}, "from": "queues.agents",
    }
    text = format_text(answer)
    assert "requests_per_second=5, tokens_per_hour=90000" in text
    assert "requests_per_minute=500, requests_per_day=10000" in text
