"""The base of every policy model: unknown keys refused, values frozen.

The docstring under each field is its description: proxy/policy/schema_docs.py reads it for the JSON
Schema (`signalbox schema`) and the generated field reference (docs/policy/reference.md).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
