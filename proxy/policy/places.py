"""pydantic's validation errors translated back to the place a person must edit: the value's (or, for an
unknown key, the key's) file, line and column, with a did-you-mean for misspelt keys."""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ValidationError

from proxy.policy.problems import Loc, Marks, Problem, dotted, nearest
from proxy.policy.schema import Policy


def translate(exc: ValidationError, data: dict[str, Any], marks: Marks) -> tuple[list[Problem], list[Loc]]:
    """Each pydantic error as a problem at its value (or key); also the data path of every error."""
    problems: list[Problem] = []
    locs: list[Loc] = []
    seen: set[tuple[Loc, str]] = set()
    for error in exc.errors(include_url=False):
        loc = _data_loc(tuple(error["loc"]), data)
        locs.append(loc)
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = _unknown_key_message(loc)
            mark = marks.keys.get(loc) or nearest(marks.values, loc)
        elif error["type"] == "missing":
            mark = nearest(marks.values, loc[:-1])
            message = f"required field '{loc[-1]}' is missing"
        else:
            mark = marks.values.get(loc) or nearest(marks.values, loc)
        if (loc, message) in seen or any(seen_loc == loc for seen_loc, _ in seen):
            continue  # a union reports each branch; the first message says enough
        seen.add((loc, message))
        problems.append(Problem(mark, dotted(loc), message))
    return problems, locs


def _data_loc(loc: Loc, data: Any) -> Loc:
    """Drop pydantic's union-branch tags (`str`, `list[str]`…) that are not part of the data path."""
    out: list[str | int] = []
    node = data
    for part in loc:
        if isinstance(node, dict) and part in node:
            out.append(part)
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            out.append(part)
            node = node[part]
        elif isinstance(part, str) and ("[" in part or part in _BRANCH_TAGS):
            continue
        else:
            out.append(part)
            node = None
    return tuple(out)


_BRANCH_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "literal"}


def _unknown_key_message(loc: Loc) -> str:
    key = str(loc[-1])
    fields = _fields_at(Policy, loc[:-1])
    hint = difflib.get_close_matches(key, fields, n=1, cutoff=0.6)
    allowed = ", ".join(sorted(fields))
    if hint:
        return f"unknown key '{key}'; did you mean '{hint[0]}'?"
    return f"unknown key '{key}'; expected one of: {allowed}"


def _fields_at(model: type[BaseModel], loc: Loc) -> list[str]:
    """Walk the schema along a data path to find which keys are valid there."""
    current: Any = model
    for part in loc:
        current = _unwrap(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(part))
            if field is None:
                return []
            current = field.annotation
        else:
            args = getattr(current, "__args__", ())
            current = args[-1] if args else None
    current = _unwrap(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _unwrap(tp: Any) -> Any:
    """`Model | None` -> Model; `list[Model]`/`dict[str, Model]` are handled by the caller's walk."""
    args = getattr(tp, "__args__", None)
    origin = getattr(tp, "__origin__", None)
    if args and origin is None:  # a `X | None` union
        models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        if models:
            return models[0]
    return tp
