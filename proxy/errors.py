"""One error tree for everything the proxy itself refuses, rendered in one place.

    ProxyError                      status  OpenAI type / code
    ├── InvalidRequest              400     invalid_request_error
    │   ├── InvalidJSON             400     invalid_request_error / invalid_json
    │   ├── MissingModel            400     invalid_request_error / missing_model
    │   └── MalformedRequest        400     invalid_request_error / malformed_request (bad HTTP, never quoted)
    ├── AuthenticationFailed        401     authentication_error / invalid_api_key
    ├── NoRoute                     404     invalid_request_error / model_not_found
    ├── PathNotFound                404     invalid_request_error / not_found (a path the proxy does not serve)
    ├── MethodNotAllowed            405     invalid_request_error / method_not_allowed
    ├── RequestTimeout              408     invalid_request_error / request_timeout (head or body too slow)
    ├── BodyTooLarge                413     invalid_request_error / request_too_large
    ├── RateLimited                 429     rate_limit_exceeded (admission: limits and queues)
    │   ├── QueueFull               429     rate_limit_exceeded, x-should-retry: false
    │   ├── QueueTimeout            429     rate_limit_exceeded ("waited N s in queue X")
    │   ├── QueueShed               429     rate_limit_exceeded, x-should-retry: true (lowest class first)
    │   ├── UpstreamPaced           429     rate_limit_exceeded (every deployment held until its reset)
    │   └── UpstreamLimited         429     rate_limit_exceeded (every deployment's upstream over its limits)
    ├── HeadersTooLarge             431     invalid_request_error / request_header_fields_too_large
    ├── ServiceUnavailable          503     service_unavailable (draining, queue cleared)
    │   ├── QueueCleared            503     service_unavailable, x-should-retry: false
    │   └── CircuitOpen             503     circuit_open (every deployment's circuit is open)
    ├── UpstreamUnreachable         502     upstream_unreachable
    ├── UpstreamBadResponse         502     upstream_bad_response (a batched answer that cannot be split)
    └── UpstreamTimeout             504     upstream_timeout

Each carries what the client needs to act (message, Retry-After, x-should-retry); `render()` writes
it in the protocol the client speaks (OpenAI or Anthropic JSON). Messages never contain keys.
Each class also says which `outcome` a request that ends with it has (rejected, upstream_error, timeout,
cancelled, proxy_error), for metrics and the access log.
"""

from __future__ import annotations

import math
from typing import Literal

import orjson
from aiohttp import web

Protocol = Literal["openai", "anthropic", "neutral"]
"""The client's protocol for proxy-made errors: OpenAI's or Anthropic's shape on LLM routes, the neutral
one on tool routes (docs/apps/errors.md#tool-routes)."""

ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}
"""Anthropic's error `type` by HTTP status (docs.claude.com/en/api/errors), for every error the proxy writes
in Anthropic's shape: its own refusals and a translated upstream error. `overloaded_error` is 529's alone:
a 503 (draining, an open circuit, an OpenAI-compatible server's "unavailable") is an `api_error`."""


NEUTRAL_TYPES = {
    "rate_limit_exceeded": "rate_limited", "circuit_open": "circuit_open",
    "upstream_unreachable": "upstream_unreachable", "upstream_timeout": "upstream_timeout",
    "upstream_bad_response": "upstream_unreachable",
}
"""The neutral `type` by the error's code, where the code is finer than its status says."""
NEUTRAL_BY_STATUS = {
    400: "invalid_request", 401: "unauthenticated", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
    408: "request_timeout", 413: "too_large", 429: "rate_limited", 431: "headers_too_large", 500: "internal",
    502: "upstream_unreachable", 503: "unavailable", 504: "upstream_timeout",
}


def anthropic_error_type(status: int) -> str:
    """Any other 4xx is an invalid request; a 5xx, or no error status at all (an error inside a stream
    whose 200 went out), is an `api_error`."""
    kind = ANTHROPIC_ERROR_TYPES.get(status)
    if kind is not None:
        return kind
    return "invalid_request_error" if 400 <= status < 500 else "api_error"


