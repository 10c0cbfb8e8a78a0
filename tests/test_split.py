"""Splitting oversized embeddings requests, the pure half: where a request is cut, how the parts' answers
join, how usage adds up, which routes get which limits, and what a wrong `batch_limits` is told (file:line)."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from proxy.batching import keys, merge, split
from proxy.policy.batch_limits import SplitLimits, clamped, strictest, upstream_limits
from proxy.policy.compile import compile_plan
from proxy.policy.load import PolicyError, load_policy


def text_inputs(texts: list[str]) -> keys.Inputs:
    inputs = keys.inputs_of(texts)
    assert inputs is not None
    return inputs


@pytest.mark.parametrize(
    ("count", "limits", "expected"),
    [
        (5000, SplitLimits(max_inputs=2048), [(0, 2048), (2048, 4096), (4096, 5000)]),
        (2048, SplitLimits(max_inputs=2048), [(0, 2048)]),
        (2049, SplitLimits(max_inputs=2048), [(0, 2048), (2048, 2049)]),
        # 8-byte texts are 2 estimated tokens each: 5 fit in 10 tokens
        (12, SplitLimits(max_tokens=10), [(0, 5), (5, 10), (10, 12)]),
        (12, SplitLimits(max_inputs=3, max_tokens=10), [(0, 3), (3, 6), (6, 9), (9, 12)]),
    ],
)
def test_spans_are_contiguous_and_as_large_as_the_limits_allow(
    count: int, limits: SplitLimits, expected: list[tuple[int, int]]
) -> None:
    assert split.spans(text_inputs([f"text{i:04d}" for i in range(count)]), limits) == expected


def test_an_input_above_max_tokens_alone_gets_a_part_of_its_own() -> None:
    inputs = text_inputs(["a", "x" * 400, "b", "c"])  # 1, 100, 1, 1 estimated tokens
    assert split.spans(inputs, SplitLimits(max_tokens=10)) == [(0, 1), (1, 2), (2, 4)]


def test_token_arrays_count_exactly() -> None:
    inputs = keys.inputs_of([[1] * 6, [2] * 6, [3] * 3, [4]])
    assert inputs is not None
    assert split.spans(inputs, SplitLimits(max_tokens=10)) == [(0, 1), (1, 4)]


@pytest.mark.parametrize(
    ("value", "limits"),
    [
        (["abcd"] * 2049, SplitLimits(max_inputs=2048)),
        (["é" * 40] * 3, SplitLimits(max_tokens=50)),  # 80 bytes = 20 tokens each: 60 > 50
        ("x" * 400, SplitLimits(max_tokens=50)),
        ([[1] * 30, [2] * 30], SplitLimits(max_tokens=50)),
    ],
)
def test_the_cheap_test_never_passes_a_request_that_is_over(value: Any, limits: SplitLimits) -> None:
    inputs = keys.inputs_of(value)
    assert inputs is not None
    assert inputs.count > (limits.max_inputs or 10**9) or inputs.tokens > (limits.max_tokens or 10**9)
    assert not split.surely_within(value, limits)


def test_joined_answers_are_in_input_order_with_indexes_renumbered_and_usage_summed() -> None:
    def answer(tags: list[str], order: list[int], tokens: int) -> dict[str, Any]:
        data = [{"object": "embedding", "index": i, "embedding": tags[i]} for i in order]
        return {"object": "list", "data": data, "model": "m",
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "details": {"cached": 1}}}

    parts = [answer(["a", "b"], [1, 0], 5), answer(["c", "d", "e"], [0, 2, 1], 7), answer(["f"], [0], 2)]
    out = split.joined(parts, [2, 3, 1])
    assert [(d["index"], d["embedding"]) for d in out["data"]] == list(enumerate("abcdef"))
    assert out["usage"] == {"prompt_tokens": 14, "total_tokens": 14, "details": {"cached": 3}}
    assert out["object"] == "list" and out["model"] == "m"


def test_a_part_with_the_wrong_number_of_embeddings_cannot_be_joined() -> None:
    good = {"data": [{"index": 0, "embedding": [1.0]}]}
    with pytest.raises(merge.SplitError):
        split.joined([good, good], [1, 2])


def test_known_vendor_limits_and_strictest_of_a_pool() -> None:
    assert upstream_limits("https://api.openai.com/v1", None) == SplitLimits(2048, 300_000)
    assert upstream_limits("http://vllm:8000/v1", None) is None
    assert strictest([SplitLimits(2048, None, 4), None, SplitLimits(100, 5000, 2)]) == SplitLimits(100, 5000, 2)
    assert strictest([None, None]) is None
    assert clamped(256, 100_000, SplitLimits(max_inputs=8)) == (8, 100_000)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def test_a_route_takes_the_strictest_limits_of_its_pool_and_fallbacks_and_batching_is_clamped(
    tmp_path: Path,
) -> None:
    path = write(tmp_path, """
        upstreams:
          oa: {provider: openai, base_url: "https://api.openai.com/v1", api_key: sk}
          small: {provider: openai, base_url: "http://127.0.0.1:1/v1", batch_limits: {max_inputs: 16, concurrency: 3}}
          free: {provider: openai, base_url: "http://127.0.0.1:2/v1"}
        routes:
          - {name: a, match: {path: /v1/embeddings}, upstream: oa, batch: {max_items: 512}, fallbacks: [b]}
          - {name: b, match: {path: /v1/embeddings}, upstream: small}
          - {name: c, match: {path: /v1/embeddings}, upstream: free}
        """)
    plan = compile_plan(load_policy(path, environ={}))
    routes = plan.routes_by_name
    assert routes["a"].split == SplitLimits(16, 300_000, 2)
    assert routes["a"].batch is not None and routes["a"].batch.max_items == 16
    assert routes["b"].split == SplitLimits(16, None, 3)
    assert routes["c"].split is None


@pytest.mark.parametrize(
    ("limits", "line", "field", "fragment"),
    [
        ("{}", 3, "upstreams.u.batch_limits", "needs max_inputs or max_tokens"),
        ("{max_inputs: 0}", 3, "upstreams.u.batch_limits.max_inputs", "greater than or equal to 1"),
        ("{max_inputs: 8, concurrency: 100}", 3, "upstreams.u.batch_limits.concurrency", "less than or equal"),
    ],
)
def test_a_wrong_batch_limits_is_reported_at_its_line(
    tmp_path: Path, limits: str, line: int, field: str, fragment: str
) -> None:
    path = write(tmp_path, f"""
        upstreams:
          u:
            batch_limits: {limits}
            provider: openai
            base_url: http://127.0.0.1:1/v1
        routes:
          - {{name: r, upstream: u}}
        """)
    with pytest.raises(PolicyError) as info:
        load_policy(path, environ={})
    rendered = [str(p) for p in info.value.problems]
    assert len(rendered) == 1 and rendered[0].startswith(f"{path}:{line}:"), rendered
    assert f" {field}: " in rendered[0] and fragment in rendered[0], rendered


def test_batch_limits_on_an_anthropic_upstream_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, """
        upstreams:
          u: {provider: anthropic, base_url: "https://api.anthropic.com/v1", batch_limits: {max_inputs: 8}}
        routes:
          - {name: r, upstream: u}
        """)
    with pytest.raises(PolicyError) as info:
        load_policy(path, environ={})
    assert "anthropic upstreams do not serve" in str(info.value) and f"{path}:2:" in str(info.value)


def test_explain_shows_the_limits_a_route_splits_by(tmp_path: Path) -> None:
    from proxy.policy.explain import explain

    path = write(tmp_path, """
        identify: {mode: single, tenant: t}
        tenants: {t: {}}
        upstreams:
          oa: {provider: openai, base_url: "https://api.openai.com/v1", api_key: sk}
        routes:
          - {name: a, match: {path: /v1/embeddings}, upstream: oa}
        """)
    loaded = load_policy(path, environ={})
    answer = explain(loaded, compile_plan(loaded), model="m", path="/v1/embeddings")
    shown = answer["split"]
    assert shown["value"] == {"max_inputs": 2048, "max_tokens": 300_000, "concurrency": 2}, shown
    assert shown["from"].startswith("upstreams"), shown


def test_explain_leaves_split_limits_out_of_a_chat_request(tmp_path: Path) -> None:
    from proxy.policy.explain import explain

    path = write(tmp_path, """
        identify: {mode: single, tenant: t}
        tenants: {t: {}}
        upstreams:
          oa: {provider: openai, base_url: "https://api.openai.com/v1", api_key: sk}
        routes:
          - {name: a, upstream: oa}
        """)
    loaded = load_policy(path, environ={})
    plan = compile_plan(loaded)
    assert "split" not in explain(loaded, plan, model="m", path="/v1/chat/completions")
    assert "split" in explain(loaded, plan, model="m", path="/v1/embeddings")
