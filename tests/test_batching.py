"""Batching decisions without sockets: input forms, grouping keys, merge and split for every form, index
and usage arithmetic, bisecting; plus the `batch` policy field (validation and compilation)."""

from __future__ import annotations

import ast
import base64
import math
import textwrap
from array import array
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.batching import keys, merge
from proxy.batching.keys import Inputs, inputs_of
from proxy.policy.compile import compile_plan
from proxy.policy.load import PolicyError, load_policy
from proxy.policy.plan import BatchRule

ROOT = Path(__file__).resolve().parent.parent

# --- input forms ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "kind", "items", "tokens"),
    [
        ("hello world!", "text", ("hello world!",), 3),
        ("", "text", ("",), 1),  # empty: still a form; the upstream decides (a poisoned input)
        (["a", "bbbbbbbbb"], "text", ("a", "bbbbbbbbb"), 1 + 3),
        ([1, 2, 3], "tokens", ([1, 2, 3],), 3),
        ([[1, 2], [3], [4, 5, 6]], "tokens", ([1, 2], [3], [4, 5, 6]), 6),
        (["héllo"], "text", ("héllo",), 2),  # six UTF-8 bytes
    ],
    ids=["string", "empty-string", "strings", "token-array", "token-arrays", "utf8"],
)
def test_every_input_form_is_recognised(value: Any, kind: str, items: tuple[Any, ...], tokens: int) -> None:
    found = inputs_of(value)
    assert found == Inputs(kind, items, tokens)  # type: ignore[arg-type]
    assert found is not None and found.count == len(items)


@pytest.mark.parametrize(
    "value",
    [None, 3, [], ["a", 1], [1, "a"], [True, 2], [[1], "a"], [[1, "x"]], {"text": "a"}, [1.5], [[1.0]]],
)
def test_anything_else_has_no_form(value: Any) -> None:
    assert inputs_of(value) is None


# --- grouping keys ----------------------------------------------------------------------------------


def key_of(body: dict[str, Any], **over: Any) -> Any:
    args: dict[str, Any] = {"route": "r", "plan": "p1", "path": "/v1/embeddings", "tenant": "alpha",
                            "query": "", "headers": ""}
    args.update(over)
    return keys.group_key(body, inputs_of(body.get("input")), **args)


BASE = {"model": "m", "input": "x", "encoding_format": "base64"}


def test_only_input_may_differ_and_field_order_does_not_matter() -> None:
    same = {"encoding_format": "base64", "input": ["y", "z"], "model": "m"}
    assert key_of(BASE) == key_of(same) is not None


@pytest.mark.parametrize(
    ("body", "over"),
    [
        ({**BASE, "encoding_format": "float"}, {}),
        ({k: v for k, v in BASE.items() if k != "encoding_format"}, {}),  # absent is not "float" nor "base64"
        ({**BASE, "dimensions": 256}, {}),
        ({**BASE, "user": "u1"}, {}),
        ({**BASE, "model": "other"}, {}),
        ({**BASE, "input": [1, 2]}, {}),  # token arrays never share a call with strings
        (BASE, {"tenant": "beta"}),
        (BASE, {"tenant": None}),
        (BASE, {"route": "r2"}),
        (BASE, {"plan": "p2"}),  # a reload: calls under the old plan stay together
        (BASE, {"query": "api-version=2024-10-21"}),
        (BASE, {"headers": "digest"}),
    ],
    ids=[
        "encoding", "encoding-absent", "dimensions", "user", "model", "kind", "tenant", "cross-tenant",
        "route", "plan", "query", "headers",
    ],
)
def test_anything_that_changes_the_answer_changes_the_key(body: dict[str, Any], over: dict[str, Any]) -> None:
    assert key_of(body, **over) != key_of(BASE)


def test_unknown_fields_and_bad_inputs_are_sent_alone() -> None:
    assert key_of({**BASE, "truncate_prompt_tokens": 10}) is None
    assert key_of({**BASE, "stream": False}) is None
    assert key_of({**BASE, "input": []}) is None
    assert key_of({"model": "m"}) is None


