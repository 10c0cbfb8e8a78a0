"""Read policy YAML (a file or a directory of files) into a validated `Policy`, with `file:line` errors.

Each file is composed with its marks (proxy.policy.marked), the files are merged, the whole is validated
with pydantic (errors placed by proxy.policy.places) and the references between sections are checked
(proxy.policy.checks). Every problem of every file is reported at once, sorted by file and line.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from proxy.policy.checks import View, cross_check, salvage
from proxy.policy.marked import parse_file
from proxy.policy.places import translate
from proxy.policy.problems import Mark, Marks, PolicyError, Problem, dotted
from proxy.policy.schema import Policy
from proxy.policy.units import secret_files_fingerprint

__all__ = ["LoadedPolicy", "Mark", "PolicyError", "Problem", "load_policy", "policy_files"]

# The sections that are maps of named entries: several files may each add entries.
_MERGED_MAPS = ("upstreams", "tenants", "queues")


@dataclass(frozen=True, slots=True)
class LoadedPolicy:
    policy: Policy
    files: tuple[str, ...]
    digest: str
    """sha256 over the files' bytes, in load order: the policy's source version."""
    secrets: str = ""
    """`secret_files_fingerprint` of the secret files the policy read (a rotated key is a new version)."""


def policy_files(path: Path) -> list[Path]:
    """The YAML files of a policy set, in name order. Hidden entries (ConfigMap `..data`) are skipped, and
    so is anything that is not a file (a directory named `x.yaml`). A dangling symlink is listed: reading
    it fails and is reported (a ConfigMap key being removed), so a reload keeps the serving policy."""
    if path.is_dir():
        return sorted(
            p for p in path.iterdir()
            if p.suffix in (".yaml", ".yml") and not p.name.startswith(".")
            and (p.is_file() or (p.is_symlink() and not p.exists()))
        )
    return [path]


def load_policy(path: Path | str, environ: Mapping[str, str] | None = None) -> LoadedPolicy:
    path = Path(path)
    if not path.exists():
        raise PolicyError([Problem(None, "", f"{path}: no such file or directory")])
    try:
        files = policy_files(path)
    except OSError as exc:
        raise PolicyError([Problem(None, "", f"{path}: cannot list the directory: {exc.strerror}")]) from None
    if not files:
        raise PolicyError([Problem(None, "", f"{path}: no .yaml or .yml files found")])
    problems: list[Problem] = []
    marks = Marks({}, {})
    merged: dict[str, Any] = {}
    digest = hashlib.sha256()
    unparsed = False
    texts: list[str] = []
    for file in files:
        try:
            raw = file.read_bytes()
        except OSError as exc:
            problems.append(_unreadable(file, exc))
            continue
        digest.update(file.name.encode() + b"\0" + raw + b"\0")
        file_marks = Marks({}, {})
        texts.append(raw.decode("utf-8", errors="replace"))
        data = parse_file(file, texts[-1], file_marks, problems, environ)
        if data is None:
            unparsed = True
        else:
            _merge(data, file_marks, merged, marks, problems)
    policy, view = _validate(merged, marks, problems)
    if view is not None and not unparsed:  # a file that did not parse would make every name it defines look undefined
        problems += [Problem(marks.at(loc), dotted(loc), message) for loc, message in cross_check(view)]
    if not problems and policy is not None and not policy.routes:
        problems.append(_no_routes(path, files, marks))
    if problems or policy is None:
        raise PolicyError(sorted(problems, key=Problem.sort_key))
    secrets = secret_files_fingerprint(texts, environ)
    return LoadedPolicy(policy, tuple(str(f) for f in files), digest.hexdigest(), secrets)


def _validate(merged: dict[str, Any], marks: Marks, problems: list[Problem]) -> tuple[Policy | None, View | None]:
    """The validated policy, and the view the cross-checks run over: the whole policy, or what is left of
    it without the entries the schema rejected (whose problems are added)."""
    try:
        policy = Policy.model_validate(merged)
    except ValidationError as exc:
        found, bad = translate(exc, merged, marks)
        problems += found
        return None, salvage(merged, bad)
    return policy, View.of(policy, merged)


def _unreadable(file: Path, exc: OSError) -> Problem:
    reason = exc.strerror or type(exc).__name__
    if file.is_symlink() and not file.exists():
        reason += " (a symlink to a missing file; a ConfigMap key being removed looks like this for a moment)"
    return Problem(Mark(str(file), 1, 1), "", f"cannot read this file: {reason}")


def _no_routes(path: Path, files: list[Path], marks: Marks) -> Problem:
    """A set without routes refuses every request (401 or 404): never something to serve or hot-reload."""
    mark = marks.values.get(("routes",)) or (Mark(str(files[0]), 1, 1) if len(files) == 1 else None)
    where = "" if mark is not None else f"{path}: "
    return Problem(mark, "routes", f"{where}no routes: every request would be refused; define at least one route")


def _merge(
    data: dict[str, Any], file_marks: Marks, merged: dict[str, Any], marks: Marks, problems: list[Problem]
) -> None:
    """Fold one file into the set: named maps merge, routes append in file order, the rest appear once."""
    shift = len(merged.get("routes", ())) if isinstance(merged.get("routes"), list) else 0
    for table, into in ((file_marks.values, marks.values), (file_marks.keys, marks.keys)):
        for loc, mark in table.items():
            if shift and len(loc) > 1 and loc[0] == "routes" and isinstance(loc[1], int):
                loc = ("routes", loc[1] + shift) + loc[2:]
            into.setdefault(loc, mark)
    for section, value in data.items():
        if section == "routes" and isinstance(value, list) and isinstance(merged.get("routes", []), list):
            merged.setdefault("routes", []).extend(value)
        elif section in _MERGED_MAPS and isinstance(value, dict) and isinstance(merged.get(section), dict):
            for name, entry in value.items():
                if name in merged[section]:
                    where = file_marks.keys.get((section, name))
                    problems.append(Problem(where, f"{section}.{name}", "defined in more than one file"))
                merged[section][name] = entry
        elif section in merged:
            where = file_marks.keys.get((section,))
            problems.append(Problem(where, section, "section defined in more than one file"))
        else:
            merged[section] = value