class ProxyError(Exception):
    status = 500
    type = "server_error"
    code: str | None = "internal_error"
    outcome = "proxy_error"
    """What the client finally got, for metrics and the access log (proxy/telemetry/outcome.py): ok,
    upstream_error, timeout, rejected, cancelled or proxy_error (the proxy's own failure)."""
    cause: str | None = None
    """A finer reason than `reason` where one is known (the limit dimension of a 429: rate_limit, ...)."""

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        retry_after: float | None = None,
        should_retry: bool | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after = retry_after
        self.should_retry = should_retry
        self.headers = headers or {}

    @property
    def reason(self) -> str:
        """A short label for metrics and logs."""
        return self.code or self.type

    def openai_body(self) -> dict[str, object]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def anthropic_body(self, request_id: str) -> dict[str, object]:
        kind = anthropic_error_type(self.status)
        message = self.message
        if self.param and self.param not in message:  # Anthropic's errors have no `param`; they say it first
            message = f"{self.param}: {message}"
        return {"type": "error", "error": {"type": kind, "message": message}, "request_id": request_id}

    def neutral_body(self, request_id: str) -> dict[str, object]:
        """The tool routes' shape: a type from a short fixed list, the message, the request id, and the
        Retry-After seconds when there is one (the same number as the header)."""
        kind = NEUTRAL_TYPES.get(self.code or "") or NEUTRAL_BY_STATUS.get(self.status, "error")
        error: dict[str, object] = {"type": kind, "message": self.message, "request_id": request_id}
        if self.retry_after is not None:
            error["retry_after"] = max(1, math.ceil(self.retry_after))
        return {"error": error}

    def response_headers(self) -> dict[str, str]:
        headers = dict(self.headers)
        if self.retry_after is not None:
            headers["retry-after"] = str(max(1, math.ceil(self.retry_after)))
            headers["retry-after-ms"] = str(max(1, math.ceil(self.retry_after * 1000)))
        if self.should_retry is not None:
            headers["x-should-retry"] = "true" if self.should_retry else "false"
        return headers


class InvalidRequest(ProxyError):
    status = 400
    type = "invalid_request_error"
    code: str | None = None
    outcome = "rejected"


class InvalidJSON(InvalidRequest):
    code = "invalid_json"


class MissingModel(InvalidRequest):
    code = "missing_model"


