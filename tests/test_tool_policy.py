"""Tool routes (`provider: http`) at load time: what validation refuses, with file:line, and how a valid tool
route compiles (its prefix, its path matcher, limits that never count tokens)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from test_policy_load import problems_of, write

from proxy.ingress.tool import tool_route
from proxy.policy.compile import compile_plan
from proxy.policy.explain import explain
from proxy.policy.explain_text import format_text
from proxy.policy.load import load_policy
from proxy.policy.plan import Plan
from proxy.providers.exchange import tool

PROBLEMS = """
    upstreams:
      search: {provider: http, base_url: "https://search.example/api", limits: {tokens_per_minute: 1000}}
      llm: {provider: openai, base_url: "http://127.0.0.1:1/v1"}
    routes:
      - name: under-v1
        match: {path: /v1/tools/*}
        upstream: search
      - name: no-prefix
        match: {path: "/tools/*/search"}
        upstream: search
      - name: with-model
        match: {path: /tools/search/*, model: gpt-4o}
        upstream: search
        model: gpt-4o
        limits: {requests_per_minute: 10, tokens_per_minute: 100, per_tenant: {tokens_per_day: 5}}
        fallbacks: [chat]
      - name: shadowed
        match: {path: /tools/search/deep/*}
        upstream: search
      - name: mixed
        match: {path: /tools/mixed/*}
        deployments: [{upstream: search}, {upstream: llm}]
      - name: chat
        upstream: llm
      - name: health
        match: {path: /healthz/*}
        upstream: search
    """


def test_tool_route_problems_are_refused_with_file_and_line(tmp_path: Path) -> None:
    found = [(p.mark.line if p.mark else 0, p.path, p.message) for p in problems_of(write(tmp_path / "p.yaml",
                                                                                          PROBLEMS))]
    where = [(line, path) for line, path, _ in found]
    assert where == [
        (2, "upstreams.search.limits.tokens_per_minute"),
        (6, "routes[0].match.path"),
        (9, "routes[1].match.path"),
        (12, "routes[2].match.model"),
        (14, "routes[2].model"),
        (15, "routes[2].limits.tokens_per_minute"),
        (15, "routes[2].limits.per_tenant.tokens_per_day"),
        (16, "routes[2].fallbacks[0]"),
        (18, "routes[3].match.path"),
        (22, "routes[4].deployments"),
        (26, "routes[6].match.path"),
    ]
    text = "\n".join(message for _, _, message in found)
    assert "/v1/tools is under /v1, which the proxy serves itself" in text
    assert "one path prefix ending in '/*'" in text
    assert "unreachable: routes[2] (/tools/search/*) comes first" in text
    assert "cannot fall back to an LLM route ('chat')" in text
    assert "/healthz is /healthz" in text


def test_a_tool_route_compiles_to_its_prefix(make_plan: Callable[[str], Plan]) -> None:
    plan = make_plan("""
        upstreams:
          search: {provider: http, base_url: "https://search.example/api/"}
          llm: {provider: openai, base_url: "http://127.0.0.1:1/v1"}
        tenants:
          alpha: {keys: [sk-a], limits: {tokens_per_minute: 1000, requests_per_minute: 60}}
          beta: {keys: [sk-b]}
        routes:
          - name: chat
            upstream: llm
          - name: search-beta
            match: {path: /tools/search/*, tenants: [beta]}
            upstream: search
          - name: search
            match: {path: /tools/search/*}
            upstream: search
            retry: {attempts: 3}
        """)
    assert [r.name for r in plan.tools] == ["search-beta", "search"]
    route = plan.tools[1]
    assert route.tool_prefix == "/tools/search" and plan.upstreams["search"].base_url == "https://search.example/api"
    assert route.paths("/tools/search") and route.paths("/tools/search/") and route.paths("/tools/search/a/b")
    assert not route.paths("/tools/searchx") and not route.paths("/tools")
    assert tool_route("/tools/search/q", "alpha", plan).name == "search"
    assert tool_route("/tools/search/q", "beta", plan).name == "search-beta"
    assert not route.limit_sets["alpha"].tokens  # the tenant's token limit counts no tokens on a tool route
    assert plan.routes[0].limit_sets["alpha"].tokens  # ... and still does on its LLM routes
    assert route.retry.methods == frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
    assert plan.routes[0].retry.methods is None
    # The mapping: the path past the prefix, as sent, after the base_url.
    assert tool("/tools/search", "/tools/search").upstream_path == ""
    assert tool("/tools/search/", "/tools/search").upstream_path == "/"
    assert tool("/tools/search/a%2Fb/c/", "/tools/search").upstream_path == "/a%2Fb/c/"


def test_explain_shows_the_tool_mapping_and_the_effective_retry_rules(tmp_path: Path) -> None:
    path = write(tmp_path / "p.yaml", """
        upstreams:
          search: {provider: http, base_url: "https://search.example/api"}
          llm: {provider: openai, base_url: "http://127.0.0.1:1/v1"}
        tenants:
          alpha: {keys: [sk-a]}
        retry:
          max_retry_after: 3s
          rules:
            - {on: [timeout, connect_error], attempts: 3}
            - {on: [503], attempts: 5, backoff: {fixed: 1s}}
            - {on: [429], attempts: 10, backoff: reset}
        routes:
          - name: chat
            match: {path: "*"}
            upstream: llm
          - name: search
            match: {path: /tools/search/*}
            upstream: search
        """)
    loaded = load_policy(path, environ={})
    plan = compile_plan(loaded)
    answer = explain(loaded, plan, path="/tools/search/v2/q", tenant="alpha")
    assert answer["route"]["name"] == "search" and answer["skipped"] == []  # tool paths meet tool routes only
    assert answer["tool"]["sent_to"].startswith("https://search.example/api/v2/q")
    assert answer["model_sent_upstream"] == "(none: a tool route)"
    retry = answer["retry"]
    assert retry["from"] == "policy"
    assert retry["value"]["rules"] == [
        {"on": ["connect_error", "timeout"], "attempts": 3, "backoff": {"exponential": {"base": 0.25, "max": 5.0}},
         "max_wait": 3.0},
        {"on": [503], "attempts": 5, "backoff": {"fixed": 1.0}, "max_wait": 3.0},
        {"on": [429], "attempts": 10, "backoff": "reset", "max_wait": 3.0},
    ]
    assert retry["value"]["methods"] == ["DELETE", "GET", "HEAD", "OPTIONS", "PUT"]
    text = format_text(answer)
    assert "tool:     prefix /tools/search -> https://search.example/api/v2/q" in text
    assert "backoff: reset" in text
    llm = explain(loaded, plan, path="/v1/chat/completions", model="gpt-4o", tenant="alpha")
    assert llm["route"]["name"] == "chat" and "tool" not in llm and "methods" not in llm["retry"]["value"]
