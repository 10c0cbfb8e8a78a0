"""The policy format's field descriptions, read from the docstring under each field of the schema models.

pydantic's `use_attribute_docstrings` reads the same docstrings, but at import, re-parsing a module's
source for every class: some 80 ms of every start-up for text a serving proxy never shows. So the text
is read here, on demand and once per module, by the only two readers: `signalbox schema`
(`json_schema`) and the docs build's field reference (proxy/policy/reference.py).
"""

from __future__ import annotations

import ast
import functools
import inspect
import sys
import typing
from collections.abc import Iterator
from typing import Any, get_args, get_origin, get_type_hints

from pydantic import BaseModel

from proxy.policy.schema import Policy


@functools.cache
def _module_docs(module: str) -> dict[str, dict[str, str]]:
    """Class name -> field name -> the string literal right under the field's annotated assignment."""
    found: dict[str, dict[str, str]] = {}
    for node in ast.walk(ast.parse(inspect.getsource(sys.modules[module]))):
        if not isinstance(node, ast.ClassDef):
            continue
        docs = found.setdefault(node.name, {})
        for field, after in zip(node.body, node.body[1:], strict=False):
            if (
                isinstance(field, ast.AnnAssign)
                and isinstance(field.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[field.target.id] = inspect.cleandoc(after.value.value)
    return found


def field_docs(model: type[BaseModel]) -> dict[str, str]:
    """Each field's description: `Field(description=...)`, else its docstring (inherited ones included)."""
    merged: dict[str, str] = {}
    for klass in reversed(model.__mro__):
        if isinstance(klass, type) and issubclass(klass, BaseModel) and klass is not BaseModel:
            merged.update(_module_docs(klass.__module__).get(klass.__name__, {}))
    for name, field in model.model_fields.items():
        if field.description:
            merged[name] = field.description
    return {name: merged[name] for name in model.model_fields if name in merged}


def models(root: type[BaseModel] = Policy) -> dict[type[BaseModel], list[str]]:
    """Every model reachable from `root`, in reading order, with the YAML paths where it is used."""
    found: dict[type[BaseModel], list[str]] = {}

    def visit(model: type[BaseModel], path: str) -> None:
        seen = model in found
        found.setdefault(model, []).append(path)
        if seen:
            return
        for name, hint in get_type_hints(model, include_extras=True).items():
            if name in model.model_fields:
                for child, suffix in _nested(hint):
                    visit(child, f"{path}.{name}{suffix}".lstrip("."))

    visit(root, "")
    return found


def _nested(hint: Any, suffix: str = "") -> Iterator[tuple[type[BaseModel], str]]:
    origin = get_origin(hint)
    if isinstance(hint, type) and issubclass(hint, BaseModel):
        yield hint, suffix
    elif origin is list:
        yield from _nested(get_args(hint)[0], suffix + "[]")
    elif origin is dict:
        yield from _nested(get_args(hint)[1], suffix + ".NAME")
    elif origin in (typing.Union, typing.get_origin(int | None)):
        for arg in get_args(hint):
            yield from _nested(arg, suffix)


def json_schema(root: type[BaseModel] = Policy) -> dict[str, Any]:
    """The JSON Schema of the policy format (validation mode), every property with its description."""
    schema = root.model_json_schema(mode="validation")
    for model in models(root):
        target = schema if model is root else schema["$defs"][model.__name__]
        for name, text in field_docs(model).items():
            prop = target["properties"][name]
            kind = prop.get("description")  # a unit's own hint ("a duration: 250ms, 30s, ...") is kept after it
            prop["description"] = f"{text} ({kind})" if kind and kind != text else text
    return schema


def missing_descriptions(root: type[BaseModel] = Policy) -> list[str]:
    """Models and fields without a docstring: the reference and the JSON Schema would have a hole there."""
    holes: list[str] = []
    for model in models(root):
        if not model.__doc__ or model.__doc__ == BaseModel.__doc__:
            holes.append(model.__name__)
        described = field_docs(model)
        holes += [f"{model.__name__}.{name}" for name in model.model_fields if name not in described]
    return holes
