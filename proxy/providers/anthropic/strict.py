"""An Anthropic JSON schema (structured outputs, strict tools) as an OpenAI strict-mode schema (pure).

Anthropic's `output_config.format` and `tools[].strict` are enforced: the answer always validates
against the schema. OpenAI gives the same guarantee only with `"strict": true`, and strict mode accepts a
subset of JSON Schema: every object lists all its properties in `required` and has
`additionalProperties: false`, the root is an object, and only some keywords are allowed (OpenAI's
structured-outputs guide, "Supported schemas"; openai-python's `lib/_pydantic.py`
`to_strict_json_schema` makes the same two changes to a pydantic schema).

`strict_schema` returns a schema whose every valid instance is valid under the original, or None:
- it only tightens: an optional property becomes required (the model must then give it; a property
  whose schema admits null can still be null), an unset `additionalProperties` becomes false (which
  Anthropic imposes on every object anyway);
- it drops annotations that never make an instance invalid (`default`, `examples`, `$schema`,
  `$comment`, and the siblings of a `$ref`);
- anything else it cannot express faithfully gives None: the caller then sends the schema without
  `strict` (a hint on OpenAI; vLLM's guided decoding enforces it regardless). That covers a keyword
  outside the strict subset (`oneOf`, `not`, `if`, `minLength`, `patternProperties`…), a string format
  OpenAI does not list (`uri`), `allOf`, `additionalProperties` that is not false,
  a root that is not an object, and a schema past OpenAI's size limits.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

KEPT = frozenset({
    "type", "properties", "required", "additionalProperties", "items", "anyOf", "enum", "const",
    "description", "title", "$defs", "definitions", "$ref", "format", "pattern", "minimum", "maximum",
    "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "minItems", "maxItems",
})
"""Keywords OpenAI's strict mode accepts."""
DROPPED = frozenset({"default", "examples", "$schema", "$comment", "$id", "readOnly", "writeOnly", "deprecated"})
"""Annotations: they never make an instance invalid, so leaving them out changes no guarantee."""
FORMATS = frozenset({"date-time", "time", "date", "duration", "email", "hostname", "ipv4", "ipv6", "uuid"})
"""String formats OpenAI's strict mode lists."""
MAX_DEPTH = 10
"""Object nesting OpenAI's strict mode allows."""
MAX_PROPERTIES = 5000
"""Object properties in one strict schema, all objects together."""


class _NotStrict(Exception):
    pass


def strict_schema(schema: object) -> dict[str, Any] | None:
    """`schema` tightened into OpenAI's strict subset, or None when that cannot be done faithfully."""
    if not isinstance(schema, Mapping) or schema.get("type") != "object":
        return None
    counter = [0]
    try:
        return _node(schema, 0, counter)
    except _NotStrict:
        return None


def _node(schema: object, depth: int, counter: list[int]) -> dict[str, Any]:
    if not isinstance(schema, Mapping):
        raise _NotStrict
    if "$ref" in schema:
        return _ref(schema, depth, counter)
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in DROPPED:
            continue
        if key not in KEPT:
            raise _NotStrict
        out[key] = _keyword(key, value, depth, counter)
    if _is_object(out):
        _close(out)
    return out


def _ref(schema: Mapping[str, Any], depth: int, counter: list[int]) -> dict[str, Any]:
    """A `$ref` alone (OpenAI refuses siblings; the annotation ones are dropped, constraints are not)."""
    out: dict[str, Any] = {"$ref": schema["$ref"]}
    for key, value in schema.items():
        if key in ("$defs", "definitions"):
            out[key] = _keyword(key, value, depth, counter)
        elif key not in ("$ref", "description", "title") and key not in DROPPED:
            raise _NotStrict
    return out


def _keyword(key: str, value: Any, depth: int, counter: list[int]) -> Any:
    if key in ("$defs", "definitions"):
        if not isinstance(value, Mapping):
            raise _NotStrict
        return {name: _node(sub, depth, counter) for name, sub in value.items()}
    if key == "properties":
        if not isinstance(value, Mapping):
            raise _NotStrict
        counter[0] += len(value)
        if counter[0] > MAX_PROPERTIES or depth + 1 > MAX_DEPTH:
            raise _NotStrict
        return {name: _node(sub, depth + 1, counter) for name, sub in value.items()}
    if key == "items":
        return _node(value, depth, counter)
    if key == "anyOf":
        if not isinstance(value, list) or not value:
            raise _NotStrict
        return [_node(sub, depth, counter) for sub in value]
    if key == "additionalProperties" and value is not False:
        raise _NotStrict  # open objects cannot be strict (and Anthropic allows only false)
    if key == "format" and value not in FORMATS:
        raise _NotStrict
    return value


def _is_object(schema: Mapping[str, Any]) -> bool:
    kind = schema.get("type")
    return kind == "object" or (isinstance(kind, list) and "object" in kind) or "properties" in schema


def _close(schema: dict[str, Any]) -> None:
    """Every property required, no others allowed: tighter than the original, never looser."""
    properties = schema.setdefault("properties", {})
    required = schema.get("required")
    if required is not None and (not isinstance(required, list) or not set(required) <= set(properties)):
        raise _NotStrict  # a required name with no property: keep the schema as the client wrote it
    schema["required"] = list(properties)
    schema["additionalProperties"] = False
