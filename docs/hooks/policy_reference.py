"""MkDocs hook: renders the policy field reference and takes bench/README.md into the site, at every build.

Neither page is committed under docs/: the reference comes from the schema's docstrings
(proxy/policy/reference.py) and the benchmark page is bench/README.md itself, so neither can drift.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files

from proxy.policy.reference import render

ROOT = Path(__file__).resolve().parents[2]


def on_files(files: Files, config: MkDocsConfig) -> Files:
    files.append(File.generated(config, "policy/reference.md", content=render()))
    files.append(File.generated(config, "contributing/benchmarks.md", content=(ROOT / "bench/README.md").read_text()))
    return files
