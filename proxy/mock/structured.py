"""Deterministic values for a JSON Schema: the mock's structured output (`response_format`, Responses
`text.format`, Anthropic `output_config.format`) and its tool-call arguments.

Hand-written because no maintained library generates *one* deterministic instance: hypothesis-jsonschema
draws random examples (and pulls hypothesis into the runtime), and the faker-based generators are
random too. The value is built from the schema alone plus the prompt's words, so the same request
always yields the same answer. Covered: objects (every property, required or not), arrays (min/max
items, prefixItems), enum/const, anyOf/oneOf/allOf, local `$ref` (`#/$defs/…`, `#/definitions/…`),
numbers within their bounds and multipleOf, strings with common formats and length bounds. Not
covered: `pattern` (a string of words is returned) and `not`.
"""

from __future__ import annotations

import uuid
from typing import Any

Json = dict[str, Any]
MAX_DEPTH = 8
"""A recursive schema (a tree of $ref nodes) stops here: only required properties, then no items."""

_FORMATS = {
    "date-time": "2025-01-01T00:00:00Z",
    "date": "2025-01-01",
    "time": "00:00:00Z",
    "email": "mock@example.com",
    "idn-email": "mock@example.com",
    "uri": "https://example.com/mock",
    "url": "https://example.com/mock",
    "uri-reference": "/mock",
    "hostname": "example.com",
    "ipv4": "127.0.0.1",
    "ipv6": "::1",
    "duration": "PT1S",
}


class SchemaValue:
    """Builds one value for `schema`; `root` resolves `$ref`s, `words` feed the strings."""

    def __init__(self, root: Any, words: list[str]) -> None:
        self.root = root if isinstance(root, dict) else {}
        self.words = words or ["mock"]

    def value(self, schema: Any, index: int = 0, depth: int = 0) -> Any:
        if not isinstance(schema, dict):
            return self.words[index % len(self.words)]  # `true` / `{}`: anything goes
        schema = self._resolved(schema, depth)
        if "const" in schema:
            return schema["const"]
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            return schema["enum"][0]
        for key in ("anyOf", "oneOf"):
            branches = schema.get(key)
            if isinstance(branches, list) and branches:
                return self.value(_first_not_null(branches, self.root), index, depth + 1)
        if isinstance(schema.get("allOf"), list):
            return self.value(_merged(schema, self.root), index, depth + 1)
        kind = _kind(schema)
        if kind == "object":
            return self._object(schema, depth)
        if kind == "array":
            return self._array(schema, depth)
        if kind in ("integer", "number"):
            return _number(schema, index, kind == "integer")
        if kind == "boolean":
            return True
        if kind == "null":
            return None
        return self._string(schema, index)

    def _resolved(self, schema: Json, depth: int) -> Json:
        ref = schema.get("$ref")
        if not isinstance(ref, str) or depth > MAX_DEPTH * 4:
            return schema
        target = _pointer(self.root, ref)
        rest = {k: v for k, v in schema.items() if k != "$ref"}
        return {**target, **rest} if isinstance(target, dict) else rest

    def _object(self, schema: Json, depth: int) -> Json:
        props = schema.get("properties")
        props = props if isinstance(props, dict) else {}
        required = schema.get("required")
        required = set(required) if isinstance(required, list) else set()
        out: Json = {}
        for i, (name, spec) in enumerate(props.items()):
            if depth < MAX_DEPTH or name in required:
                out[name] = self.value(spec, i, depth + 1)
        for name in sorted(required - set(out)):  # required but not described: any value will do
            out[name] = self.words[len(out) % len(self.words)]
        return out

    def _array(self, schema: Json, depth: int) -> list[Any]:
        prefix = schema.get("prefixItems")
        prefix = prefix if isinstance(prefix, list) else []
        low = _int(schema.get("minItems"), 0)
        high = _int(schema.get("maxItems"), max(low, len(prefix), 1))
        wanted = low if depth >= MAX_DEPTH else max(low, min(high, max(len(prefix), 1)))
        items = schema.get("items", {})
        out = [self.value(prefix[i] if i < len(prefix) else items, i, depth + 1) for i in range(wanted)]
        return out if items is not False else out[: len(prefix)]

    def _string(self, schema: Json, index: int) -> str:
        fmt = schema.get("format")
        if fmt == "uuid":
            text = str(uuid.uuid5(uuid.NAMESPACE_URL, f"signalbox-mock/{index}"))
        elif isinstance(fmt, str) and fmt in _FORMATS:
            text = _FORMATS[fmt]
        else:
            text = self.words[index % len(self.words)]
        low = _int(schema.get("minLength"), 0)
        high = _int(schema.get("maxLength"), max(low, len(text)))
        if len(text) < low:
            text += "x" * (low - len(text))
        return text[:high]


