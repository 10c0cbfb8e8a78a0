"""The image installs pinned dependencies: constraints.txt pins every runtime dependency of signalbox
(the whole tree on this interpreter), each pin satisfies pyproject's own ranges, and the Dockerfile
installs with it."""

from __future__ import annotations

import importlib.util
import re
import tomllib
from pathlib import Path
from types import ModuleType

from packaging.requirements import Requirement
from packaging.version import Version
from test_deploy_artifacts import dockerfile_stages

REPO = Path(__file__).resolve().parent.parent


def refresher() -> ModuleType:
    spec = importlib.util.spec_from_file_location("refresh_constraints", REPO / "scripts" / "refresh-constraints.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pins() -> dict[str, str]:
    found: dict[str, str] = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line.strip())
        assert match, f"not an exact pin: {line!r}"
        name = refresher().canonical(match.group(1))
        assert name not in found, f"{name} pinned twice"
        found[name] = match.group(2)
    return found


def test_constraints_pin_every_runtime_dependency() -> None:
    pinned = pins()
    needed = refresher().runtime_closure()
    assert {"aiohttp", "pydantic", "pydantic-core", "yarl", "multidict"} <= set(needed)
    missing = sorted(set(needed) - set(pinned))
    assert not missing, f"run `make constraints`: {missing} not pinned"
    # Nothing test-only sneaks into the image.
    assert not {"pytest", "openai", "anthropic", "mypy", "ruff", "hypothesis"} & set(pinned)


def test_pins_satisfy_the_declared_ranges() -> None:
    pinned = pins()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for line in project["dependencies"]:
        req = Requirement(line)
        name = refresher().canonical(req.name)
        assert name in pinned, f"{req.name} is declared but not pinned"
        assert req.specifier.contains(Version(pinned[name]), prereleases=True), f"{name}=={pinned[name]} vs {req}"


def test_the_dockerfile_installs_with_the_constraints() -> None:
    builder = dockerfile_stages()[0]
    copies = " ".join(v for k, v in builder if k == "COPY")
    assert "constraints.txt" in copies.split()
    installs = [v for k, v in builder if k == "RUN" and "pip install" in v]
    assert installs and all(re.search(r"pip install (--constraint|-c) constraints\.txt ", v) for v in installs)
