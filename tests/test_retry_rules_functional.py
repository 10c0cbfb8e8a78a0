"""Retry by outcome end to end: the proxy in front of built-in mock upstreams whose faults are scripted in
order (`times`), the openai SDK as the client (its own retries off). Each rule's attempt count and backoff
kind, and the order of the upstream hints the proxy honoured, read from what the client got and from the
access log's attempts; never from durations."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import openai
import pytest
from conftest import Proxy
from kit import build_policy

pytestmark = pytest.mark.timeout(30)

StartProxy = Callable[..., Awaitable[Proxy]]
MakeOpenAI = Callable[..., openai.AsyncOpenAI]
MESSAGES: Any = [{"role": "user", "content": "which signal is at danger?"}]

RULES = [
    {"on": ["timeout", "connect_error"], "attempts": 3, "backoff": {"exponential": {"base": "1ms", "max": "2ms"}}},
    {"on": [503], "attempts": 5, "backoff": {"fixed": "20ms"}},
    {"on": [429], "attempts": 4, "backoff": "reset"},
]
SCENARIOS: dict[str, list[dict[str, Any]]] = {
    "fixed": [{"kind": "status", "status": 503, "times": 4}],
    "spent": [{"kind": "status", "status": 503, "times": 6}],
    "reset": [{"kind": "status", "status": 429, "retry_after": ms, "times": 1} for ms in ("300ms", "100ms", "200ms")],
    "blind": [{"kind": "status", "status": 429, "times": 1}],
    "timeouts": [{"kind": "stall", "stall": "2s", "times": 2}],
    "mixed": [{"kind": "drop", "after_events": 0, "times": 1}, {"kind": "status", "status": 503, "times": 1}],
    "never": [{"kind": "status", "status": 401, "times": 1}],
}


def rules_policy() -> str:
    upstreams = {name: {"provider": "mock", "mock": {"faults": faults, "seed": 1}}
                 for name, faults in SCENARIOS.items()}
    routes = [{"name": name, "match": {"model": name}, "upstream": name} for name in SCENARIOS]
    return build_policy(
        upstreams, routes,
        retry={"rules": RULES, "max_retry_after": "5s", "budget": {"min_retries": 100}},
        timeouts={"first_token": "300ms"},
    )


async def call(client: openai.AsyncOpenAI, model: str) -> tuple[int, dict[str, str]]:
    try:
        raw = await client.chat.completions.with_raw_response.create(model=model, messages=MESSAGES)
    except openai.APIStatusError as exc:
        return exc.status_code, dict(exc.response.headers)
    return raw.status_code, dict(raw.headers)


def attempts_of(proxy: Proxy, route: str) -> list[dict[str, Any]]:
    lines = [line for line in proxy.access_lines() if line["route"] == route]
    assert len(lines) == 1
    found: list[dict[str, Any]] = lines[0]["attempts"]
    return found


async def test_each_rule_retries_its_outcomes_its_own_way(start_proxy: StartProxy, async_openai: MakeOpenAI) -> None:
    proxy = await start_proxy(rules_policy())
    client = async_openai(proxy)
    results = {name: await call(client, name) for name in SCENARIOS}
    proxy.state.access_log.flush()

    # 503: fixed backoff, up to 5 attempts. Four 503s then the answer.
    status, headers = results["fixed"]
    assert status == 200 and headers["x-signalbox-attempts"] == "5"
    fixed = attempts_of(proxy, "fixed")
    assert [a["status"] for a in fixed] == [503, 503, 503, 503, 200]
    assert [(a.get("wait_ms"), a.get("after")) for a in fixed] == [(None, None)] + [(20.0, "fixed")] * 4

    # Six 503s: the rule's 5 attempts are spent and the last 503 is relayed.
    status, headers = results["spent"]
    assert status == 503 and headers["x-signalbox-attempts"] == "5"

    # 429: `reset` waits what the upstream said, each hint in turn.
    status, headers = results["reset"]
    assert status == 200 and headers["x-signalbox-attempts"] == "4"
    reset = attempts_of(proxy, "reset")
    assert [a["status"] for a in reset] == [429, 429, 429, 200]
    assert [(a.get("wait_ms"), a.get("after")) for a in reset[1:]] == [(300.0, "reset"), (100.0, "reset"),
                                                                      (200.0, "reset")]
    # A 429 that says nothing about its reset is not retried blind.
    status, headers = results["blind"]
    assert status == 429 and headers["x-signalbox-attempts"] == "1"

    # Timeouts: exponential backoff, 3 attempts; two stalls, then the answer.
    status, headers = results["timeouts"]
    assert status == 200 and headers["x-signalbox-attempts"] == "3"
    timeouts = attempts_of(proxy, "timeouts")
    assert [(a["status"], a["error"]) for a in timeouts] == [(0, "upstream_timeout"), (0, "upstream_timeout"),
                                                             (200, None)]
    assert [a.get("after") for a in timeouts] == [None, "exponential", "exponential"]
    assert all(a["wait_ms"] <= 2 for a in timeouts[1:])

    # A cut connection and a 503 each count against their own rule, each with its own backoff.
    status, headers = results["mixed"]
    assert status == 200 and headers["x-signalbox-attempts"] == "3"
    mixed = attempts_of(proxy, "mixed")
    assert [(a["status"], a["error"]) for a in mixed] == [(0, "upstream_unreachable"), (503, None), (200, None)]
    assert [a.get("after") for a in mixed] == [None, "exponential", "fixed"]

    # 401 is never retried, whatever the rules.
    status, headers = results["never"]
    assert status == 401 and headers["x-signalbox-attempts"] == "1"


async def test_the_old_single_form_still_retries_the_same_way(
    start_proxy: StartProxy, async_openai: MakeOpenAI
) -> None:
    upstreams = {"up": {"provider": "mock", "mock": {"faults": SCENARIOS["reset"], "seed": 1}}}
    policy = build_policy(upstreams, [{"name": "chat", "upstream": "up",
                                       "retry": {"attempts": 4, "max_retry_after": "5s"}}])
    proxy = await start_proxy(policy)
    status, headers = await call(async_openai(proxy), "m")
    proxy.state.access_log.flush()
    assert status == 200 and headers["x-signalbox-attempts"] == "4"
    line = attempts_of(proxy, "chat")
    assert [(a.get("wait_ms"), a.get("after")) for a in line[1:]] == [(300.0, "hint"), (100.0, "hint"),
                                                                     (200.0, "hint")]
