"""The first hour of a new user: `make run` installs only what serving needs and serves with the admin API
open on loopback (and says so), and nothing lets that mode open a non-loopback admin port."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from test_cli import PYTHON, REPO, child_env, free_port

from proxy.cli import main as cli_main

pytestmark = pytest.mark.timeout(60)


def make_dry_run(target: str, venv: Path) -> list[str]:
    if shutil.which("make") is None:
        pytest.fail("make is needed: the Makefile is how a new user starts")
    # Under `make test` this is a nested make: without its parent's variables (and with no directory
    # lines) the dry run prints exactly the recipe a user's `make run` prints.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    out = subprocess.run(["make", "--no-print-directory", "-n", "-B", target, f"VENV={venv}"], cwd=REPO,
                         capture_output=True, text=True, check=True, timeout=30, env=env).stdout
    return out.splitlines()


def test_make_run_installs_the_runtime_only_and_make_test_adds_the_test_extra(tmp_path: Path) -> None:
    run = make_dry_run("run", tmp_path / "venv")
    installs = [line for line in run if " install " in line and "--upgrade pip" not in line]
    assert len(installs) == 1 and installs[0].endswith(f"{tmp_path}/venv/bin/pip install --quiet -e .")
    test = make_dry_run("test", tmp_path / "venv")
    assert any(line.endswith("-e '.[test]'") for line in test)


def test_make_run_serves_with_the_admin_api_open_on_loopback_and_warns(tmp_path: Path) -> None:
    serve = shlex.split(make_dry_run("run", tmp_path / "venv")[-1])
    assert serve[1] == "serve"
    port, admin = free_port(), free_port()
    args = [str(port) if a == "8080" else str(admin) if a == "9090" else a for a in serve[2:]]
    child = subprocess.Popen([PYTHON, "-m", "proxy", "serve", *args, "--shutdown-grace", "0"], cwd=REPO,
                             env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 40  # start-up is slow on a loaded machine
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin}/admin/policy", timeout=2) as answer:
                    status, body = answer.status, json.loads(answer.read())
                break
            except OSError:
                assert time.monotonic() < deadline and child.poll() is None, "make run's serve did not start"
                time.sleep(0.1)
        assert status == 200 and body["files"] == ["policies/default.yaml"]
    finally:
        child.terminate()
        _, stderr = child.communicate(timeout=20)
    assert "admin API is open without a token on 127.0.0.1" in stderr and "development only" in stderr


def test_no_auth_is_refused_unless_every_address_of_the_admin_host_is_loopback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A name is judged by what it resolves to: a `localhost` that /etc/hosts maps to a LAN address is
    refused (nothing is sent to that address; the resolver's answer is all that is faked)."""
    real = socket.getaddrinfo

    def hosts_file(host: str, *args: Any, **kwargs: Any) -> Any:
        if host == "localhost":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.1.2.3", 0))]
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", hosts_file)
    for host in ("localhost", "0.0.0.0", "", "::", "192.0.2.1", "no-such-host.invalid"):
        assert cli_main(["serve", "--admin-no-auth", "--admin-host", host, "--policies", "/nonexistent"]) == 2, host
        assert "needs a loopback --admin-host" in capsys.readouterr().err
