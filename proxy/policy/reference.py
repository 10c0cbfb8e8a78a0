"""The policy format's field reference as Markdown, rendered from the pydantic models.

Every word of the descriptions is the docstring of a model or of a field in the schema modules
(read by proxy/policy/schema_docs.py), so the
reference cannot drift from what `signalbox validate` accepts. The docs build renders it on every build
(docs/hooks/policy_reference.py); nothing generated is committed. Hand-written rather than a mkdocs
plugin: the plugins render JSON Schema, which has lost the duration and size types and the YAML paths.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Literal, get_args, get_origin, get_type_hints

from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo

from proxy.policy.schema import Policy
from proxy.policy.schema_docs import field_docs, models
from proxy.policy.units import ByteSize, Duration, Percent

_SCALARS: dict[object, str] = {
    Duration: "duration", ByteSize: "size", Percent: "percent", str: "string", int: "integer",
    float: "number", bool: "boolean", SecretStr: "secret string",
}
_BOUNDS = (("ge", "≥ {}"), ("gt", "> {}"), ("le", "≤ {}"), ("lt", "< {}"), ("min_length", "at least {} item(s)"))


def type_name(hint: Any) -> str:
    """A field's type in words, with models linked to their section; `None` is left to the default."""
    if hint in _SCALARS:
        return _SCALARS[hint]
    if isinstance(hint, type) and issubclass(hint, BaseModel):
        return f"[{hint.__name__}](#{hint.__name__.lower()})"
    origin, args = get_origin(hint), get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(f"`{arg}`" for arg in args)
    if origin is list:
        return f"list of {type_name(args[0])}"
    if origin is dict:
        return f"map of name to {type_name(args[1])}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(arg) for arg in args if arg is not type(None))
    return str(getattr(hint, "__name__", hint))


def default_text(hint: Any, field: FieldInfo, required: bool) -> str:
    """The default as it would be written in YAML; `required` per the published JSON Schema."""
    if required:
        return "required"
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
    elif field.is_required():
        return "see the description"
    else:
        value = field.default
    return _yaml(value, hint)


def _yaml(value: object, hint: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, BaseModel):
        return "its defaults"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, (list, dict)):
        return f"`{value!r}`".replace("'", "") if value else ("`[]`" if isinstance(value, list) else "`{}`")
    if Duration in (hint, *get_args(hint)) and isinstance(value, (int, float)):
        return f"`{_duration(float(value))}`"
    if ByteSize in (hint, *get_args(hint)) and isinstance(value, int):
        return f"`{_size(value)}`"
    return f"`{value}`"


def _duration(seconds: float) -> str:
    for unit, size in (("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds * 1000:g}ms" if seconds else "0s"


def _size(size: int) -> str:
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def bounds(field: FieldInfo) -> str:
    """The numeric and length bounds pydantic enforces, in words."""
    parts = [
        template.format(getattr(item, attribute))
        for item in field.metadata
        for attribute, template in _BOUNDS
        if getattr(item, attribute, None) is not None
    ]
    return "; ".join(parts)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _section(model: type[BaseModel], paths: list[str]) -> list[str]:
    hints = get_type_hints(model, include_extras=True)
    docs = field_docs(model)
    required = set(model.model_json_schema().get("required", ()))
    where = ", ".join(f"`{path}`" for path in paths) if paths != [""] else "the top level of a policy file"
    lines = [f"## {model.__name__}", "", _cell(model.__doc__ or ""), "", f"Used at: {where}.", ""]
    lines += ["| field | type | default | description |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        kind = type_name(hints[name])
        limit = bounds(field)
        kind = f"{kind} ({limit})" if limit else kind
        default = default_text(hints[name], field, name in required)
        lines.append(f"| `{name}` | {_cell(kind)} | {_cell(default)} | {_cell(docs.get(name, ''))} |")
    return [*lines, ""]


def render(root: type[BaseModel] = Policy) -> str:
    """The whole reference page."""
    lines = [
        "# Policy field reference",
        "",
        "Every model and field of the policy format, generated from the schema's docstrings",
        "(`proxy/policy/schema*.py`) at each docs build; edit the docstrings, not this page. The guide",
        "pages say how the fields work together. Durations are written `250ms`, `30s`, `5m`, `1h` or a bare",
        "number of seconds; sizes `512KiB`, `32MiB`, `1GB` or a bare number of bytes; percents `20%` or `20`.",
        "",
    ]
    for model, paths in models(root).items():
        lines += _section(model, paths)
    return "\n".join(lines)
