"""Error bodies mapped between the two protocols (proxy/providers/errors_map.py).

Checked with the official SDKs' own SSE decoders, pydantic models and stream accumulators, and end to end
through the SDK clients over an in-memory httpx2 transport (no sockets)."""

from __future__ import annotations

from typing import Any

import anthropic
import openai
import orjson
import pytest
from anthropic_translation import (
    anthropic_client,
    chunk,
    openai_client,
)

from proxy.providers.errors_map import (
    anthropic_error_to_openai,
    normalise_openai_compatible_error,
    normalise_stream_error,
    openai_error_to_anthropic,
)

# ======================================================================================== 3. error mapping


@pytest.mark.parametrize(
    ("status", "anthropic_type", "openai_type", "sdk_error"),
    [
        (400, "invalid_request_error", "invalid_request_error", openai.BadRequestError),
        (401, "authentication_error", "authentication_error", openai.AuthenticationError),
        (403, "permission_error", "permission_error", openai.PermissionDeniedError),
        (404, "not_found_error", "not_found_error", openai.NotFoundError),
        (413, "request_too_large", "request_too_large", openai.APIStatusError),
        (429, "rate_limit_error", "rate_limit_error", openai.RateLimitError),
        (500, "api_error", "server_error", openai.InternalServerError),
        (529, "overloaded_error", "server_error", openai.InternalServerError),
    ],
)
def test_anthropic_errors_to_openai(
    status: int, anthropic_type: str, openai_type: str, sdk_error: type[Exception]
) -> None:
    body = {"type": "error", "error": {"type": anthropic_type, "message": "boom"}, "request_id": "req_1"}
    out_status, out = anthropic_error_to_openai(status, body)
    assert out_status == status  # 529 included: the SDK retries >= 500 and raises InternalServerError
    assert out == {"error": {"message": "boom", "type": openai_type, "param": None, "code": anthropic_type}}
    with openai_client(orjson.dumps(out), status, "application/json") as client:
        with pytest.raises(sdk_error) as info:
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert getattr(info.value, "code", None) == anthropic_type
    assert getattr(info.value, "status_code", None) == status


def test_anthropic_error_with_a_non_json_body() -> None:
    status, out = anthropic_error_to_openai(413, "<html>413 Request Entity Too Large</html>")
    assert (status, out["error"]["type"], out["error"]["code"]) == (
        413,
        "request_too_large",
        "request_too_large",
    )
    assert "413 Request Entity Too Large" in out["error"]["message"]
    _, out = anthropic_error_to_openai(502, "")
    assert out["error"] == {
        "message": "upstream returned HTTP 502",
        "type": "server_error",
        "param": None,
        "code": "api_error",
    }


def _oai(message: str, type_: str, code: str | None = None) -> dict[str, Any]:
    return {"message": message, "type": type_, "param": None, "code": code}


_TGI_TOO_LONG = "Input validation error: `inputs` must have less than 4096 tokens"
_HTML = "<html><body>Bad Gateway</body></html>"


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        # newer vLLM: wrapped, CamelCase type, int code
        (
            400,
            {"error": {"message": "too big", "type": "BadRequestError", "param": None, "code": 400}},
            _oai("too big", "invalid_request_error", "400"),
        ),
        # older vLLM: flat
        (
            404,
            {"object": "error", "message": "no model", "type": "NotFoundError", "param": None, "code": 404},
            _oai("no model", "not_found_error", "404"),
        ),
        # TGI: the error is a string, the kind is in error_type
        (
            422,
            {"error": _TGI_TOO_LONG, "error_type": "validation"},
            _oai(_TGI_TOO_LONG, "invalid_request_error", "validation"),
        ),
        (
            429,
            {"error": "Model is overloaded", "error_type": "overloaded"},
            _oai("Model is overloaded", "rate_limit_error", "overloaded"),
        ),
        # OpenAI itself: unchanged
        (
            429,
            {
                "error": {
                    "message": "Slow down",
                    "type": "requests",
                    "param": None,
                    "code": "rate_limit_exceeded",
                }
            },
            _oai("Slow down", "requests", "rate_limit_exceeded"),
        ),
        # FastAPI defaults
        (404, {"detail": "Not Found"}, _oai("Not Found", "not_found_error")),
        (
            422,
            {"detail": [{"loc": ["body", "model"], "msg": "field required"}]},
            _oai('[{"loc":["body","model"],"msg":"field required"}]', "invalid_request_error"),
        ),
        # not JSON at all, or nothing useful
        (502, _HTML, _oai(_HTML, "server_error")),
        (503, b"upstream connect error", _oai("upstream connect error", "server_error")),
        (500, None, _oai("upstream returned HTTP 500", "server_error")),
        (500, [1, 2], _oai("upstream returned HTTP 500", "server_error")),
        (
            400,
            {"error": {"message": "", "code": True}},
            _oai("upstream returned HTTP 400", "invalid_request_error"),
        ),
    ],
)
def test_normalise_openai_compatible_errors(status: int, body: object, expected: dict[str, Any]) -> None:
    assert normalise_openai_compatible_error(status, body) == {"error": expected}


def test_long_error_pages_are_truncated() -> None:
    message = normalise_openai_compatible_error(502, "x" * 10_000)["error"]["message"]
    assert 2000 <= len(message) <= 2001


def test_normalise_stream_error() -> None:
    assert normalise_stream_error(chunk({"content": "fine"})) is None
    assert normalise_stream_error({"error": None, "choices": []}) is None
    flat = {"object": "error", "message": "oops", "type": "BadRequestError", "param": None, "code": 400}
    assert normalise_stream_error(flat) == {
        "error": {"message": "oops", "type": "server_error", "param": None, "code": "400"}
    }


@pytest.mark.parametrize(
    ("status", "body", "anthropic_type", "sdk_error"),
    [
        (400, {"error": {"message": "bad", "type": "x"}}, "invalid_request_error", anthropic.BadRequestError),
        (
            401,
            {"error": {"message": "bad", "code": "invalid_api_key"}},
            "authentication_error",
            anthropic.AuthenticationError,
        ),
        (404, {"object": "error", "message": "bad", "code": 404}, "not_found_error", anthropic.NotFoundError),
        (
            422,
            {"error": "bad", "error_type": "validation"},
            "invalid_request_error",
            anthropic.UnprocessableEntityError,
        ),
        (429, {"error": {"message": "bad", "type": "tokens"}}, "rate_limit_error", anthropic.RateLimitError),
        (500, "bad", "api_error", anthropic.InternalServerError),
        (503, {"error": {"message": "bad"}}, "api_error", anthropic.InternalServerError),
        (504, "bad", "timeout_error", anthropic.InternalServerError),
    ],
)
def test_openai_errors_to_anthropic(
    status: int, body: object, anthropic_type: str, sdk_error: type[Exception]
) -> None:
    out_status, out = openai_error_to_anthropic(status, body)
    assert out_status == status
    assert out == {"type": "error", "error": {"type": anthropic_type, "message": "bad"}}
    with anthropic_client(orjson.dumps(out), status, "application/json") as client:
        with pytest.raises(sdk_error) as info:
            client.messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert getattr(info.value, "status_code", None) == status
    assert getattr(info.value, "body", {})["error"]["type"] == anthropic_type
