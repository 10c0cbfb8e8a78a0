"""Error bodies across protocols: Anthropic ⇄ OpenAI, and the OpenAI-compatible servers' variants
(vLLM new and old, TGI, FastAPI, plain text) normalised to OpenAI's `{"error": {message, type, param, code}}`.
Pure code. HTTP statuses pass through unchanged, 529 included (see `anthropic_error_to_openai`)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import orjson

from proxy.errors import anthropic_error_type

# An HTML error page from an intermediary is not a message: keep its head only.
MAX_MESSAGE_CHARS = 2000

_CAMEL_ERROR = re.compile(r"^[A-Z][A-Za-z]*Error$")  # vLLM's "BadRequestError" style types

# Anthropic error type -> OpenAI error type. The Anthropic type itself always survives as `code`.
_A_TO_O_TYPE: Mapping[str, str] = {"api_error": "server_error", "overloaded_error": "server_error"}

# OpenAI-side error type -> Anthropic error type, for errors whose HTTP status is unknown (in a stream).
_O_TO_A_TYPE: Mapping[str, str] = {
    "invalid_request_error": "invalid_request_error",
    "authentication_error": "authentication_error",
    "permission_error": "permission_error",
    "not_found_error": "not_found_error",
    "rate_limit_error": "rate_limit_error",
    "requests": "rate_limit_error",  # OpenAI's 429 bodies say type "requests" or "tokens"
    "tokens": "rate_limit_error",
    "insufficient_quota": "billing_error",
}

_OPENAI_TYPE_BY_STATUS: Mapping[int, str] = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}


def _openai_type_for_status(status: int | None) -> str:
    if status is None or status >= 500:
        return "server_error"
    return _OPENAI_TYPE_BY_STATUS.get(status, "invalid_request_error")


def _fallback_message(status: int | None) -> str:
    return "upstream error" if status is None else f"upstream returned HTTP {status}"


def _text(value: object) -> str | None:
    """A non-empty, bounded message string from a str/bytes value, else None."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if not isinstance(value, str) or not value.strip():
        return None
    value = value.strip()
    return value if len(value) <= MAX_MESSAGE_CHARS else value[:MAX_MESSAGE_CHARS] + "…"


def _code(value: object) -> str | None:
    # OpenAI's `code` is a string or null; vLLM sends the HTTP status as an int.
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    return value if isinstance(value, str) and value else None


def _openai_error(
    message: object, type_: object, param: object, code: object, status: int | None
) -> dict[str, Any]:
    kind = type_ if isinstance(type_, str) and type_ and not _CAMEL_ERROR.match(type_) else None
    return {
        "error": {
            "message": _text(message) or _fallback_message(status),
            "type": kind or _openai_type_for_status(status),
            "param": param if isinstance(param, str) else None,
            "code": _code(code),
        }
    }


def _normalise(status: int | None, body: object) -> dict[str, Any]:
    if isinstance(body, Mapping):
        inner = body.get("error")
        if isinstance(inner, Mapping):  # OpenAI, newer vLLM
            return _openai_error(
                inner.get("message"), inner.get("type"), inner.get("param"), inner.get("code"), status
            )
        if isinstance(inner, str) and inner:  # TGI: {"error": "<text>", "error_type": "validation"}
            return _openai_error(inner, None, None, body.get("error_type"), status)
        if body.get("object") == "error" or "message" in body:  # older vLLM, flat
            return _openai_error(
                body.get("message"), body.get("type"), body.get("param"), body.get("code"), status
            )
        if "detail" in body:  # FastAPI's default {"detail": "Not Found"} or a validation list
            detail = body["detail"]
            message = detail if isinstance(detail, str) else orjson.dumps(detail).decode()
            return _openai_error(message, None, None, None, status)
        return _openai_error(None, None, None, None, status)
    return _openai_error(body, None, None, None, status)


def normalise_openai_compatible_error(status: int, body: object) -> dict[str, Any]:
    """Any upstream error body (parsed JSON, or the raw text when it was not JSON) → OpenAI's error shape."""
    return _normalise(status, body)


def normalise_stream_error(data: Mapping[str, Any]) -> dict[str, Any] | None:
    """An in-stream OpenAI-compatible error event → OpenAI's error shape; None when `data` is not an error.

    The OpenAI SDK treats any event with a truthy `error` key as an error; older vLLM sent a flat
    `{"object": "error", ...}`."""
    if data.get("error") or data.get("object") == "error":
        return _normalise(None, data)
    return None


def _anthropic_fields(status: int | None, body: object) -> tuple[str, str]:
    """(anthropic error type, message) from an Anthropic error body, tolerating non-Anthropic bodies."""
    err: object = body.get("error") if isinstance(body, Mapping) else None
    kind: object = None
    message: object = body
    if isinstance(err, Mapping):
        kind, message = err.get("type"), err.get("message")
    elif isinstance(body, Mapping):
        message = body.get("message") if "message" in body else err
    if not isinstance(kind, str) or not kind:
        kind = anthropic_error_type(status) if status is not None else "api_error"
    return kind, _text(message) or _fallback_message(status)


def normalise_anthropic_error(status: int, body: object) -> dict[str, Any] | None:
    """An Anthropic upstream's error body in Anthropic's shape; None when it already is (keep its bytes).
    A load balancer's HTML page or a proxy's plain text in front of Anthropic becomes a proper error."""
    if isinstance(body, Mapping) and body.get("type") == "error" and isinstance(body.get("error"), Mapping):
        return None
    kind, message = _anthropic_fields(status, body)
    return _anthropic_body(kind, message)


def anthropic_error_to_openai(status: int, body: object) -> tuple[int, dict[str, Any]]:
    """An Anthropic error response → (status, OpenAI error body).

    The status is kept as is, 529 (overloaded_error) included: the OpenAI SDK retries every status >= 500
    and raises InternalServerError for it, so clients behave as for a 503 while the overload stays visible.
    `type` is the OpenAI spelling (api_error and overloaded_error become server_error); `code` carries the
    Anthropic type verbatim so nothing is lost."""
    kind, message = _anthropic_fields(status, body)
    return status, _openai_error(message, _A_TO_O_TYPE.get(kind, kind), None, kind, status)


def anthropic_stream_error_to_openai(data: Mapping[str, Any]) -> dict[str, Any]:
    """An Anthropic `error` stream event's data → the OpenAI error body for a `data:` frame."""
    kind, message = _anthropic_fields(None, data)
    return _openai_error(message, _A_TO_O_TYPE.get(kind, kind), None, kind, None)


def _anthropic_body(kind: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": message}}


def openai_error_to_anthropic(status: int, body: object) -> tuple[int, dict[str, Any]]:
    """An OpenAI-compatible error response → (status, Anthropic error body); the type follows the status
    (proxy.errors.ANTHROPIC_ERROR_TYPES: 504 → timeout_error, 503 → api_error), since upstream `type` strings
    vary by server."""
    err = _normalise(status, body)["error"]
    return status, _anthropic_body(anthropic_error_type(status), err["message"])


def openai_stream_error_to_anthropic(data: Mapping[str, Any]) -> dict[str, Any] | None:
    """An in-stream OpenAI-compatible error → Anthropic error event data; None when `data` is not an error."""
    norm = normalise_stream_error(data)
    if norm is None:
        return None
    err = norm["error"]
    return _anthropic_body(_O_TO_A_TYPE.get(err["type"], "api_error"), err["message"])
