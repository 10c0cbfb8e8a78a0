"""What the loader reports: a problem with its place (file, line, column) and the data path to it."""

from __future__ import annotations

from dataclasses import dataclass

Loc = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class Mark:
    file: str
    line: int
    column: int


@dataclass(frozen=True, slots=True)
class Problem:
    mark: Mark | None
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.mark.file}:{self.mark.line}:{self.mark.column}: " if self.mark else ""
        return f"{where}{self.path or '(top)'}: {self.message}"

    def sort_key(self) -> tuple[str, int, int]:
        """By file, then line and column; problems without a place come first."""
        return (self.mark.file, self.mark.line, self.mark.column) if self.mark else ("", 0, 0)


class PolicyError(Exception):
    """The policy set is invalid; `problems` lists every finding, each with its place."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


@dataclass(slots=True)
class Marks:
    """Where each value and each key of the merged data came from, by data path."""

    values: dict[Loc, Mark]
    keys: dict[Loc, Mark]

    def at(self, loc: Loc) -> Mark | None:
        """The value's own mark, else the nearest enclosing one."""
        return self.values.get(loc) or nearest(self.values, loc)


def nearest(table: dict[Loc, Mark], loc: Loc) -> Mark | None:
    while loc:
        if loc in table:
            return table[loc]
        loc = loc[:-1]
    return table.get(())


def dotted(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out
