"""Error bodies and headers in each provider's shape (OpenAI or Anthropic), as the real APIs send them."""

from __future__ import annotations

import secrets

import orjson
from aiohttp import web

from proxy.errors import anthropic_error_type
from proxy.mock.content import Json

_RATE_HEADERS = {
    "x-ratelimit-limit-requests": "10000",
    "x-ratelimit-limit-tokens": "2000000",
    "x-ratelimit-remaining-requests": "9999",
    "x-ratelimit-remaining-tokens": "1999000",
    "x-ratelimit-reset-requests": "6ms",
    "x-ratelimit-reset-tokens": "30ms",
}


def openai_error(status: int, message: str, param: str | None = None) -> Json:
    etype, code = "invalid_request_error", None
    if status == 429:
        etype, code = "requests", "rate_limit_exceeded"
    elif status >= 500:
        etype = "server_error"
    elif status == 401:
        code = "invalid_api_key"
    elif status == 404:
        code = "not_found"
    return {"error": {"message": message, "type": etype, "param": param, "code": code}}


def anthropic_error(status: int, message: str, request_id: str) -> Json:
    etype = anthropic_error_type(status)  # the one table the proxy uses too
    return {"type": "error", "error": {"type": etype, "message": message}, "request_id": request_id}


def _seconds(value: float) -> str:
    """Header form of a number: an integer when whole, else up to millisecond precision."""
    return str(int(value)) if value == int(value) else repr(round(value, 3))


def _request_id() -> str:
    return "req_" + secrets.token_hex(12)


def ok_headers(anthropic: bool) -> dict[str, str]:
    return {"request-id": _request_id()} if anthropic else {"x-request-id": _request_id(), **_RATE_HEADERS}


def error_response(
    status: int, message: str, anthropic: bool, param: str | None = None, retry_after: float | None = None
) -> web.Response:
    rid = _request_id()
    headers = {"request-id": rid} if anthropic else {"x-request-id": rid}
    if retry_after is not None:
        headers["retry-after"] = _seconds(retry_after)
        headers["retry-after-ms"] = _seconds(retry_after * 1000)
    body = anthropic_error(status, message, rid) if anthropic else openai_error(status, message, param)
    reason = "Overloaded" if status == 529 else None  # not in http.HTTPStatus
    return web.Response(status=status, reason=reason, body=orjson.dumps(body), headers=headers,
                        content_type="application/json")
