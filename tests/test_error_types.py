"""One status → Anthropic error type table for every error the proxy writes in Anthropic's shape: its own
refusals (proxy/errors.py) and an OpenAI-compatible upstream's error translated for an Anthropic client
(proxy/providers/errors_map.py) agree, and follow Anthropic's documented table (529 alone is overloaded)."""

from __future__ import annotations

import pytest

from proxy.errors import ProxyError
from proxy.providers.errors_map import openai_error_to_anthropic

DOCUMENTED = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


def _proxy_type(status: int) -> str:
    error = type("E", (ProxyError,), {"status": status})("x")
    body = error.anthropic_body("req")["error"]
    assert isinstance(body, dict)
    return str(body["type"])


def _translated_type(status: int) -> str:
    _, body = openai_error_to_anthropic(status, {"error": {"message": "x"}})
    return str(body["error"]["type"])


@pytest.mark.parametrize("status", sorted({*range(400, 432), *range(500, 505), 529}))
def test_the_proxy_and_the_translation_name_every_status_alike(status: int) -> None:
    assert _proxy_type(status) == _translated_type(status)


@pytest.mark.parametrize(("status", "kind"), sorted(DOCUMENTED.items()))
def test_the_documented_statuses(status: int, kind: str) -> None:
    assert _proxy_type(status) == kind == _translated_type(status)


def test_a_503_is_an_api_error_not_overloaded() -> None:
    """Anthropic reserves overloaded_error for 529; the SDK picks its exception by status either way."""
    assert _proxy_type(503) == _translated_type(503) == "api_error"
