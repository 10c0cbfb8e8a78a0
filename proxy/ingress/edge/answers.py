"""What the proxy answers for a request that never reached a handler, and in which protocol: pure
decisions over the parser's exception, the router's refusal or the raw head bytes.

No answer and no log line quotes the request: aiohttp's parser messages quote the offending line (an
`Authorization` header with a stray control byte would send the tenant key back), so only the kind of
fault is taken from them, by exception class and a few keywords of the parser's fixed reason text.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus

from aiohttp.http_exceptions import (
    BadHttpMessage,
    BadHttpMethod,
    BadStatusLine,
    ContentLengthError,
    InvalidURLError,
    LineTooLong,
    TransferEncodingError,
)
from aiohttp.web import RequestPayloadError

from proxy.errors import (
    HeadersTooLarge,
    InvalidRequest,
    MalformedRequest,
    MethodNotAllowed,
    PathNotFound,
    Protocol,
    ProxyError,
    RequestTimeout,
    UpstreamTimeout,
)

SNIFF = 8192
"""How much of a failed request's head is looked at to tell its protocol."""
_CLOSE = {"connection": "close"}


class HeadTimeout(Exception):
    """The request line and headers did not all arrive within the header timeout."""

    def __init__(self, limit: float) -> None:
        super().__init__(limit)
        self.limit = limit


@dataclass(frozen=True, slots=True)
class Failure:
    error: ProxyError
    kind: str
    """A fixed label for the log line (never request bytes)."""
    quiet: bool = False
    """Not HTTP at all (TLS, port scanners): logged at DEBUG."""


def protocol_of(path: str, headers: Mapping[str, str]) -> Protocol:
    return "anthropic" if "anthropic-version" in headers or "/v1/messages" in path else "openai"


def protocol_of_head(head: bytes | None) -> Protocol:
    """The protocol of a request that did not parse, from its first bytes: Anthropic if its target is
    /v1/messages or it has an anthropic-version header, OpenAI otherwise."""
    if not head:
        return "openai"
    sample = head[:SNIFF].lower()
    target = sample.split(b"\n", 1)[0].split(b" ")[1:2]
    if (target and b"/v1/messages" in target[0]) or b"\nanthropic-version:" in sample:
        return "anthropic"
    return "openai"


_FRAMING = "the request's body framing (Content-Length or chunked Transfer-Encoding) is invalid"
_HEADER = "a header's name or value has a character HTTP does not allow (a control byte, for instance)"


def for_parse_error(exc: BaseException | None, max_field_size: int, max_headers: int) -> Failure:
    """The answer to a request the HTTP parser refused (or gave up waiting for)."""
    if isinstance(exc, HeadTimeout):
        message = f"the request line and headers did not arrive within {exc.limit:g} s (serve --header-timeout)"
        return Failure(RequestTimeout(message, headers=dict(_CLOSE)), "headers too slow")
    if isinstance(exc, LineTooLong):
        message = f"the request line or a header field is longer than {max_field_size} bytes"
        return Failure(HeadersTooLarge(message), "head too large")
    if isinstance(exc, BadHttpMethod):
        if "HTTPS" in exc.message:
            return Failure(_malformed("this port speaks plain HTTP: use http://, not https://"), "TLS", quiet=True)
        return Failure(_malformed("the request line does not start with an HTTP method"), "not HTTP", quiet=True)
    if isinstance(exc, BadStatusLine | InvalidURLError):
        return Failure(_malformed("the request line is not 'METHOD /path HTTP/1.1'"), "bad request line")
    if isinstance(exc, TransferEncodingError | ContentLengthError | RequestPayloadError):
        return Failure(_malformed(_FRAMING), "bad body framing or encoding")
    if isinstance(exc, BadHttpMessage):
        reason = exc.message.split("\n", 1)[0].lower()
        if reason.startswith("too many"):
            message = f"the request has more than {max_headers} header fields"
            return Failure(HeadersTooLarge(message), "too many headers")
        return _by_reason(reason)
    return Failure(_malformed("the request is not valid HTTP/1.1"), "malformed")


def _by_reason(reason: str) -> Failure:
    """The parser's reason line (a fixed text such as "Invalid header value char") says which part failed."""
    if "missing 'host'" in reason:
        return Failure(_malformed("an HTTP/1.1 request needs a Host header"), "no Host header")
    if reason.startswith("duplicate"):
        return Failure(_malformed("a header that may appear once appears twice"), "duplicate header")
    if "chunk" in reason or "content-length" in reason or "transfer-encoding" in reason:
        return Failure(_malformed(_FRAMING), "bad body framing")
    if "pri/upgrade" in reason:
        return Failure(_malformed("HTTP/2 is not served on this port: use HTTP/1.1"), "HTTP/2 preface")
    if "header" in reason:
        return Failure(_malformed(_HEADER), "bad header")
    return Failure(_malformed("the request is not valid HTTP/1.1"), "malformed")


def _malformed(what: str) -> MalformedRequest:
    return MalformedRequest(what, headers=dict(_CLOSE))


def for_handler_failure(status: int) -> ProxyError:
    """aiohttp's own 500/504, for an exception that escaped a handler (a bug: handlers answer their errors)."""
    if status == 504:
        return UpstreamTimeout("the request timed out inside the proxy")
    return ProxyError("internal error in the proxy; please report it")


def for_http_refusal(status: int, allow: str | None, path: str, admin: bool) -> ProxyError:
    """The router's (or the Expect handling's) refusal, said in JSON and without quoting the request."""
    if status == 404:
        return not_found(path, admin)
    if status == 405:
        if not allow:
            return MethodNotAllowed("this path does not take that method")
        return MethodNotAllowed(f"this path does not take that method: it takes {allow}", headers={"allow": allow})
    error = InvalidRequest(f"the request was refused ({status} {_phrase(status)})")
    error.status = status
    return error


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "refused"


_PUBLIC = "this port serves the OpenAI and Anthropic APIs under /v1/ (and /healthz, /readyz, /metrics)"
_ADMIN = "the admin port serves /admin/queues, /admin/policy, /admin/reload, /admin/explain and /admin/upstreams"


def not_found(path: str, admin: bool) -> PathNotFound:
    """A 404 that says what the port does serve, with a hint for the usual base_url slips. The path is not
    repeated: a client may have put a key in it."""
    if admin:
        hint = "the API is on the main port, not the admin port" if path.startswith("/v1") else _ADMIN
    elif path.startswith("/admin"):
        hint = "the admin API listens on the admin port (serve --admin-port), not on this one"
    elif path.startswith("//"):
        hint = "the path starts with '//': drop the trailing '/' from your base_url (it should end in /v1)"
    elif "/v1/" in path:
        hint = "/v1/ is at the root here: use http://host:port/v1 for OpenAI SDKs, http://host:port for Anthropic's"
    else:
        hint = f"{_PUBLIC}: did your base_url forget /v1? (http://host:port/v1)"
    return PathNotFound(f"no endpoint at this path; {hint}")
