"""Policy loading: every invalid policy is reported at the exact file:line:column, with the field path and a
message that says what to fix; valid sets (one file, a directory, a Kubernetes ConfigMap mount) load and
compile, with `${ENV}` interpolation."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from proxy.policy.compile import compile_plan
from proxy.policy.load import PolicyError, Problem, load_policy

REPO = Path(__file__).resolve().parent.parent

# (id, YAML text, [(line, column, field path, message fragment), ...]) — every problem, in order.
INVALID: list[tuple[str, str, list[tuple[int, int, str, str]]]] = [
    (
        "misspelled-top-level-section",
        """
        version: 1
        upstream:
          a: {provider: mock}
        """,
        [(2, 1, "upstream", "unknown key 'upstream'; did you mean 'upstreams'?")],
    ),
    (
        "misspelled-upstream-field",
        """
        upstreams:
          a:
            provider: openai
            base_ulr: http://127.0.0.1:1/v1
        """,
        [(4, 5, "upstreams.a.base_ulr", "did you mean 'base_url'?")],
    ),
    (
        "misspelled-route-match-field",
        """
        upstreams:
          a: {provider: mock}
        routes:
          - name: r
            match:
              modle: gpt-4o
            upstream: a
        """,
        [(6, 7, "routes[0].match.modle", "unknown key 'modle'; did you mean 'model'?")],
    ),
    (
        "misspelled-flow-mapping-field-in-route-timeouts",
        """
        upstreams:
          a: {provider: mock}
        routes:
          - name: r
            upstream: a
            timeouts: {frist_token: 1s}
        """,
        [(6, 16, "routes[0].timeouts.frist_token", "did you mean 'first_token'?")],
    ),
    (
        "misspelled-tenant-field",
        """
        tenants:
          team:
            kyes: [sk-1]
        """,
        [(3, 5, "tenants.team.kyes", "did you mean 'keys'?")],
    ),
    (
        "unknown-key-without-a-close-match-lists-the-valid-ones",
        """
        upstreams:
          a:
            provider: mock
            zzzz: 1
        """,
        [(4, 5, "upstreams.a.zzzz", "unknown key 'zzzz'; expected one of: api_key, auth_header, base_url")],
    ),
    (
        "two-problems-both-reported",
        """
        upstreams:
          a: {provider: mock, pol: {}}
        routez: []
        """,
        [
            (2, 23, "upstreams.a.pol", "did you mean 'pool'?"),
            (3, 1, "routez", "did you mean 'routes'?"),
        ],
    ),
    (
        "wrong-type-integer",
        """
        upstreams:
          a:
            provider: mock
            pool:
              max_connections: lots
        """,
        [(5, 24, "upstreams.a.pool.max_connections", "valid integer")],
    ),
    (
        "wrong-type-list",
        """
        routes: {name: x}
        """,
        [(1, 9, "routes", "valid list")],
    ),
    (
        "wrong-enum-value",
        """
        upstreams:
          a:
            provider: opneai
            base_url: http://127.0.0.1:1/v1
        """,
        [(3, 15, "upstreams.a.provider", "'openai', 'anthropic', 'mock' or 'http'")],
    ),
    (
        "bad-duration",
        """
        upstreams:
          a: {provider: mock}
        timeouts:
          connect: 5 parsecs
        """,
        [
            (
                4,
                12,
                "timeouts.connect",
                "invalid duration: use a number with a unit (ms, s, m or h), such as 250ms",
            )
        ],
    ),
    (
        "negative-duration",
        """
        timeouts:
          idle: -5
        """,
        [(2, 9, "timeouts.idle", "cannot be negative")],
    ),
    (
        "bad-size",
        """
        max_body_size: huge
        """,
        [(1, 16, "max_body_size", "invalid size: use a number of bytes or a number with a unit")],
    ),
    (
        "undefined-upstream-with-suggestion",
        """
        upstreams:
          openai-main: {provider: mock}
        routes:
          - name: r
            upstream: openai-mian
        """,
        [(5, 15, "routes[0].upstream", "undefined upstream 'openai-mian'; did you mean 'openai-main'?")],
    ),
    (
        "undefined-upstream-lists-the-defined-ones",
        """
        upstreams:
          alpha: {provider: mock}
          beta: {provider: mock}
        routes:
          - name: r
            upstream: zzz
        """,
        [(6, 15, "routes[0].upstream", "undefined upstream 'zzz' (defined: alpha, beta)")],
    ),
    (
        "undefined-tenant-in-route-match",
        """
        upstreams:
          a: {provider: mock}
        tenants:
          team-a: {}
        routes:
          - name: r
            match: {tenants: [team-b]}
            upstream: a
        """,
        [(7, 23, "routes[0].match.tenants[0]", "undefined tenant 'team-b'; did you mean 'team-a'?")],
    ),
    (
        "duplicate-route-names",
        """
        upstreams:
          a: {provider: mock}
        routes:
          - name: chat
            upstream: a
          - name: other
            upstream: a
          - name: chat
            upstream: a
        """,
        [(8, 11, "routes[2].name", "duplicate route name 'chat' (first used by routes[0])")],
    ),
    (
        "same-key-for-two-tenants",
        """
        tenants:
          a: {keys: [sk-shared]}
          b: {keys: [sk-other, sk-shared]}
        """,
        [(3, 24, "tenants.b.keys[1]", "also a key of tenant 'a'")],
    ),
    (
        "unset-environment-variable",
        """
        upstreams:
          a:
            provider: openai
            base_url: http://127.0.0.1:1/v1
            api_key: ${SIGNALBOX_TEST_SURELY_UNSET}
        """,
        [
            (
                5,
                14,
                "upstreams.a.api_key",
                "environment variable SIGNALBOX_TEST_SURELY_UNSET is not set and has no default",
            )
        ],
    ),
    (
        "yaml-syntax-error",
        """
        upstreams:
          a: {provider: mock
        routes: []
        """,
        [(2, 6, "(top)", "YAML syntax error: a flow mapping starts here and is not closed")],
    ),
    (
        "yaml-unclosed-quote",
        """
        upstreams:
          a:
            provider: "mock
            mock: {}
        routes: []
        """,
        [(3, 15, "(top)", "YAML syntax error: a quoted scalar starts here and is not closed (found unexpected "
                          "end of stream at line 6")],
    ),
    (
        "yaml-key-without-colon",
        """
        upstreams
          a: {provider: mock}
        """,
        [(1, 1, "(top)", "YAML syntax error: this key has no ':' after it (mapping values are not allowed here "
                         "at line 2")],
    ),
    (
        "yaml-bad-indentation",
        """
        upstreams:
          a: {provider: mock}
         b: {provider: mock}
        """,
        [(3, 2, "(top)", "YAML syntax error: expected <block end>, but found '<block mapping start>' (check this "
                         "line's indentation: it is inside a block mapping that starts at line 1, column 1)")],
    ),
    (
        "yaml-tab-indentation",
        "upstreams:\n\ta: {provider: mock}\n",
        [(2, 1, "(top)", "YAML syntax error: found character '\\t'")],
    ),
    (
        "duplicate-yaml-key",
        """
        upstreams:
          a: {provider: mock}
        tenants: {}
        upstreams:
          b: {provider: mock}
        """,
        [(4, 1, "upstreams", "duplicate key")],
    ),
    (
        "duplicate-nested-yaml-key",
        """
        upstreams:
          a:
            provider: mock
            provider: openai
        """,
        [(4, 5, "upstreams.a.provider", "duplicate key")],
    ),
    (
        "provider-without-base-url",
        """
        upstreams:
          a:
            provider: openai
            api_key: sk-x
        """,
        [(3, 5, "upstreams.a", "base_url is required for provider openai")],
    ),
    (
        "mock-with-base-url",
        """
        upstreams:
          a:
            provider: mock
            base_url: http://127.0.0.1:1/v1
        """,
        [(3, 5, "upstreams.a", "remove base_url")],
    ),
    (
        "route-without-upstream",
        """
        upstreams:
          a: {provider: mock}
        routes:
          - name: r
        """,
        [(4, 5, "routes[0].upstream", "required field 'upstream' is missing")],
    ),
    (
        "single-mode-without-tenant",
        """
        identify: {mode: single}
        """,
        [(1, 11, "identify", "mode single needs `tenant`")],
    ),
    (
        "undefined-queue-with-hint",
        """
        upstreams:
          a: {provider: mock}
        queues:
          interactive: {concurrency: 4}
        routes:
          - name: r
            upstream: a
            queue: interactiv
        """,
        [(8, 12, "routes[0].queue", "undefined queue 'interactiv'; did you mean 'interactive'?")],
    ),
    (
        "hidden-response-header-not-a-name",
        """
        upstreams:
          a:
            provider: mock
            hide_response_headers: [openai-organization, "x-ratelimit: *"]
        """,
        [(4, 28, "upstreams.a.hide_response_headers", "'x-ratelimit: *' is not a header name or a glob of one")],
    ),
    (
        "unknown-priority-classes",
        """
        priorities: [high, standard, batch]
        tenants:
          t:
            priority: hihg
          u:
            priority: batch
            max_priority: urgent
          v:
            priority: high
            max_priority: batch
        """,
        [
            (4, 15, "tenants.t.priority", "unknown priority class 'hihg' (priorities: high, standard, batch)"),
            (7, 19, "tenants.u.max_priority", "unknown priority class 'urgent'"),
            (10, 19, "tenants.v.max_priority", "'batch' is below the tenant's own priority 'high'"),
        ],
    ),
    (
        "not-a-mapping",
        """
        - upstreams
        - routes
        """,
        [(1, 1, "(top)", "must be a mapping of sections")],
    ),
    # A file truncated by a non-atomic save or an empty ConfigMap key: never a policy that serves nothing.
    ("empty-file", "", [(1, 1, "(top)", "the file is empty")]),
    ("only-comments", "# routes: come later\n\n   \n", [(1, 1, "(top)", "the file is empty")]),
    (
        "no-routes",
        """
        upstreams:
          a: {provider: mock}
        tenants:
          t: {keys: [sk-t]}
        """,
        [(1, 1, "routes", "no routes: every request would be refused")],
    ),
    (
        "empty-routes",
        """
        upstreams:
          a: {provider: mock}
        routes: []
        """,
        [(3, 9, "routes", "no routes")],
    ),
    # Two Authorization headers: aiohttp refuses them at every request (a 500), so the loader refuses the policy.
    (
        "base-url-credentials-and-bearer-api-key",
        """
        upstreams:
          a:
            provider: openai
            api_key: sk-upstream
            base_url: http://svc:pw@127.0.0.1:1/v1
        routes:
          - {name: r, upstream: a}
        """,
        [(5, 15, "upstreams.a.base_url", "(user:password@, sent as Authorization: Basic) and api_key is sent")],
    ),
    (
        "base-url-that-does-not-parse",
        """
        upstreams:
          a:
            provider: openai
            base_url: http://svc:pass/word@127.0.0.1:1/v1
        routes:
          - {name: r, upstream: a}
        """,
        [(3, 5, "upstreams.a", "base_url is not a valid URL")],
    ),
    (
        "base-url-credentials-and-authorization-header",
        """
        upstreams:
          a:
            provider: anthropic
            base_url: https://svc@127.0.0.1:1/v1
            headers: {AUTHORIZATION: Bearer x}
        routes:
          - {name: r, upstream: a}
        """,
        [(4, 15, "upstreams.a.base_url", "and headers sets Authorization too")],
    ),
]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def problems_of(path: Path, environ: dict[str, str] | None = None) -> list[Problem]:
    with pytest.raises(PolicyError) as info:
        load_policy(path, environ=environ if environ is not None else {})
    assert str(info.value) == "\n".join(str(p) for p in info.value.problems)
    return info.value.problems


@pytest.mark.parametrize(
    ("text", "expected"), [case[1:] for case in INVALID], ids=[case[0] for case in INVALID]
)
def test_invalid_policy_is_reported_at_its_place(
    tmp_path: Path, text: str, expected: list[tuple[int, int, str, str]]
) -> None:
    path = write(tmp_path / "policy.yaml", text)
    problems = problems_of(path)
    assert len(problems) == len(expected), [str(p) for p in problems]
    for problem, (line, column, field, fragment) in zip(problems, expected, strict=True):
        rendered = str(problem)
        assert rendered.startswith(f"{path}:{line}:{column}: {field}: "), rendered
        assert fragment in problem.message, rendered
        assert problem.mark is not None and problem.mark.file == str(path)


def test_env_interpolation_defaults_and_values(tmp_path: Path) -> None:
    path = write(
        tmp_path / "policy.yaml",
        """
        upstreams:
          a:
            provider: openai
            base_url: http://${SB_HOST:-127.0.0.1}:${SB_PORT:-8000}/v1
            api_key: ${SB_KEY:-fallback-key}
            headers: {X-Team: "${SB_TEAM}"}
        tenants:
          t: {keys: ["${SB_TENANT_KEY}"]}
        routes:
          - {name: r, upstream: a}
        """,
    )
    environ = {"SB_TEAM": "ml", "SB_TENANT_KEY": "sk-tenant", "SB_PORT": "9001"}
    plan = compile_plan(load_policy(path, environ=environ))
    upstream = plan.upstreams["a"]
    assert upstream.base_url == "http://127.0.0.1:9001/v1"
    assert upstream.api_key == "fallback-key"
    assert dict(upstream.headers) == {"x-team": "ml"}
    tenant = plan.tenant_for_key("sk-tenant")
    assert tenant is not None and tenant.name == "t"
    # Secrets stay out of anything that prints the plan.
    assert "fallback-key" not in repr(plan) and "sk-tenant" not in repr(plan)
    # An empty default is a default too; a set variable wins over the default.
    plan = compile_plan(load_policy(path, environ={**environ, "SB_KEY": "from-env"}))
    assert plan.upstreams["a"].api_key == "from-env"


def test_env_interpolation_reads_the_process_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(
        tmp_path / "policy.yaml",
        """
        upstreams:
          a: {provider: mock}
        tenants:
          t: {keys: ["${SB_PROCESS_KEY}"]}
        routes:
          - {name: r, upstream: a}
        """,
    )
    monkeypatch.delenv("SB_PROCESS_KEY", raising=False)
    with pytest.raises(PolicyError):
        load_policy(path)
    monkeypatch.setenv("SB_PROCESS_KEY", "sk-process")
    assert compile_plan(load_policy(path)).tenant_for_key("sk-process") is not None


def test_default_policy_loads_and_compiles() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIGNALBOX_")}
    loaded = load_policy(REPO / "policies" / "default.yaml", environ=env)
    plan = compile_plan(loaded)
    assert [r.name for r in plan.routes] == ["chat-resumable", "chat", "embeddings"]
    assert plan.tenant_for_key("sk-signalbox-dev") is not None
    assert len(loaded.digest) == 64


def test_problems_never_quote_a_value_that_may_be_an_interpolated_secret(tmp_path: Path) -> None:
    path = write(
        tmp_path / "policy.yaml",
        """
        upstreams:
          a:
            provider: openai
            base_url: "${SB_SECRET}"
            api_key: ${SB_SECRET}
            timeouts: {connect: "${SB_SECRET}", idle: "${SB_SECRET}s"}
        max_body_size: ${SB_SECRET}
        routes:
          - {name: r, upstream: a}
        """,
    )
    problems = problems_of(path, environ={"SB_SECRET": "sk-live-ENVSECRET-9876"})
    rendered = [str(p) for p in problems]
    assert len(rendered) == 3, rendered
    assert not any("ENVSECRET" in line for line in rendered), rendered
    assert any("timeouts.connect: invalid duration: use a number with a unit" in line for line in rendered)
    assert any("max_body_size: invalid size: use a number of bytes" in line for line in rendered)


def test_base_url_credentials_become_basic_auth_and_leave_the_compiled_url(tmp_path: Path) -> None:
    from proxy.upstream.headers import upstream_headers

    path = write(
        tmp_path / "policy.yaml",
        """
        upstreams:
          a: {provider: openai, base_url: "http://svc:${SB_PASSWORD}@127.0.0.1:1/v1/"}
          b: {provider: anthropic, base_url: "https://tok-S3CRET@127.0.0.1:2/v1", api_key: sk-b}
        routes:
          - {name: r, upstream: a}
        """,
    )
    plan = compile_plan(load_policy(path, environ={"SB_PASSWORD": "p%40ss:word"}))
    a, b = plan.upstreams["a"], plan.upstreams["b"]
    assert (a.base_url, b.base_url) == ("http://127.0.0.1:1/v1", "https://127.0.0.1:2/v1")
    assert "p%40ss" not in repr(plan) and "S3CRET" not in repr(plan)
    headers = upstream_headers([("Authorization", "Bearer client")], a, request_id="r")
    assert headers["authorization"] == "Basic c3ZjOnBAc3M6d29yZA=="  # svc:p@ss:word, percent-decoded
    headers = upstream_headers([], b, request_id="r")  # the key goes in x-api-key: no second Authorization
    assert headers["authorization"] == "Basic dG9rLVMzQ1JFVDo=" and headers["x-api-key"] == "sk-b"


# --- directories ---------------------------------------------------------------------------------------

BASE = """
upstreams:
  a: {provider: mock}
tenants:
  t: {keys: [sk-t]}
routes:
  - name: first
    upstream: a
"""


def test_directory_merges_files_in_name_order(tmp_path: Path) -> None:
    # Written out of order on purpose: the load order is the file names' order.
    write(tmp_path / "30-last.yaml", "routes:\n  - {name: fourth, upstream: b}\n")
    write(tmp_path / "10-base.yaml", BASE)
    write(
        tmp_path / "20-more.yml",
        "upstreams:\n  b: {provider: mock}\n"
        "routes:\n  - {name: second, upstream: b}\n  - {name: third, upstream: a}\n",
    )
    write(tmp_path / "notes.txt", "not: [a policy")
    loaded = load_policy(tmp_path, environ={})
    assert [Path(f).name for f in loaded.files] == ["10-base.yaml", "20-more.yml", "30-last.yaml"]
    plan = compile_plan(loaded)
    assert [r.name for r in plan.routes] == ["first", "second", "third", "fourth"]
    assert [r.index for r in plan.routes] == [0, 1, 2, 3]
    assert set(plan.upstreams) == {"a", "b"}
    digest = loaded.digest
    (tmp_path / "30-last.yaml").write_text("routes:\n  - {name: fourth, upstream: a}\n")
    assert load_policy(tmp_path, environ={}).digest != digest


def test_error_in_second_file_reports_that_files_own_line(tmp_path: Path) -> None:
    write(tmp_path / "10-base.yaml", BASE)
    second = write(
        tmp_path / "20-routes.yaml",
        """
        # routes for the batch team

        routes:
          - name: batch
            upstream: a
            timeouts: {idle: forever}
        """,
    )
    [problem] = problems_of(tmp_path)
    assert str(problem).startswith(f"{second}:6:22: routes[1].timeouts.idle: invalid duration: use a number")


def test_reference_error_in_second_file_reports_that_files_own_line(tmp_path: Path) -> None:
    write(tmp_path / "10-base.yaml", BASE)
    second = write(
        tmp_path / "20-routes.yaml",
        """
        routes:
          - name: ok
            upstream: a
          - name: batch
            upstream: aa
          - name: first
            upstream: a
        """,
    )
    problems = problems_of(tmp_path)
    assert [str(p) for p in problems] == [
        f"{second}:5:15: routes[2].upstream: undefined upstream 'aa'; did you mean 'a'?",
        f"{second}:6:11: routes[3].name: duplicate route name 'first' (first used by routes[0])",
    ]


def test_same_entry_or_section_in_two_files(tmp_path: Path) -> None:
    write(tmp_path / "10-base.yaml", "identify: {mode: api_key}\n" + BASE)
    second = write(tmp_path / "20-dup.yaml", "identify: {mode: header}\nupstreams:\n  a: {provider: mock}\n")
    problems = problems_of(tmp_path)
    rendered = sorted(str(p) for p in problems)
    assert rendered == sorted(
        [
            f"{second}:1:1: identify: section defined in more than one file",
            f"{second}:3:3: upstreams.a: defined in more than one file",
        ]
    )


def test_queues_merge_across_files_like_upstreams_and_tenants(tmp_path: Path) -> None:
    write(tmp_path / "10-a.yaml", BASE + "queues:\n  interactive: {concurrency: 2}\n")
    write(tmp_path / "20-b.yaml", "queues:\n  batch: {concurrency: 1}\n")
    assert sorted(load_policy(tmp_path, environ={}).policy.queues) == ["batch", "interactive"]
    third = write(tmp_path / "30-c.yaml", "queues:\n  batch: {concurrency: 3}\n")
    assert [str(p) for p in problems_of(tmp_path)] == [f"{third}:2:3: queues.batch: defined in more than one file"]


def test_configmap_mount_with_data_symlink_and_hidden_entries(tmp_path: Path) -> None:
    # What the kubelet writes: a timestamped hidden directory, `..data` pointing at it, and visible
    # symlinks through `..data`. Only the visible *.yaml entries are the policy.
    mount = tmp_path / "policies"
    real = write(mount / "..2026_11_23_10_00_00.123" / "policy.yaml", BASE)
    (mount / "..data").symlink_to(real.parent.name)
    (mount / "policy.yaml").symlink_to(Path("..data") / "policy.yaml")
    write(mount / ".hidden.yaml", "this: [is not valid")
    write(mount / "..2026_11_23_10_00_00.123" / "stale.yaml", "routes: [broken")
    loaded = load_policy(mount, environ={})
    assert loaded.files == (str(mount / "policy.yaml"),)
    assert [r.name for r in compile_plan(loaded).routes] == ["first"]
    # Errors name the path the operator sees, not the hidden timestamped one.
    write(real, BASE.replace("upstream: a", "upstream: b"))
    [problem] = problems_of(mount)
    assert str(problem).startswith(
        f"{mount / 'policy.yaml'}:7:15: routes[0].upstream: undefined upstream 'b'"
    )


def test_an_empty_file_or_no_routes_in_a_directory(tmp_path: Path) -> None:
    write(tmp_path / "10-base.yaml", BASE)
    empty = write(tmp_path / "20-truncated.yaml", "")
    assert [str(p) for p in problems_of(tmp_path)] == [f"{empty}:1:1: (top): the file is empty "
                                                       "(nothing but comments or blank lines): a policy file "
                                                       "needs at least one section"]
    empty.unlink()
    write(tmp_path / "10-base.yaml", BASE.split("routes:")[0])
    write(tmp_path / "20-more.yaml", "queues:\n  q: {concurrency: 1}\n")
    [problem] = problems_of(tmp_path)
    assert problem.mark is None and problem.path == "routes"
    assert problem.message == f"{tmp_path}: no routes: every request would be refused; define at least one route"


def test_non_files_are_skipped_and_unreadable_files_reported(tmp_path: Path) -> None:
    write(tmp_path / "10-base.yaml", BASE)
    (tmp_path / "20-dir.yaml").mkdir()  # not a file: not part of the set
    assert [Path(f).name for f in load_policy(tmp_path, environ={}).files] == ["10-base.yaml"]
    # A ConfigMap key just removed: its symlink dangles for a moment. Reported, so a reload keeps serving.
    dangling = tmp_path / "30-removed.yaml"
    dangling.symlink_to(Path("..data") / "30-removed.yaml")
    [problem] = problems_of(tmp_path)
    assert str(problem).startswith(f"{dangling}:1:1: (top): cannot read this file: No such file or directory")
    assert "symlink to a missing file" in problem.message
    dangling.unlink()
    unreadable = write(tmp_path / "30-secret.yaml", "routes: []\n")
    unreadable.chmod(0)
    try:
        if os.access(unreadable, os.R_OK):
            pytest.skip("running as root: a mode 000 file is still readable")
        [problem] = problems_of(tmp_path)
        assert str(problem) == f"{unreadable}:1:1: (top): cannot read this file: Permission denied"
    finally:
        unreadable.chmod(0o644)


def test_empty_and_missing_directories(tmp_path: Path) -> None:
    [problem] = problems_of(tmp_path)
    assert problem.mark is None and "no .yaml or .yml files" in problem.message
    [problem] = problems_of(tmp_path / "nowhere")
    assert "no such file or directory" in problem.message
