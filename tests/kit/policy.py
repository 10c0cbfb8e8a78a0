"""One way to write a test policy: Python values dumped as YAML, with the defaults most tests share.

Tests used to paste YAML into f-strings (doubled braces, indentation that must line up); building the
mapping and letting PyYAML write it keeps the structure checked by Python and the output valid YAML.
"""

from __future__ import annotations

from typing import Any

import yaml

UPSTREAM_KEY_REF = "${TEST_UPSTREAM_KEY}"
"""The upstream key as policies name it; conftest sets TEST_UPSTREAM_KEY for every test."""


def upstream_spec(
    url: str, provider: str = "openai", *, key: str | None = UPSTREAM_KEY_REF, **extra: Any
) -> dict[str, Any]:
    """An upstream at `url` (its root: `/v1` is appended), authenticated with the test upstream key."""
    spec: dict[str, Any] = {"provider": provider, "base_url": f"{url}/v1"}
    if key is not None:
        spec["api_key"] = key
    return {**spec, **extra}


def route_spec(
    name: str, upstream: str, *, model: str | list[str] | None = None, path: str | list[str] | None = None, **extra: Any
) -> dict[str, Any]:
    """A route to `upstream`, matching `model` and/or `path` when given (everything otherwise)."""
    spec: dict[str, Any] = {"name": name}
    match = {k: v for k, v in (("path", path), ("model", model)) if v is not None}
    if match:
        spec["match"] = match
    return {**spec, "upstream": upstream, **extra}


def build_policy(
    upstreams: dict[str, dict[str, Any]],
    routes: list[dict[str, Any]],
    *,
    tenants: dict[str, Any] | None = None,
    **top: Any,
) -> str:
    """A policy document: api-key identity and the tenant `alpha` (key sk-alpha) unless told otherwise.

    `top` adds top-level sections (timeouts, queues, state, max_buffered_response, ...), given as values
    or as YAML text (parsed, so a test can keep writing `"{first_token: 300ms}"`).
    """
    document: dict[str, Any] = {"identify": {"mode": "api_key"}, "upstreams": upstreams}
    document["tenants"] = tenants if tenants is not None else {"alpha": {"keys": ["sk-alpha"]}}
    for key, value in top.items():
        document[key] = yaml.safe_load(value) if isinstance(value, str) else value
    document["routes"] = routes
    return yaml.safe_dump(document, sort_keys=False)
