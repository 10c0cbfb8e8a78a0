"""Globs compiled once (route paths and models, tenant model lists, hidden response headers)."""

from __future__ import annotations

import re


class Matcher:
    """A set of globs compiled once into one regex; exact names take a set lookup."""

    __slots__ = ("exact", "regex", "patterns")

    def __init__(self, patterns: tuple[str, ...]) -> None:
        self.patterns = patterns
        self.exact = frozenset(p for p in patterns if not _is_glob(p))
        globs = [p for p in patterns if _is_glob(p)]
        self.regex = re.compile("|".join(_glob_regex(p) for p in globs)) if globs else None

    def __call__(self, value: str) -> bool:
        if value in self.exact:
            return True
        return self.regex is not None and self.regex.fullmatch(value) is not None

    def __repr__(self) -> str:
        return f"Matcher({list(self.patterns)})"


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def _glob_regex(pattern: str) -> str:
    """fnmatch-style globs; `*` also crosses `/` (model names like `meta-llama/*` and paths)."""
    out = []
    for char in pattern:
        out.append(".*" if char == "*" else "." if char == "?" else re.escape(char))
    return "(?:" + "".join(out) + ")"