def test_header_signature_ignores_noise_and_keeps_what_changes_the_answer() -> None:
    noise = [("User-Agent", "OpenAI/Python 1.0"), ("X-Stainless-Retry-Count", "0"), ("x-request-id", "abc"),
             ("Content-Type", "application/json"), ("Authorization", "Bearer sk-alpha"),
             ("Idempotency-Key", "k")]
    assert keys.header_signature(noise, credentials=False) == ""
    org = keys.header_signature([*noise, ("OpenAI-Organization", "org-1")], credentials=False)
    assert org != "" and org == keys.header_signature([("openai-organization", "org-1")], credentials=False)
    assert org != keys.header_signature([("OpenAI-Organization", "org-2")], credentials=False)
    # pass-through: the caller's own key goes upstream, so it separates callers
    own = keys.header_signature([("Authorization", "Bearer a")], credentials=True)
    assert own not in ("", keys.header_signature([("Authorization", "Bearer b")], credentials=True))
    assert "Bearer a" not in own  # a digest, never the key
    tenant = [("x-signalbox-tenant", "t1")]
    assert keys.header_signature(tenant, credentials=False, drop=frozenset({"x-signalbox-tenant"})) == ""


# --- merge and split --------------------------------------------------------------------------------


def b64(*values: float) -> str:
    return base64.b64encode(array("f", values).tobytes()).decode()


def answer(n: int, *, encoding: str = "base64", usage: dict[str, Any] | None = None) -> dict[str, Any]:
    data = [
        {"object": "embedding", "index": i,
         "embedding": b64(i, -i) if encoding == "base64" else [i + 0.1, -i]}
        for i in range(n)
    ]
    return {"object": "list", "data": data, "model": "text-embedding-3-small",
            "usage": usage or {"prompt_tokens": 10 * n, "total_tokens": 10 * n}, "system_fingerprint": "fp"}


FORMS: list[tuple[str, list[Any]]] = [
    ("strings", ["one", ["two", "three"], "four"]),
    ("token-arrays", [[1, 2, 3], [[4], [5, 6]], [7]]),
]


@pytest.mark.parametrize(("name", "values"), FORMS, ids=[f[0] for f in FORMS])
def test_merged_input_keeps_each_callers_inputs_contiguous(name: str, values: list[Any]) -> None:
    parts = [inputs_of(v) for v in values]
    assert all(p is not None for p in parts)
    body = merge.merged_body({"model": "m", "input": values[0], "encoding_format": "float"}, parts)  # type: ignore[arg-type]
    assert list(body) == ["model", "input", "encoding_format"]
    flat = [item for p in parts for item in p.items]  # type: ignore[union-attr]
    assert body["input"] == flat and len(flat) == 4


@pytest.mark.parametrize("encoding", ["base64", "float"])
def test_split_gives_each_caller_its_slice_renumbered_from_zero(encoding: str) -> None:
    whole = answer(4, encoding=encoding)
    bodies = merge.split(whole, [1, 2, 1], [1, 1, 1])
    assert [len(b["data"]) for b in bodies] == [1, 2, 1]
    assert [[d["index"] for d in b["data"]] for b in bodies] == [[0], [0, 1], [0]]
    got = [d["embedding"] for b in bodies for d in b["data"]]
    assert got == [d["embedding"] for d in whole["data"]]  # untouched: base64 strings byte for byte
    for body in bodies:
        assert list(body) == list(whole)  # every top-level field, in the upstream's order
        assert body["model"] == "text-embedding-3-small" and body["system_fingerprint"] == "fp"
    # what the client receives re-encodes to the very same embedding text
    assert orjson.dumps(bodies[1]["data"][1]["embedding"]) == orjson.dumps(whole["data"][2]["embedding"])


def test_split_puts_an_out_of_order_answer_back_in_order() -> None:
    whole = answer(3)
    whole["data"].reverse()
    bodies = merge.split(whole, [2, 1], [1, 1])
    assert bodies[0]["data"][1]["embedding"] == b64(1, -1)
    assert bodies[1]["data"][0] == {"object": "embedding", "index": 0, "embedding": b64(2, -2)}


@pytest.mark.parametrize(
    ("whole", "fragment"),
    [
        (answer(2), "2 embeddings for 3 inputs"),
        ({"object": "list"}, "no embeddings for 3 inputs"),
        ({**answer(3), "data": [{"index": 0}, {"index": 0}, {"index": 2}]}, "not 0..2"),
        ({**answer(3), "data": [{"index": 0}, {"index": "1"}, {"index": 2}]}, "no integer index"),
        ([1, 2, 3], "not a JSON object"),
    ],
    ids=["too-few", "no-data", "duplicate-index", "string-index", "not-an-object"],
)
def test_an_answer_that_cannot_be_split_says_why(whole: Any, fragment: str) -> None:
    with pytest.raises(merge.SplitError, match=fragment):
        merge.split(whole, [1, 2], [1, 1])


