"""One `validate` run reports every problem: schema errors and cross-section references together, one line per
problem, sorted by file and line, across every file of the set."""

from __future__ import annotations

from pathlib import Path

from test_cli import PROBLEM_LINE, run
from test_policy_load import problems_of, write


def test_schema_errors_and_references_in_one_run(tmp_path: Path) -> None:
    path = write(tmp_path / "policy.yaml", """
        upstreams:
          main: {provider: openai, base_url: "http://127.0.0.1:1/v1", timeoutz: {connect: 1s}}
          spare: {provider: mock}
        tenants:
          team: {keys: [k1], priority: urgent}
        routes:
          - name: chat
            match: {path: /v1/chat/completions}
            upstream: mian
            queue: q
          - name: broken
            match: {path: /v1/embeddings}
            upstream: main
            retry: {attempts: many}
          - name: tail
            match: {path: /v1/messages}
            upstream: main
            fallbacks: [chatt]
        """)
    found = [(p.mark.line if p.mark else 0, p.path, p.message) for p in problems_of(path)]
    assert found == [
        (2, "upstreams.main.timeoutz", "unknown key 'timeoutz'; did you mean 'timeouts'?"),
        (5, "tenants.team.priority", "unknown priority class 'urgent' (priorities: standard)"),
        (9, "routes[0].upstream", "undefined upstream 'mian'; did you mean 'main'?"),
        (10, "routes[0].queue", "undefined queue 'q' (defined: none defined)"),
        (found[4][0], "routes[1].retry.attempts", found[4][2]),
        (18, "routes[2].fallbacks[0]", "undefined route 'chatt'; did you mean 'chat'?"),
    ]
    assert found[4][0] == 14 and "integer" in found[4][2]


def test_a_rejected_entry_still_counts_as_defined(tmp_path: Path) -> None:
    """An upstream with its own schema error is not also 'undefined' where a route names it."""
    path = write(tmp_path / "policy.yaml", """
        upstreams:
          main: {provider: openia}
        routes:
          - {name: a, match: {path: /v1/chat/completions}, upstream: main}
          - {name: b, match: {path: /v1/embeddings}, upstream: nowhere}
        """)
    found = [(p.path, p.message.split(";")[0].split(" (")[0]) for p in problems_of(path)]
    assert [f[0] for f in found] == ["upstreams.main.provider", "routes[1].upstream"]
    assert found[1][1] == "undefined upstream 'nowhere'"


def test_validate_prints_every_problem_of_every_file_sorted(tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    write(policies / "b-routes.yaml", """
        routes:
          - name: chat
            match: {path: /v1/chat/completions}
            upstream: mainn
            timeout: 3s
        """)
    write(policies / "a-upstreams.yaml", """
        upstreams:
          main: {provider: mock, mock: {ttft: soon}}
        tenants:
          t: {keys: [k], max_priority: top}
        """)
    result = run("validate", str(policies))
    assert result.returncode == 1 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[-1] == "4 problem(s) found"
    parsed = [PROBLEM_LINE.match(line) for line in lines[:-1]]
    assert all(parsed), lines
    places = [(Path(m["file"]).name, int(m["line"]), m["path"]) for m in parsed if m]
    assert places == [
        ("a-upstreams.yaml", 2, "upstreams.main.mock.ttft"),
        ("a-upstreams.yaml", 4, "tenants.t.max_priority"),
        ("b-routes.yaml", 4, "routes[0].upstream"),
        ("b-routes.yaml", 5, "routes[0].timeout"),
    ]
