"""The command line as an operator runs it: `python -m proxy validate` and `python -m proxy serve` in a child
process (exit codes, output format, start-up time, SIGTERM)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest

pytestmark = pytest.mark.timeout(30)

REPO = Path(__file__).resolve().parent.parent
PYTHON = (
    str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() else sys.executable
)
PROBLEM_LINE = re.compile(r"^(?P<file>.+):(?P<line>\d+):(?P<column>\d+): (?P<path>\S+): (?P<message>.+)$")


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SIGNALBOX_", "OPENAI_"))}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "proxy", *args], cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=20
    )


def test_validate_default_policy() -> None:
    result = run("validate", "policies/default.yaml")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    assert re.fullmatch(
        r"ok: 1 file\(s\), 1 upstream\(s\), 1 tenant\(s\), 3 route\(s\); digest [0-9a-f]{12}", lines[0]
    ), lines[0]
    assert result.stderr == ""


def test_validate_reports_each_problem_with_its_place(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        textwrap.dedent(
            """
            upstreams:
              main:
                provider: openai
                base_ulr: http://127.0.0.1:1/v1
            routez: []
            """
        ).lstrip("\n")
    )
    result = run("validate", str(bad))
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[-1] == "2 problem(s) found"
    found = [PROBLEM_LINE.match(line) for line in lines[:-1]]
    assert all(found), lines
    parsed = [(m["file"], int(m["line"]), int(m["column"]), m["path"], m["message"]) for m in found if m]
    assert parsed == [
        (str(bad), 4, 5, "upstreams.main.base_ulr", "unknown key 'base_ulr'; did you mean 'base_url'?"),
        (str(bad), 5, 1, "routez", "unknown key 'routez'; did you mean 'routes'?"),
    ]


def test_validate_missing_path_and_usage_errors(tmp_path: Path) -> None:
    result = run("validate", str(tmp_path / "nope.yaml"))
    assert result.returncode == 1
    assert "no such file or directory" in result.stderr
    usage = run("frobnicate")
    assert usage.returncode == 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_serve_answers_and_stops_on_sigterm() -> None:
    port = free_port()
    args = [
        "serve",
        "--policies",
        "policies/default.yaml",
        "--port",
        str(port),
        "--admin-port",
        str(free_port()),
    ]
    child = subprocess.Popen(
        [PYTHON, "-m", "proxy", *args, "--shutdown-grace", "0"],
        cwd=REPO,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        started = time.monotonic()
        ready = None
        # A bound so a broken start ends the test, not a speed claim (the machine may be loaded).
        while time.monotonic() - started < 60.0:
            try:
                ready = get(f"http://127.0.0.1:{port}/readyz")
            except OSError:
                time.sleep(0.02)
                continue
            if ready[0] == 200:
                break
            time.sleep(0.02)
        assert ready is not None and ready[0] == 200, f"never ready: {ready}"
        assert json.loads(ready[1])["ready"] is True

        # A real request through the served proxy, to the built-in mock, with the default dev key.
        with openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-signalbox-dev", max_retries=0, timeout=10
        ) as client:
            answer = client.chat.completions.create(
                model="mock-chat", messages=[{"role": "user", "content": "hi"}]
            )
        assert answer.choices[0].message.content

        child.send_signal(signal.SIGTERM)
        code = child.wait(timeout=10)
        stdout, stderr = child.communicate(timeout=5)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=5)
        for pipe in (child.stdout, child.stderr):
            if pipe is not None:
                pipe.close()
    assert code == 0, stderr.decode()
    # The access log (stdout, JSON lines) has the request.
    lines = [json.loads(line) for line in stdout.decode().splitlines() if line.startswith("{")]
    assert any(line["route"] == "chat" and line["status"] == 200 for line in lines)


def test_serve_on_a_port_in_use_says_so_in_one_line_and_exits_2() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for ports in ((port, free_port()), (free_port(), port)):  # the API port, then the admin port
            args = ["--port", str(ports[0]), "--admin-port", str(ports[1]), "--shutdown-grace", "0"]
            result = run("serve", "--policies", "policies/default.yaml", *args)
            assert result.returncode == 2, result.stderr
            assert "Traceback" not in result.stderr
            assert result.stderr.strip().splitlines()[-1].startswith("cannot listen: "), result.stderr


def test_serve_with_an_invalid_policy_exits_1(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("upstream: {}\n")
    result = run("serve", "--policies", str(bad), "--port", str(free_port()))
    assert result.returncode == 1
    assert f"{bad}:1:1: upstream: unknown key 'upstream'; did you mean 'upstreams'?" in result.stderr


def problem_lines(result: subprocess.CompletedProcess[str]) -> list[tuple[str, int, int, str, str]]:
    """validate's problem lines, parsed; fails on anything else (a traceback, a bare message)."""
    lines = result.stderr.splitlines()
    assert lines and lines[-1] == f"{len(lines) - 1} problem(s) found", result.stderr
    found = [PROBLEM_LINE.match(line) for line in lines[:-1]]
    assert all(found), result.stderr
    return [(m["file"], int(m["line"]), int(m["column"]), m["path"], m["message"]) for m in found if m]


def test_validate_and_serve_report_unreadable_entries_without_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "policy.yaml").write_text((REPO / "policies" / "default.yaml").read_text())
    (tmp_path / "archive.yaml").mkdir()  # a directory is not part of the set
    dangling = tmp_path / "removed.yaml"
    dangling.symlink_to(Path("..data") / "removed.yaml")  # a ConfigMap key being removed
    for result in (run("validate", str(tmp_path)), run("serve", "--policies", str(tmp_path), "--port", "0")):
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert f"{dangling}:1:1: (top): cannot read this file: No such file or directory" in result.stderr
    assert [(f, line, path) for f, line, _, path, _ in problem_lines(run("validate", str(tmp_path)))] == [
        (str(dangling), 1, "(top)")
    ]
    dangling.unlink()
    assert run("validate", str(tmp_path)).returncode == 0


def test_validate_refuses_an_empty_file_and_a_set_without_routes(tmp_path: Path) -> None:
    empty = tmp_path / "policy.yaml"
    empty.write_text("# truncated by a non-atomic save\n")
    result = run("validate", str(empty))
    assert result.returncode == 1 and result.stdout == ""
    [(file, line, column, path, message)] = problem_lines(result)
    assert (file, line, column, path) == (str(empty), 1, 1, "(top)") and "the file is empty" in message
    empty.write_text("upstreams: {mock: {provider: mock}}\ntenants: {t: {keys: [sk-t]}}\n")
    [(file, line, column, path, message)] = problem_lines(run("validate", str(empty)))
    assert (file, line, column, path) == (str(empty), 1, 1, "routes") and "no routes" in message


def test_validate_never_prints_an_interpolated_value(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "upstreams:\n  o: {provider: openai, base_url: 'http://127.0.0.1:1/v1',\n"
        "      timeouts: {connect: '${SB_CLI_SECRET}'}}\n"
        "routes: [{name: r, upstream: o}]\n"
    )
    env = {**child_env(), "SB_CLI_SECRET": "sk-ENVSECRET"}
    result = subprocess.run(
        [PYTHON, "-m", "proxy", "validate", str(policy)], cwd=REPO, env=env, capture_output=True, text=True, timeout=20
    )
    [(_, line, _, path, message)] = problem_lines(result)
    assert (line, path) == (3, "upstreams.o.timeouts.connect") and "ENVSECRET" not in result.stderr, message