def test_usage_is_apportioned_by_share_and_sums_to_the_upstreams() -> None:
    usage = {"prompt_tokens": 100, "total_tokens": 100, "details": {"cached": 7}, "note": "x"}
    bodies = merge.split(answer(3, usage=usage), [1, 1, 1], [1, 2, 7])
    parts = [b["usage"] for b in bodies]
    assert [p["prompt_tokens"] for p in parts] == [10, 20, 70]
    assert sum(p["details"]["cached"] for p in parts) == 7 and all(p["note"] == "x" for p in parts)


def test_apportion_examples() -> None:
    assert merge.apportion(10, [1, 1, 1]) == [4, 3, 3]  # the remainder goes to the earliest caller
    assert merge.apportion(10, [0, 0]) == [5, 5]  # no weights: equal shares
    assert merge.apportion(0, [3, 4]) == [0, 0]
    assert merge.apportion(7, [1, 2]) == [2, 5]  # 2.33 and 4.67: the larger remainder gets the token
    assert merge.apportion(5, []) == []


@given(st.integers(0, 10**7), st.lists(st.integers(0, 10**5), min_size=1, max_size=50))
def test_apportion_sums_exactly_and_stays_within_one_of_the_exact_share(
    total: int, weights: list[int]
) -> None:
    shares = merge.apportion(total, weights)
    assert sum(shares) == total and all(s >= 0 for s in shares)
    used = weights if sum(weights) else [1] * len(weights)
    for share, weight in zip(shares, used, strict=True):
        assert abs(share - total * weight / sum(used)) < 1


def test_window_arithmetic() -> None:
    three = Inputs("text", ("a", "b", "c"), 30)
    assert merge.fits(253, 0, three, 256, 100) and not merge.fits(254, 0, three, 256, 100)
    assert not merge.fits(0, 71, three, 256, 100)
    assert merge.full(256, 0, 256, 10**5) and merge.full(1, 10**5, 256, 10**5)
    assert not merge.full(255, 1, 256, 9)
    assert merge.too_big(three, 2, 100) and merge.too_big(three, 256, 29) and not merge.too_big(three, 3, 30)


# --- bisecting --------------------------------------------------------------------------------------


def test_halves_put_the_named_caller_alone_or_else_halve() -> None:
    assert merge.halves([1, 2, 1, 1], 2) == ([1], [0, 2, 3])
    assert merge.halves([1, 2, 1, 1], None) == ([0, 1], [2, 3])
    assert merge.halves([1, 1, 1], 99) == ([0], [1, 2])  # a hint past the end is ignored
    assert merge.halves([5, 5], 0) == ([0], [1])
    with pytest.raises(ValueError, match="two or more"):
        merge.halves([3], None)


@pytest.mark.parametrize(
    ("error", "item"),
    [
        ({"error": {"message": "'$.input' is invalid.", "param": None}}, None),
        ({"error": {"message": "bad", "param": "input[7]"}}, 7),
        ({"error": {"message": "the input at index 3 is empty", "param": "input"}}, 3),
        ({"message": "input.12 is too long"}, 12),  # vLLM / FastAPI style, no "error" wrapper
        ("not json", None),
    ],
)
def test_named_item(error: Any, item: int | None) -> None:
    raw = orjson.dumps(error) if not isinstance(error, str) else error.encode()
    assert merge.named_item(raw) == item


@pytest.mark.parametrize(
    ("status", "callers", "bisect"),
    [(400, 2, True), (413, 5, True), (422, 2, True), (400, 1, False), (401, 4, False), (404, 4, False),
     (429, 4, False), (500, 4, False), (503, 4, False)],
)
def test_only_answers_one_input_can_cause_are_bisected(status: int, callers: int, bisect: bool) -> None:
    assert merge.should_bisect(status, callers) is bisect


