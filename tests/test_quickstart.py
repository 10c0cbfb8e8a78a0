"""The README's commands, run as written on a fresh copy of the repository's tracked files: the serve command
`make run` runs, in the background, then the quick start's shell and Python examples against it; and the
README's example policy through `signalbox validate`.

`make -n run` says what `make run` would run, so the test follows the Makefile whatever it installs first;
only the serve line is run (the test's environment is already installed). The README's ports are used when
free, otherwise free ones are put in their place, in the command and in the examples alike.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def readme_section(heading: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def fenced(text: str, language: str) -> list[str]:
    return [code for lang, code in BLOCK.findall(text) if lang == language]


def fresh_tree(destination: Path) -> Path:
    """The tracked files only, as a clone would have them (the working tree's version of each)."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=30)
    for name in listed.stdout.decode().split("\0"):
        source = ROOT / name
        if name and source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    return destination


def port_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def serve_command() -> list[str]:
    """The `signalbox serve` line `make run` runs, with the venv's executables made absolute."""
    dry = subprocess.run(["make", "-n", "run"], cwd=ROOT, capture_output=True, text=True, check=True, timeout=30)
    lines = [line for line in dry.stdout.splitlines() if " serve " in f" {line} "]
    assert len(lines) == 1, dry.stdout
    argv = shlex.split(lines[0])
    if not os.path.isabs(argv[0]) and "/" in argv[0]:
        argv[0] = str(ROOT / argv[0])
    return argv


def option(argv: list[str], name: str) -> int | None:
    return int(argv[argv.index(name) + 1]) if name in argv else None


def set_option(argv: list[str], name: str, value: int) -> None:
    if name in argv:
        argv[argv.index(name) + 1] = str(value)
    else:
        argv += [name, str(value)]


def wait_ready(process: subprocess.Popen[bytes], port: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, "the serve command exited before it was ready"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    pytest.fail("the proxy did not become ready within 60 s")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, int, int]]:
    """`make run`'s serve command, running in a fresh tree: (tree, the README's port, the port used)."""
    tree = fresh_tree(tmp_path / "clone")
    argv = serve_command()
    readme_port = option(argv, "--port") or 8080
    port = readme_port if port_free(readme_port) else free_port()
    set_option(argv, "--port", port)
    admin = option(argv, "--admin-port")
    if admin is not None and not port_free(admin):
        set_option(argv, "--admin-port", free_port())
    env = {k: v for k, v in os.environ.items() if k not in ("SIGNALBOX_DEV_KEY", "SIGNALBOX_ADMIN_TOKEN")}
    with open(tmp_path / "serve.log", "wb") as log:
        process = subprocess.Popen(argv, cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        wait_ready(process, port)
        yield tree, readme_port, port
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def streamed_text(sse: str) -> str:
    parts = []
    for line in sse.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            chunk = orjson.loads(line[6:])
            parts += [choice["delta"].get("content") or "" for choice in chunk.get("choices", [])]
    return "".join(parts)


def test_first_screen_commands_are_make_targets() -> None:
    text = (ROOT / "README.md").read_text()
    first = fenced(text, "sh")[0]
    commands = [line.split("#")[0].strip() for line in first.splitlines() if line.strip()]
    assert commands == ["make run", "make test"]
    for target in ("run", "test", "docs", "docs-serve", "lint"):
        subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, check=True, timeout=30)


def test_quick_start_examples_run_as_written(served: tuple[Path, int, int], tmp_path: Path) -> None:
    tree, readme_port, port = served
    section = readme_section("Quick start")
    shell, python = fenced(section, "sh"), fenced(section, "python")
    assert len(shell) == 1 and len(python) == 1, "the quick start has one curl example and one Python example"

    def here(code: str) -> str:
        return code.replace(f"127.0.0.1:{readme_port}", f"127.0.0.1:{port}")

    curl = subprocess.run(["bash", "-euo", "pipefail", "-c", here(shell[0])], cwd=tree, capture_output=True,
                          text=True, timeout=60)
    assert curl.returncode == 0, curl.stderr
    assert curl.stdout.rstrip().endswith("data: [DONE]")
    text = streamed_text(curl.stdout)
    assert len(text.split()) >= 5

    # `.venv/bin/python hello.py`, as the README says: this interpreter is that venv's, with openai in it.
    (tree / "hello.py").write_text(here(python[0]))
    sdk = subprocess.run([sys.executable, "hello.py"], cwd=tree, capture_output=True, text=True, timeout=60)
    assert sdk.returncode == 0, sdk.stderr
    assert sdk.stdout.strip() == text.strip()


def test_readme_example_policy_validates(tmp_path: Path) -> None:
    policies = [code for code in fenced(readme_section("For policy authors"), "yaml") if "routes:" in code]
    assert len(policies) == 1
    (tmp_path / "policy.yaml").write_text(policies[0])
    names = set(re.findall(r"\$\{(\w+)\}", policies[0]))
    env = {**os.environ, **{name: f"ci-dummy-{name.lower()}" for name in names}}
    done = subprocess.run([sys.executable, "-m", "proxy", "validate", str(tmp_path / "policy.yaml")],
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
