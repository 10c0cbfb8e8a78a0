"""The documentation: the site builds with --strict (no broken link or anchor), the policy field reference
is complete and generated from the schema, and the README stays a landing page that links only inside
the repository."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import Field

from proxy.policy.reference import render
from proxy.policy.schema import Policy, Strict
from proxy.policy.schema_docs import field_docs, missing_descriptions, models

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _markdown_files() -> list[Path]:
    return [ROOT / "README.md", ROOT / "bench" / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def test_site_builds_strict(tmp_path: Path) -> None:
    """A broken link, a missing anchor or a page left out of the nav fails the build (and so CI)."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=180, env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    reference = (tmp_path / "site" / "policy" / "reference" / "index.html").read_text()
    assert "max_buffered_response" in reference and "Larger request bodies get 413." in reference
    assert (tmp_path / "site" / "contributing" / "benchmarks" / "index.html").exists()


def test_every_policy_model_and_field_has_a_description() -> None:
    assert missing_descriptions() == [], "write a docstring under each of these fields (schema*.py)"


def test_a_field_without_a_docstring_is_reported() -> None:
    class Sample(Strict):
        """A model for this test."""

        described: int = 1
        """It has one."""
        bare: int = Field(default=2, ge=0)

    assert missing_descriptions(Sample) == ["Sample.bare"]


def test_reference_renders_every_field_with_type_default_and_text() -> None:
    page = render()
    for model in models():
        assert f"## {model.__name__}\n" in page
        for name in model.model_fields:
            text = field_docs(model)[name]
            row = next((line for line in page.splitlines() if line.startswith(f"| `{name}` |")
                        and " ".join(text.split()) in line), None)
            assert row is not None, f"{model.__name__}.{name} is missing from the reference"
    assert "| duration | `3s` |" in _row(page, "Pool", "keepalive")
    assert "| size | `32MiB` |" in _row(page, "Policy", "max_body_size")
    assert "| duration | `10ms` |" in _row(page, "Batch", "max_wait")
    assert "| duration | `30s` |" in _row(page, "Queue", "max_wait")
    assert "integer (≥ 1; ≤ 100000) | `1024` |" in _row(page, "Pool", "max_connections")
    assert "| one of `openai`, `anthropic`, `mock`, `http` | required |" in _row(page, "Upstream", "provider")
    assert "map of name to [Upstream](#upstream)" in _row(page, "Policy", "upstreams")
    assert "Used at: `upstreams.NAME.timeouts`, `routes[].timeouts`, `timeouts`." in page


def _row(page: str, model: str, field: str) -> str:
    section = page.split(f"\n## {model}\n", 1)[1].split("\n## ", 1)[0]
    return next(line for line in section.splitlines() if line.startswith(f"| `{field}` |"))


def test_published_json_schema_carries_the_descriptions() -> None:
    published: dict[str, Any] = json.loads((ROOT / "policy.schema.json").read_text())
    undescribed = [
        f"{name}.{prop}"
        for name, model in published["$defs"].items()
        for prop, spec in model.get("properties", {}).items()
        if not spec.get("description")
    ]
    undescribed += [f"Policy.{prop}" for prop, spec in published["properties"].items() if not spec.get("description")]
    assert undescribed == []
    assert published["properties"]["max_body_size"]["description"].startswith(field_docs(Policy)["max_body_size"])


def test_readme_is_a_landing_page() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200
    first_screen = "\n".join(lines[:15])
    assert "make run" in first_screen and "make test" in first_screen
    assert "bench/README.md" in "\n".join(lines)


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_links_stay_inside_the_repository(path: Path) -> None:
    """Every Markdown link is relative and lands on a file of the repository (or a page the docs build makes)."""
    generated = {ROOT / "docs" / "policy" / "reference.md", ROOT / "docs" / "contributing" / "benchmarks.md"}
    text = FENCE.sub("", path.read_text())
    for target in LINK.findall(text):
        assert "://" not in target and not target.startswith(("/", "mailto:")), f"{path.name}: {target}"
        file_part = target.split("#", 1)[0]
        if not file_part:
            continue
        resolved = (path.parent / file_part).resolve()
        assert resolved.is_relative_to(ROOT), f"{path.name}: {target} leaves the repository"
        assert resolved.exists() or resolved in generated, f"{path.name}: {target} does not exist"


def test_nothing_points_at_files_outside_the_repository() -> None:
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True, timeout=30)
    offenders = []
    for name in tracked.stdout.splitlines():
        path = ROOT / name
        if path.suffix not in {".md", ".py", ".yaml", ".yml", ".toml", ".txt", ".tpl"} or not path.is_file():
            continue
        if path == Path(__file__).resolve():
            continue
        text = path.read_text(errors="replace")
        if "shared/DESIGN.md" in text or "../shared/" in text or "shared/research/" in text:
            offenders.append(name)
    assert offenders == []
