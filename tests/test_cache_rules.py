"""The response cache's pure parts: what a client's and an upstream's Cache-Control allow, what the key
covers (and what it leaves out), the LRU store's byte bound, entry bytes, and `explain`'s cache section."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from kit import build_policy, route_spec, upstream_spec
from multidict import CIMultiDict

from proxy.cache.entry import Entry, decode, encode
from proxy.cache.memory import OVERHEAD, MemoryStore
from proxy.cache.rules import client_mode, kept_headers, request_key, storable_ttl
from proxy.policy.cache_rule import CacheRule, cache_rule
from proxy.policy.compile import compile_plan
from proxy.policy.explain import explain
from proxy.policy.load import load_policy
from proxy.policy.schema_routes import Cache
from proxy.telemetry.metrics import Metrics

RULE = cache_rule(Cache(ttl=600), "chat", [("up", None)])
PARTS = ("POST", "/v1/chat/completions", "")
JSON = CIMultiDict({"content-type": "application/json"})


@pytest.mark.parametrize(
    ("value", "mode"),
    [(None, "use"), ("", "use"), ("max-age=60", "use"), ("no-cache", "refresh"), ("max-age=0", "refresh"),
     ("No-Store", "skip"), ("no-cache, no-store", "skip")],
)
def test_client_cache_control(value: str | None, mode: str) -> None:
    assert client_mode(value) == mode


@pytest.mark.parametrize(
    ("status", "headers", "ttl"),
    [
        (200, {}, 600.0),
        (201, {"cache-control": "public, max-age=60"}, 60.0),
        (200, {"cache-control": "max-age=6000"}, 600.0),  # never above the policy's ttl
        (200, {"cache-control": "max-age=60, s-maxage=30"}, 30.0),  # a shared cache's own max-age first
        (200, {"cache-control": "no-store"}, 0.0),
        (200, {"cache-control": "private, max-age=60"}, 0.0),
        (200, {"cache-control": "no-cache"}, 0.0),
        (200, {"cache-control": "max-age=soon"}, 0.0),
        (200, {"set-cookie": "a=b"}, 0.0),
        (200, {"vary": "*"}, 0.0),
        (206, {}, 0.0),
        (304, {}, 0.0),
        (429, {}, 0.0),
        (500, {}, 0.0),
    ],
)
def test_what_an_upstream_answer_allows(status: int, headers: dict[str, str], ttl: float) -> None:
    assert storable_ttl(status, CIMultiDict(headers), 600.0) == ttl


def key(rule: CacheRule | None = RULE, tenant: str = "alpha", parts: tuple[str, ...] = PARTS,
        body: bytes = b"{}", headers: CIMultiDict[str] = JSON, credentials: bool = False) -> str:
    assert rule is not None
    return request_key(rule, tenant, parts, body, headers, credentials)


def test_the_key_covers_what_changes_the_answer_and_nothing_else() -> None:
    base = key()
    assert len(base) == 64 and base == key()
    shared = cache_rule(Cache(ttl=600, scope="shared"), "chat", [("up", None)])
    changed: list[Callable[[], str]] = [
        lambda: key(tenant="beta"),
        lambda: key(parts=("GET", *PARTS[1:])),
        lambda: key(parts=(PARTS[0], "/v1/completions", "")),
        lambda: key(parts=(*PARTS[:2], "a=1")),
        lambda: key(body=b'{"a":1}'),
        lambda: key(headers=CIMultiDict({**JSON, "anthropic-version": "2023-06-01"})),
        lambda: key(headers=CIMultiDict({**JSON, "openai-beta": "assistants=v2"})),
        lambda: key(headers=CIMultiDict({**JSON, "authorization": "Bearer a"}), credentials=True),
        lambda: key(rule=cache_rule(Cache(ttl=600), "chat", [("other", None)])),  # another pool
        lambda: key(rule=cache_rule(Cache(ttl=600), "chat", [("up", "gpt-4o")])),
        lambda: key(rule=shared),
    ]
    keys = [make() for make in changed]
    assert base not in keys and len(set(keys)) == len(keys)
    same = [
        key(headers=CIMultiDict({**JSON, "accept-encoding": "gzip", "user-agent": "x", "x-request-id": "1"})),
        key(headers=CIMultiDict({**JSON, "authorization": "Bearer a"})),  # the tenant is in the key already
    ]
    assert same == [base, base]
    assert key(rule=shared, tenant="alpha") == key(rule=shared, tenant="beta")


def test_an_entry_keeps_no_per_request_headers_and_round_trips() -> None:
    upstream = [("Content-Type", "application/json"), ("x-request-id", "r1"), ("Content-Length", "2"),
                ("x-signalbox-attempts", "1"), ("openai-processing-ms", "12"), ("Set-Cookie", "a=b")]
    kept = kept_headers(upstream)
    assert kept == [("Content-Type", "application/json"), ("openai-processing-ms", "12")]
    entry = Entry(200, kept, b'{"x":\n1}', 1234.5)
    assert decode(encode(entry)) == entry
    assert decode(b"garbage") is None and decode(b"[1]\nbody") is None


def test_the_memory_store_is_bounded_by_bytes_least_recent_out() -> None:
    now = [0.0]
    metrics = Metrics().cache
    store = MemoryStore(3 * (100 + OVERHEAD), metrics, clock=lambda: now[0])
    for name in "abc":
        store.put_now([(name, b"x" * 100)], 60, "r")
    assert store.get("a") == b"x" * 100  # a is now the most recent
    store.put_now([("d", b"x" * 100)], 60, "r")
    assert [store.get(k) is not None for k in "abcd"] == [True, False, True, True]
    assert store.used == 3 * (100 + OVERHEAD) and metrics.evictions.get("r") == 1
    store.put_now([("huge", b"x" * 1000)], 60, "r")  # larger than the whole store: not kept
    assert store.get("huge") is None and len(store) == 3
    now[0] = 61.0
    assert store.get("a") is None and store.used == 2 * (100 + OVERHEAD)  # expired, not an eviction
    store.resize(100 + OVERHEAD)
    assert len(store) == 1 and metrics.evictions.get("r") == 2


def test_explain_shows_the_cache_of_a_route_that_has_one(tmp_path: Path) -> None:
    routes = [route_spec("chat", "up", path="/v1/chat/completions", cache={"ttl": "1m", "scope": "shared"}),
              route_spec("rest", "up")]
    (tmp_path / "policy.yaml").write_text(build_policy({"up": upstream_spec("http://127.0.0.1:9")}, routes))
    loaded = load_policy(tmp_path)
    plan = compile_plan(loaded)
    shown = explain(loaded, plan, model="m", tenant="alpha")
    assert shown["cache"] == {"value": {"ttl": 60.0, "max_entry": 1048576, "scope": "shared"}, "from": "route"}
    assert "cache" not in explain(loaded, plan, model="m", tenant="alpha", path="/v1/embeddings")
