"""Read policy YAML (a file or a directory of files) into a validated `Policy`, with `file:line` errors.

PyYAML's composer gives every node a position; we build plain data ourselves so that each value
and each key keeps its mark, merge the files, validate with pydantic, and translate every error
location back to the file, line and column a person must edit.
"""

from __future__ import annotations

import difflib
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from proxy.policy import reserve
from proxy.policy.schema import DEFAULT_AUTH_HEADER, Policy, Upstream
from proxy.policy.units import UnsetVariable, interpolate, split_userinfo

Loc = tuple[str | int, ...]
# The sections that are maps of named entries: several files may each add entries.
_MERGED_MAPS = ("upstreams", "tenants", "queues")


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


class PolicyError(Exception):
    """The policy set is invalid; `problems` lists every finding, each with its place."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class LoadedPolicy:
    policy: Policy
    files: tuple[str, ...]
    digest: str
    """sha256 over the files' bytes, in load order: the policy's source version."""


@dataclass(slots=True)
class _Marks:
    values: dict[Loc, Mark]
    keys: dict[Loc, Mark]


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
    marks = _Marks({}, {})
    merged: dict[str, Any] = {}
    digest = hashlib.sha256()
    for file in files:
        try:
            raw = file.read_bytes()
        except OSError as exc:
            problems.append(_unreadable(file, exc))
            continue
        digest.update(file.name.encode() + b"\0" + raw + b"\0")
        file_marks = _Marks({}, {})
        data = _parse_file(file, raw.decode("utf-8", errors="replace"), file_marks, problems, environ)
        if data is not None:
            _merge(data, file_marks, merged, marks, problems)
    try:
        policy = Policy.model_validate(merged)
    except ValidationError as exc:
        raise PolicyError(problems + _translate(exc, merged, marks)) from None
    problems += _cross_check(policy, marks)
    if not problems and not policy.routes:
        problems.append(_no_routes(path, files, marks))
    if problems:
        raise PolicyError(problems)
    return LoadedPolicy(policy, tuple(str(f) for f in files), digest.hexdigest())


def _unreadable(file: Path, exc: OSError) -> Problem:
    reason = exc.strerror or type(exc).__name__
    if file.is_symlink() and not file.exists():
        reason += " (a symlink to a missing file; a ConfigMap key being removed looks like this for a moment)"
    return Problem(Mark(str(file), 1, 1), "", f"cannot read this file: {reason}")


def _no_routes(path: Path, files: list[Path], marks: _Marks) -> Problem:
    """A set without routes refuses every request (401 or 404): never something to serve or hot-reload."""
    mark = marks.values.get(("routes",)) or (Mark(str(files[0]), 1, 1) if len(files) == 1 else None)
    where = "" if mark is not None else f"{path}: "
    return Problem(mark, "routes", f"{where}no routes: every request would be refused; define at least one route")


# --- YAML with marks ---------------------------------------------------------------------------


def _mark(file: Path, node: yaml.Node) -> Mark:
    return Mark(str(file), node.start_mark.line + 1, node.start_mark.column + 1)


def _parse_file(
    file: Path, text: str, marks: _Marks, problems: list[Problem], environ: Mapping[str, str] | None
) -> dict[str, Any] | None:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = Mark(str(file), mark.line + 1, mark.column + 1) if mark else None
        problems.append(Problem(where, "", f"YAML syntax error: {exc.problem}"))
        return None
    if root is None:  # nothing but comments and blank lines: a truncated save or an empty ConfigMap key
        message = "the file is empty (nothing but comments or blank lines): a policy file needs at least one section"
        problems.append(Problem(Mark(str(file), 1, 1), "", message))
        return None
    if not isinstance(root, yaml.MappingNode):
        problems.append(Problem(_mark(file, root), "", "a policy file must be a mapping of sections"))
        return None
    constructor = yaml.SafeLoader("")
    data = _build(file, root, (), marks, problems, constructor, environ)
    return data if isinstance(data, dict) else None


def _build(
    file: Path,
    node: yaml.Node,
    loc: Loc,
    marks: _Marks,
    problems: list[Problem],
    constructor: yaml.SafeLoader,
    environ: Mapping[str, str] | None,
) -> Any:
    marks.values[loc] = _mark(file, node)
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = constructor.construct_object(key_node, deep=True)
            if not isinstance(key, str | int) or isinstance(key, bool):
                problems.append(Problem(_mark(file, key_node), _dotted(loc), f"invalid key {key!r}"))
                continue
            if key in out:
                problems.append(Problem(_mark(file, key_node), _dotted(loc + (key,)), "duplicate key"))
                continue
            marks.keys[loc + (key,)] = _mark(file, key_node)
            out[key] = _build(file, value_node, loc + (key,), marks, problems, constructor, environ)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [
            _build(file, item, loc + (i,), marks, problems, constructor, environ)
            for i, item in enumerate(node.value)
        ]
    value = constructor.construct_object(node, deep=True)
    if isinstance(value, str):
        try:
            return interpolate(value, environ)
        except UnsetVariable as exc:
            problems.append(Problem(_mark(file, node), _dotted(loc), str(exc)))
            return value
    return value


def _merge(
    data: dict[str, Any], file_marks: _Marks, merged: dict[str, Any], marks: _Marks, problems: list[Problem]
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


# --- pydantic errors -> places --------------------------------------------------------------------


def _translate(exc: ValidationError, data: dict[str, Any], marks: _Marks) -> list[Problem]:
    problems: list[Problem] = []
    seen: set[tuple[Loc, str]] = set()
    for error in exc.errors(include_url=False):
        loc = _data_loc(tuple(error["loc"]), data)
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = _unknown_key_message(loc)
            mark = marks.keys.get(loc) or _nearest(marks.values, loc)
        elif error["type"] == "missing":
            mark = _nearest(marks.values, loc[:-1])
            message = f"required field '{loc[-1]}' is missing"
        else:
            mark = marks.values.get(loc) or _nearest(marks.values, loc)
        if (loc, message) in seen or any(seen_loc == loc for seen_loc, _ in seen):
            continue  # a union reports each branch; the first message says enough
        seen.add((loc, message))
        problems.append(Problem(mark, _dotted(loc), message))
    return problems


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


def _nearest(table: dict[Loc, Mark], loc: Loc) -> Mark | None:
    while loc:
        if loc in table:
            return table[loc]
        loc = loc[:-1]
    return table.get(())


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


def _dotted(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# --- references between sections -----------------------------------------------------------------


def _cross_check(policy: Policy, marks: _Marks) -> list[Problem]:
    problems: list[Problem] = []

    def add(loc: Loc, message: str) -> None:
        problems.append(Problem(marks.values.get(loc) or _nearest(marks.values, loc), _dotted(loc), message))

    names: dict[str, int] = {}
    for i, route in enumerate(policy.routes):
        if route.name in names:
            first = names[route.name]
            add(("routes", i, "name"), f"duplicate route name '{route.name}' (first used by routes[{first}])")
        names.setdefault(route.name, i)
        if route.deployments is None and route.upstream not in policy.upstreams:
            add(("routes", i, "upstream"), _undefined("upstream", route.upstream, policy.upstreams))
        for j, deployment in enumerate(route.deployments or ()):
            if deployment.upstream not in policy.upstreams:
                loc = ("routes", i, "deployments", j, "upstream")
                add(loc, _undefined("upstream", deployment.upstream, policy.upstreams))
        for j, tenant in enumerate(route.match.tenants or ()):
            if tenant not in policy.tenants:
                add(("routes", i, "match", "tenants", j), _undefined("tenant", tenant, policy.tenants))
        if route.queue is not None and route.queue not in policy.queues:
            add(("routes", i, "queue"), _undefined("queue", route.queue, policy.queues))
    for i, route in enumerate(policy.routes):
        for j, fallback in enumerate(route.fallbacks):
            if fallback not in names:
                add(("routes", i, "fallbacks", j), _undefined("route", fallback, names))
    classes = policy.priorities
    for name, rule in policy.tenants.items():
        for key in ("priority", "max_priority"):
            value = getattr(rule, key)
            if value is not None and value not in classes:
                add(("tenants", name, key), f"unknown priority class '{value}' (priorities: {', '.join(classes)})")
        own, top = rule.priority, rule.max_priority
        if own in classes and top in classes and classes.index(top) > classes.index(own):
            add(("tenants", name, "max_priority"), f"'{top}' is below the tenant's own priority '{own}'")
    reserve.check(policy, add)
    for name, upstream in policy.upstreams.items():
        conflict = _second_authorization(upstream)
        if conflict:
            add(("upstreams", name, "base_url"), conflict)
    ident = policy.identify
    if ident.tenant is not None and ident.tenant not in policy.tenants:
        add(("identify", "tenant"), _undefined("tenant", ident.tenant, policy.tenants))
    owners: dict[str, str] = {}
    for name, rule in policy.tenants.items():
        for j, tenant_key in enumerate(rule.keys):
            secret = tenant_key.get_secret_value()
            if secret in owners:
                add(("tenants", name, "keys", j), f"this key is also a key of tenant '{owners[secret]}'")
            owners.setdefault(secret, name)
    return problems


def _second_authorization(upstream: Upstream) -> str | None:
    """base_url's `user:password@` is sent as `Authorization: Basic`; a second Authorization is ambiguous."""
    if upstream.base_url is None or split_userinfo(upstream.base_url)[1] is None:
        return None
    basic = "base_url carries credentials (user:password@, sent as Authorization: Basic)"
    key_header = upstream.auth_header or DEFAULT_AUTH_HEADER[upstream.provider]
    if upstream.api_key is not None and key_header == "authorization":
        return (
            f"{basic} and api_key is sent in the Authorization header too: keep one, or send the key in "
            "another header (auth_header: api-key or x-api-key)"
        )
    if any(header.lower() == "authorization" for header in upstream.headers):
        return f"{basic} and headers sets Authorization too: keep one"
    return None


def _undefined(kind: str, name: str, defined: Mapping[str, object]) -> str:
    hint = difflib.get_close_matches(name, list(defined), n=1, cutoff=0.6)
    if hint:
        return f"undefined {kind} '{name}'; did you mean '{hint[0]}'?"
    known = ", ".join(sorted(defined)) or "none defined"
    return f"undefined {kind} '{name}' (defined: {known})"
