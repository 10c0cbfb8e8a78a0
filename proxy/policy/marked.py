"""Policy YAML into plain data that keeps every value's and key's place, and syntax errors that point at
where the structure went wrong (the quote, bracket or key left open), not only where PyYAML noticed."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from proxy.policy.problems import Loc, Mark, Marks, Problem, dotted
from proxy.policy.units import UnsetVariable, interpolate

# Contexts whose mark is where something was opened and never closed: the mistake is there.
_OPENERS = ("while scanning a quoted scalar", "while parsing a flow", "while scanning a simple key",
            "while scanning a block scalar", "while scanning an anchor", "while scanning an alias",
            "while scanning a tag")


def mark_of(file: Path, node: yaml.Node) -> Mark:
    return Mark(str(file), node.start_mark.line + 1, node.start_mark.column + 1)


def parse_file(
    file: Path, text: str, marks: Marks, problems: list[Problem], environ: Mapping[str, str] | None
) -> dict[str, Any] | None:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        problems.append(syntax_problem(file, text, exc))
        return None
    if root is None:  # nothing but comments and blank lines: a truncated save or an empty ConfigMap key
        message = "the file is empty (nothing but comments or blank lines): a policy file needs at least one section"
        problems.append(Problem(Mark(str(file), 1, 1), "", message))
        return None
    if not isinstance(root, yaml.MappingNode):
        problems.append(Problem(mark_of(file, root), "", "a policy file must be a mapping of sections"))
        return None
    data = _Builder(file, marks, problems, environ).build(root, ())
    return data if isinstance(data, dict) else None


def syntax_problem(file: Path, text: str, exc: yaml.MarkedYAMLError) -> Problem:
    """One problem at the place to edit, naming where PyYAML noticed when that is somewhere else."""
    noticed, opened, context = exc.problem_mark, exc.context_mark, exc.context or ""
    problem = exc.problem or "invalid YAML"
    if noticed is None:
        return Problem(Mark(str(file), 1, 1), "", f"YAML syntax error: {problem}")
    seen = f"line {noticed.line + 1}, column {noticed.column + 1}"
    if opened is not None and context.startswith(_OPENERS):
        thing = context.removeprefix("while scanning ").removeprefix("while parsing ")
        where = Mark(str(file), opened.line + 1, opened.column + 1)
        return Problem(where, "", f"YAML syntax error: {thing} starts here and is not closed ({problem} at {seen})")
    here = Mark(str(file), noticed.line + 1, noticed.column + 1)
    if problem == "mapping values are not allowed here":
        keyless = _line_without_colon_above(text, noticed.line)
        if keyless is not None:
            where = Mark(str(file), keyless + 1, 1)
            return Problem(where, "", f"YAML syntax error: this key has no ':' after it ({problem} at {seen})")
    if opened is not None and context:
        thing = context.removeprefix("while parsing ")
        at = f"line {opened.line + 1}, column {opened.column + 1}"
        return Problem(here, "", f"YAML syntax error: {problem} (check this line's indentation: it is inside "
                                 f"{thing} that starts at {at})")
    return Problem(here, "", f"YAML syntax error: {problem}")


def _line_without_colon_above(text: str, line: int) -> int | None:
    """The previous meaningful line, when it is a bare word less indented than `line` (a key missing ':')."""
    lines = text.splitlines()
    if line >= len(lines):
        return None
    indent = len(lines[line]) - len(lines[line].lstrip())
    for above in range(line - 1, -1, -1):
        stripped = lines[above].strip()
        if not stripped or stripped.startswith("#"):
            continue
        shallower = len(lines[above]) - len(lines[above].lstrip()) < indent
        return above if shallower and ":" not in stripped and not stripped.startswith("-") else None
    return None


class _Builder:
    """Plain data from the composed node tree, recording each value's and key's mark by data path."""

    def __init__(self, file: Path, marks: Marks, problems: list[Problem], environ: Mapping[str, str] | None) -> None:
        self.file, self.marks, self.problems, self.environ = file, marks, problems, environ
        self.constructor = yaml.SafeLoader("")

    def build(self, node: yaml.Node, loc: Loc) -> Any:
        self.marks.values[loc] = mark_of(self.file, node)
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, loc)
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, loc + (i,)) for i, item in enumerate(node.value)]
        value = self.constructor.construct_object(node, deep=True)
        if isinstance(value, str):
            try:
                return interpolate(value, self.environ)
            except UnsetVariable as exc:
                self.problems.append(Problem(mark_of(self.file, node), dotted(loc), str(exc)))
        return value

    def _mapping(self, node: yaml.MappingNode, loc: Loc) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = self.constructor.construct_object(key_node, deep=True)
            if isinstance(key, bool) and isinstance(key_node, yaml.ScalarNode) and not key_node.style:
                key = key_node.value  # a plain `on:` key is the word, as in YAML 1.2 (retry rules' `on`)
            if not isinstance(key, str | int) or isinstance(key, bool):
                self.problems.append(Problem(mark_of(self.file, key_node), dotted(loc), f"invalid key {key!r}"))
                continue
            if key in out:
                self.problems.append(Problem(mark_of(self.file, key_node), dotted(loc + (key,)), "duplicate key"))
                continue
            self.marks.keys[loc + (key,)] = mark_of(self.file, key_node)
            out[key] = self.build(value_node, loc + (key,))
        return out