class AuthenticationFailed(ProxyError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"
    outcome = "rejected"


class NoRoute(ProxyError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"
    outcome = "rejected"


class BodyTooLarge(ProxyError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"
    outcome = "rejected"


class MalformedRequest(InvalidRequest):
    """Not valid HTTP/1.1 (request line, a header, the body's framing). The message names the kind of
    fault only: the offending bytes may be a credential."""

    code = "malformed_request"


class PathNotFound(ProxyError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"
    outcome = "rejected"


class MethodNotAllowed(ProxyError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"
    outcome = "rejected"


class RequestTimeout(ProxyError):
    """The client was too slow sending its request head or body (`serve --header-timeout`, ...)."""

    status = 408
    type = "invalid_request_error"
    code = "request_timeout"
    outcome = "rejected"


class HeadersTooLarge(ProxyError):
    status = 431
    type = "invalid_request_error"
    code = "request_header_fields_too_large"
    outcome = "rejected"


class RateLimited(ProxyError):
    status = 429
    type = "requests"
    code = "rate_limit_exceeded"
    outcome = "rejected"


class QueueFull(RateLimited):
    """The queue already holds max_waiting requests; a client retry now would only add load."""

    @property
    def reason(self) -> str:
        return "queue_full"


class QueueTimeout(RateLimited):
    @property
    def reason(self) -> str:
        return "queue_timeout"


class QueueShed(RateLimited):
    """Past the queue's shedding threshold: the lowest class waiting is refused first."""

    @property
    def reason(self) -> str:
        return "queue_shed"


class UpstreamPaced(RateLimited):
    """Adaptive pacing holds every deployment of the route until its upstream's rate-limit reset, and
    that is later than the proxy may wait (retry.max_retry_after, or the deadline)."""

    @property
    def reason(self) -> str:
        return "upstream_paced"


_UPSTREAM_REASONS = {
    "requests": "upstream_rate_limit", "tokens": "upstream_token_limit", "concurrent": "upstream_concurrency_limit"
}


class UpstreamLimited(RateLimited):
    """The upstream's own limit (`upstreams.<name>.limits`) refuses an attempt. Dispatch skips that
    deployment; when no deployment (fallbacks included) can take the request, the soonest refusal is
    waited out (`on_limit: queue`) or answered."""

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None,
        exact: bool,
        dimension: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(
            message, retry_after=retry_after, should_retry=False if retry_after is None else None, headers=headers
        )
        self.exact = exact
        """False when capacity may free earlier than `retry_after` (concurrency, unsettled tokens)."""
        self.dimension = dimension
        if dimension == "tokens":
            self.type = "tokens"

    @property
    def reason(self) -> str:
        return _UPSTREAM_REASONS.get(self.dimension, "upstream_limit")

    def sooner(self, other: UpstreamLimited | None) -> bool:
        """Is this refusal the one to wait for (or report) rather than `other`? The shortest wait wins;
        "never" (a request bigger than the limit) loses to any wait."""
        if other is None:
            return True
        if self.retry_after is None:
            return False
        return other.retry_after is None or self.retry_after < other.retry_after


class ServiceUnavailable(ProxyError):
    status = 503
    type = "server_error"
    code = "service_unavailable"
    outcome = "rejected"


class QueueCleared(ServiceUnavailable):
    """An operator cleared the queue the request waited in (admin API)."""

    @property
    def reason(self) -> str:
        return "queue_cleared"


class SlowClient(ProxyError):
    """The client took no stream write for `slow_client` seconds: the stream was ended, the upstream closed.
    Only ever recorded (access log, metrics): the client is no longer reading."""

    status = 200  # the stream's status had gone out already
    code = "slow_client"
    outcome = "cancelled"


class CircuitOpen(ServiceUnavailable):
    """Every deployment of the route and of its fallbacks has an open circuit breaker."""

    code = "circuit_open"
    outcome = "upstream_error"


class UpstreamUnreachable(ProxyError):
    status = 502
    type = "server_error"
    code = "upstream_unreachable"
    outcome = "upstream_error"


class UpstreamBadResponse(ProxyError):
    """The upstream answered 2xx with a body the proxy had to read and could not (a batched call)."""

    status = 502
    type = "server_error"
    code = "upstream_bad_response"
    outcome = "upstream_error"


class UpstreamTimeout(ProxyError):
    status = 504
    type = "server_error"
    code = "upstream_timeout"
    outcome = "timeout"


def render(error: ProxyError, protocol: Protocol, request_id: str) -> web.Response:
    """The one place a proxy-made error becomes an HTTP response."""
    if protocol == "neutral":
        body = error.neutral_body(request_id)
    else:
        body = error.anthropic_body(request_id) if protocol == "anthropic" else error.openai_body()
    headers = error.response_headers()
    headers["x-request-id"] = request_id
    headers.setdefault("x-signalbox-attempts", "0")  # refused before dispatch (dispatch's errors carry theirs)
    if protocol == "anthropic":
        headers["request-id"] = request_id  # where the anthropic SDK reads `_request_id` from
    response = web.Response(
        status=error.status, body=orjson.dumps(body), content_type="application/json", headers=headers
    )
    if headers.get("connection") == "close":  # the request's framing cannot be trusted: no keep-alive
        response.force_close()
    return response


def stream_error_frame(error: ProxyError, protocol: Protocol, request_id: str) -> bytes:
    """The terminal event for a stream whose headers were already sent (OpenAI: data-only, no event line)."""
    if protocol == "anthropic":
        return b"event: error\ndata: " + orjson.dumps(error.anthropic_body(request_id)) + b"\n\n"
    if protocol == "neutral":
        return b"event: error\ndata: " + orjson.dumps(error.neutral_body(request_id)) + b"\n\n"
    return b"data: " + orjson.dumps(error.openai_body()) + b"\n\n"
