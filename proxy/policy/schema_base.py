"""The base of every policy model: unknown keys refused, values frozen, field docstrings as descriptions.

`use_attribute_docstrings` makes the docstring under each field its description, so the JSON Schema
(`signalbox schema`) and the generated field reference (docs/policy/reference.md) read the same text.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, use_attribute_docstrings=True)