def schema_value(schema: Any, words: list[str]) -> Any:
    """One deterministic value that validates against `schema` (within the coverage above)."""
    return SchemaValue(schema, words).value(schema)


def _kind(schema: Json) -> str | None:
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), kind[0] if kind else None)
    if isinstance(kind, str):
        return kind
    if "properties" in schema or "required" in schema:
        return "object"
    if "items" in schema or "prefixItems" in schema:
        return "array"
    return None


def _first_not_null(branches: list[Any], root: Json) -> Any:
    for branch in branches:
        target = _pointer(root, branch["$ref"]) if isinstance(branch, dict) and "$ref" in branch else branch
        if not (isinstance(target, dict) and target.get("type") == "null"):
            return branch
    return branches[0]


def _merged(schema: Json, root: Json) -> Json:
    """allOf as one schema: the branches' keys (properties and required combined), then the schema's own."""
    out: Json = {"properties": {}, "required": []}
    for branch in schema["allOf"]:
        if isinstance(branch, dict) and isinstance(branch.get("$ref"), str):
            branch = _pointer(root, branch["$ref"])
        if not isinstance(branch, dict):
            continue
        out.update({k: v for k, v in branch.items() if k not in ("properties", "required")})
        out["properties"].update(branch.get("properties") or {})
        out["required"] += list(branch.get("required") or [])
    own = {k: v for k, v in schema.items() if k not in ("allOf", "properties", "required")}
    out.update(own)
    out["properties"].update(schema.get("properties") or {})
    out["required"] += list(schema.get("required") or [])
    if not out["properties"]:
        del out["properties"]
    return out


def _pointer(root: Any, ref: str) -> Any:
    """A local JSON pointer (`#/$defs/Name`); anything else resolves to `{}` (any value)."""
    if not ref.startswith("#"):
        return {}
    node = root
    for part in [p for p in ref[1:].split("/") if p]:
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return {}
    return node


def _int(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else default


def _number(schema: Json, index: int, integer: bool) -> int | float:
    """index + 1 (or + 0.5) moved inside [minimum, maximum] and onto multipleOf where there is room."""
    value: float = index + 1 if integer else index + 0.5
    low, high = schema.get("minimum"), schema.get("maximum")
    ex_low, ex_high = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
    step = 1 if integer else 0.5
    if isinstance(ex_low, int | float) and not isinstance(ex_low, bool):
        value = max(value, ex_low + step)
    if isinstance(low, int | float) and not isinstance(low, bool):
        value = max(value, low)
    if isinstance(ex_high, int | float) and not isinstance(ex_high, bool):
        value = min(value, ex_high - step)
    if isinstance(high, int | float) and not isinstance(high, bool):
        value = min(value, high)
    multiple = schema.get("multipleOf")
    if isinstance(multiple, int | float) and not isinstance(multiple, bool) and multiple > 0:
        value = (-(-value // multiple)) * multiple  # the next multiple up
        if isinstance(high, int | float) and value > high:
            value -= multiple
    if integer:
        return int(value)
    return float(value)
