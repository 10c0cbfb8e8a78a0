"""The mock's structured output: the value it makes for a JSON Schema validates against that schema (checked
with the jsonschema library), the same request always gets the same value, and tool arguments fit their
tool's parameters."""

from __future__ import annotations

from datetime import date, datetime
from enum import StrEnum
from typing import Any, Literal
from uuid import UUID

import jsonschema
import pytest
from pydantic import BaseModel, Field

from proxy.mock.content import InvalidRequest, OutputFormat, answer_text, format_from, tool_arguments
from proxy.mock.structured import schema_value


class Colour(StrEnum):
    RED = "red"
    BLUE = "blue"


class Address(BaseModel):
    street: str
    city: str = Field(min_length=12)
    postcode: str | None = None


class Person(BaseModel):
    name: str = Field(max_length=3)
    age: int = Field(ge=18, le=20)
    score: float = Field(gt=0.5, multiple_of=0.25)
    colour: Colour
    kind: Literal["admin"]
    born: date
    seen: datetime
    id: UUID
    home: Address
    others: list[Address] = Field(min_length=2, max_length=3)
    tags: set[str]


class Tree(BaseModel):
    label: str
    children: list[Tree] = []


SCHEMAS: dict[str, Any] = {
    "pydantic-nested-defs": Person.model_json_schema(),
    "pydantic-recursive": Tree.model_json_schema(),
    "openai-strict-style": {
        "type": "object",
        "properties": {
            "steps": {"type": "array", "items": {"$ref": "#/$defs/step"}},
            "final": {"type": ["string", "null"]},
        },
        "required": ["steps", "final"],
        "additionalProperties": False,
        "$defs": {
            "step": {
                "type": "object",
                "properties": {"explanation": {"type": "string"}, "output": {"type": "integer"}},
                "required": ["explanation", "output"],
                "additionalProperties": False,
            }
        },
    },
    "any-of-and-all-of": {
        "type": "object",
        "properties": {
            "either": {"anyOf": [{"type": "null"}, {"type": "integer", "minimum": 5}]},
            "one": {"oneOf": [{"type": "string", "format": "email"}, {"type": "integer"}]},
            "both": {"allOf": [{"$ref": "#/definitions/base"}, {"properties": {"extra": {"type": "boolean"}},
                                                                "required": ["extra"]}]},
        },
        "required": ["either", "one", "both"],
        "definitions": {"base": {"type": "object", "properties": {"id": {"type": "string", "format": "uri"}},
                                 "required": ["id"]}},
    },
    "array-root-with-prefix": {"type": "array", "prefixItems": [{"const": 1}, {"enum": ["x", "y"]}],
                               "minItems": 2, "items": False},
    "bounded-numbers": {"type": "object", "properties": {
        "n": {"type": "integer", "exclusiveMinimum": 10, "multipleOf": 7},
        "x": {"type": "number", "maximum": -3},
        "ip": {"type": "string", "format": "ipv4"},
    }, "required": ["n", "x", "ip"]},
}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_the_value_validates_against_its_schema(name: str) -> None:
    schema = SCHEMAS[name]
    value = schema_value(schema, ["what", "is", "the", "weather"])
    jsonschema.validate(value, schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    assert schema_value(schema, ["what", "is", "the", "weather"]) == value  # deterministic


def test_pydantic_parses_what_the_mock_makes_for_its_schema() -> None:
    person = Person.model_validate(schema_value(Person.model_json_schema(), ["hi"]))
    assert person.kind == "admin" and person.colour is Colour.RED and 18 <= person.age <= 20
    assert 2 <= len(person.others) <= 3 and len(person.home.city) >= 12


def test_tool_arguments_fit_nested_parameters() -> None:
    params = {"type": "object", "properties": {"filters": {"type": "array", "minItems": 1, "items": {
        "type": "object", "properties": {"field": {"enum": ["a", "b"]}, "value": {"type": "number"}},
        "required": ["field", "value"]}}}, "required": ["filters"]}
    args = tool_arguments(params, "find the cheapest")
    jsonschema.validate(args, params)
    assert args["filters"][0]["field"] == "a"


def test_output_formats_of_each_protocol() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    chat = format_from({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}, "response_format",
                       nested_schema=True)
    flat = format_from({"type": "json_schema", "name": "x", "schema": schema}, "text.format", nested_schema=False)
    assert chat == flat == OutputFormat("json_schema", schema)
    assert format_from({"type": "text"}, "response_format", nested_schema=True) is None
    # The schema is optional in the API: without one, any JSON object will do.
    assert format_from({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format",
                       nested_schema=True) == OutputFormat("json_object")
    with pytest.raises(InvalidRequest, match="response_format.json_schema' is required"):
        format_from({"type": "json_schema"}, "response_format", nested_schema=True)
    with pytest.raises(InvalidRequest, match="must be 'text'"):
        format_from({"type": "yaml"}, "response_format", nested_schema=True)


@pytest.mark.parametrize("n", [1, 3, 40])
def test_structured_answers_split_into_pieces_that_join_to_json(n: int) -> None:
    import json

    pieces = answer_text("hello there", n, OutputFormat("json_object"))
    assert len(pieces) <= n and all(pieces)
    assert isinstance(json.loads("".join(pieces)), dict)