def simulate(counts: list[int], poisoned: set[int], hint: bool) -> tuple[int, set[int]]:
    """The batcher's recursion over plain data: (upstream calls made, callers that got the error)."""
    calls, failed = 0, set()

    def exchange(members: list[int]) -> None:
        nonlocal calls
        calls += 1
        bad = [m for m in members if m in poisoned]
        if not bad:
            return
        if not merge.should_bisect(400, len(members)):
            failed.update(members)
            return
        offsets = [sum(counts[:m]) for m in members]
        named = offsets[members.index(bad[0])] if hint else None
        left, right = merge.halves([counts[m] for m in members], named)
        exchange([members[i] for i in left])
        exchange([members[i] for i in right])

    exchange(list(range(len(counts))))
    return calls, failed


@pytest.mark.parametrize("size", [2, 3, 50, 256, 2048])
@pytest.mark.parametrize("hint", [False, True], ids=["no-hint", "hint"])
def test_bisecting_fails_only_the_poisoned_caller_in_few_calls(size: int, hint: bool) -> None:
    poisoned = {size * 2 // 3}
    calls, failed = simulate([1 + i % 3 for i in range(size)], poisoned, hint)
    assert failed == poisoned
    assert calls <= (3 if hint else 1 + 2 * math.ceil(math.log2(size)))


def test_bisecting_several_poisoned_callers_isolates_each() -> None:
    poisoned = {0, 7, 8, 31}
    calls, failed = simulate([1] * 32, poisoned, hint=False)
    assert failed == poisoned and calls < 2 * 32


# --- the pure modules stay pure ---------------------------------------------------------------------


PURE = [ROOT / "proxy" / "batching" / f"{name}.py" for name in ("keys", "merge")]


@pytest.mark.parametrize("path", PURE, ids=lambda p: p.name)
def test_batching_modules_do_no_io_and_reach_no_stage(path: Path) -> None:
    banned = ("aiohttp", "asyncio", "socket", "redis", "uvloop", "proxy.batching.batcher", "proxy.batching.flush",
              "proxy.ingress", "proxy.flow", "proxy.admission", "proxy.upstream", "proxy.streaming", "proxy.runtime")
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append(node.module)
    assert [m for m in found if m.startswith(banned)] == []


# --- the policy field -------------------------------------------------------------------------------

POLICY = """
upstreams:
  u: {{provider: openai, base_url: "http://127.0.0.1:9/v1"}}
routes:
  - name: emb
    match: {{path: {path}}}
    upstream: u
    batch: {batch}
"""


def load(tmp_path: Path, path: str, batch: str) -> Any:
    file = tmp_path / "policy.yaml"
    file.write_text(textwrap.dedent(POLICY.format(path=path, batch=batch)).lstrip("\n"))
    return compile_plan(load_policy(file, environ={}))


def test_batch_defaults_and_compiled_rule(tmp_path: Path) -> None:
    plan = load(tmp_path, "/v1/embeddings", "{}")
    assert plan.routes[0].batch == BatchRule(max_items=256, max_tokens=100_000, max_wait=0.010,
                                             cross_tenant=False)
    every = "{max_items: 2048, max_tokens: 300000, max_wait: 25ms, cross_tenant: true}"
    plan = load(tmp_path, "[/v1/embeddings]", every)
    assert plan.routes[0].batch == BatchRule(2048, 300_000, 0.025, True)


@pytest.mark.parametrize(
    ("path", "batch", "fragment"),
    [
        ("/v1/*", "{}", "batch applies only to embeddings: set match.path to /v1/embeddings"),
        ("/v1/chat/completions", "{}", "batch applies only to embeddings"),
        ("[/v1/embeddings, /v1/completions]", "{}", "batch applies only to embeddings"),
        ("/v1/embeddings", "{max_items: 4096}", "less than or equal to 2048"),
        ("/v1/embeddings", "{max_wait: 1m}", "max_wait must be at most 10s"),
        ("/v1/embeddings", "{max_wiat: 5ms}", "did you mean 'max_wait'?"),
    ],
    ids=["default-path", "chat", "mixed-paths", "too-many-items", "long-wait", "misspelled"],
)
def test_invalid_batch_settings_are_refused(tmp_path: Path, path: str, batch: str, fragment: str) -> None:
    with pytest.raises(PolicyError) as info:
        load(tmp_path, path, batch)
    assert fragment in str(info.value)
    assert "routes[0]" in str(info.value)
