"""Anthropic schemas into OpenAI strict mode (pure): tightened only, annotations dropped, and None where strict
mode cannot say the same thing; a property test checks that every instance of the strict schema is valid
under the original (the guarantee an Anthropic client asked for survives)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.providers.anthropic.strict import MAX_DEPTH, strict_schema

PYDANTIC_LIKE: dict[str, Any] = {
    "$defs": {"Address": {"type": "object", "title": "Address",
                          "properties": {"city": {"type": "string", "title": "City"}}, "required": ["city"],
                          "additionalProperties": False}},
    "type": "object",
    "title": "Person",
    "properties": {
        "name": {"type": "string", "description": "full name"},
        "age": {"anyOf": [{"type": "integer", "minimum": 0}, {"type": "null"}], "default": None},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}, "minItems": 1},
        "home": {"$ref": "#/$defs/Address", "description": "where they live"},
        "born": {"type": "string", "format": "date"},
    },
    "required": ["name", "tags"],
    "additionalProperties": False,
}


def test_a_pydantic_style_schema_is_tightened_and_annotations_dropped() -> None:
    out = strict_schema(PYDANTIC_LIKE)
    assert out is not None
    assert out["required"] == ["name", "age", "tags", "home", "born"]
    assert out["additionalProperties"] is False
    assert "default" not in out["properties"]["age"]
    assert out["properties"]["home"] == {"$ref": "#/$defs/Address"}
    assert out["$defs"]["Address"]["required"] == ["city"]
    assert PYDANTIC_LIKE["required"] == ["name", "tags"]  # the input is not changed


def test_an_object_without_additional_properties_is_closed() -> None:
    out = strict_schema({"type": "object", "properties": {"x": {"type": "object", "properties": {}}}})
    assert out == {"type": "object", "additionalProperties": False, "required": ["x"],
                   "properties": {"x": {"type": "object", "properties": {}, "required": [],
                                        "additionalProperties": False}}}


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "array", "items": {"type": "string"}},  # the root must be an object
        {"type": "object", "properties": {"a": {"type": "string", "minLength": 3}}},
        {"type": "object", "properties": {"a": {"oneOf": [{"type": "string"}, {"type": "integer"}]}}},
        {"type": "object", "properties": {"a": {"type": "string", "format": "uri"}}},
        {"type": "object", "additionalProperties": True},
        {"type": "object", "additionalProperties": {"type": "string"}},
        {"type": "object", "properties": {"a": {"allOf": [{"type": "string"}]}}},
        {"type": "object", "properties": {"a": {"$ref": "#/$defs/A", "minLength": 1}}},
        {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["b"]},
        {"type": "object", "patternProperties": {"^x": {"type": "string"}}},
    ],
)
def test_what_strict_mode_cannot_express_faithfully_gives_none(schema: dict[str, Any]) -> None:
    assert strict_schema(schema) is None


def test_nesting_past_openais_limit_gives_none() -> None:
    def nested(depth: int) -> dict[str, Any]:
        node: dict[str, Any] = {"type": "string"}
        for _ in range(depth):
            node = {"type": "object", "properties": {"x": node}}
        return node

    assert strict_schema(nested(MAX_DEPTH)) is not None
    assert strict_schema(nested(MAX_DEPTH + 1)) is None


# --- property: the strict schema accepts nothing the original refuses ---------------------------------

LEAVES = st.sampled_from([{"type": "string"}, {"type": "integer"}, {"type": "boolean"},
                          {"anyOf": [{"type": "string"}, {"type": "null"}]}, {"enum": ["a", "b"]}])


def _objects(children: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        props = draw(st.dictionaries(st.sampled_from("abcd"), children, max_size=4))
        required = draw(st.lists(st.sampled_from(sorted(props)), unique=True)) if props else []
        node: dict[str, Any] = {"type": "object", "properties": props, "required": required}
        if draw(st.booleans()):
            node["additionalProperties"] = False
        return node

    return build()


SCHEMAS = _objects(st.recursive(LEAVES, _objects, max_leaves=8))


def _valid(instance: Any, schema: dict[str, Any]) -> bool:
    """A small validator for the keywords the strategy uses (enough to compare the two schemas)."""
    if "anyOf" in schema:
        return any(_valid(instance, s) for s in schema["anyOf"])
    if "enum" in schema:
        return instance in schema["enum"]
    kind = schema.get("type")
    if kind == "string":
        return isinstance(instance, str)
    if kind == "integer":
        return isinstance(instance, int) and not isinstance(instance, bool)
    if kind == "boolean":
        return isinstance(instance, bool)
    if kind == "null":
        return instance is None
    if not isinstance(instance, dict):
        return False
    props = schema.get("properties", {})
    if any(name not in instance for name in schema.get("required", [])):
        return False
    if schema.get("additionalProperties") is False and any(k not in props for k in instance):
        return False
    return all(_valid(v, props[k]) for k, v in instance.items() if k in props)


INSTANCES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.sampled_from(["a", "b", "zz"])),
    lambda inner: st.dictionaries(st.sampled_from("abcde"), inner, max_size=5),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(schema=SCHEMAS, instance=INSTANCES)
def test_every_instance_the_strict_schema_accepts_the_original_accepts(schema: dict[str, Any], instance: Any) -> None:
    strict = strict_schema(schema)
    assert strict is not None  # this subset always has a strict form
    if _valid(instance, strict):
        assert _valid(instance, schema)


# --- which request-id headers an answer carries (pure; proxy/upstream/headers.py) --------------------------


@pytest.mark.parametrize(
    ("protocol", "upstream", "hide", "expected"),
    [
        ("anthropic", [("request-id", "req_up")], None, {"request-id": "ours", "x-upstream-request-id": "req_up"}),
        ("anthropic", [("x-request-id", "up-1")], None, {"request-id": "ours", "x-upstream-request-id": "up-1"}),
        ("openai", [("request-id", "req_up")], None, {"request-id": None, "x-upstream-request-id": "req_up"}),
        ("openai", [("x-request-id", "up-1")], None, {"request-id": None, "x-upstream-request-id": "up-1"}),
        ("anthropic", [("request-id", "req_up")], ("request-id",),
         {"request-id": "ours", "x-upstream-request-id": None}),
    ],
)
def test_the_client_sees_its_protocols_id_header_and_the_upstreams_id_beside_it(
    protocol: str, upstream: list[tuple[str, str]], hide: tuple[str, ...] | None, expected: dict[str, str | None]
) -> None:
    from proxy.policy.plan import Matcher
    from proxy.upstream.headers import client_headers

    out = client_headers(upstream, request_id="ours", route="r", upstream_name="u",
                         hide=Matcher(hide) if hide else None, protocol=protocol)
    assert out["x-request-id"] == "ours"
    assert {name: out.get(name) for name in expected} == expected
    assert len(out.getall("request-id", [])) <= 1
