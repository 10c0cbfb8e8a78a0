"""Which headers cross the proxy, both ways (pure).

Upstream-bound: the client's headers minus hop-by-hop ones and minus its proxy credentials, plus
the upstream's own credentials. Client-bound: the upstream's headers minus hop-by-hop and framing
ones (aiohttp re-frames the body), plus our request id and route/upstream names.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from multidict import CIMultiDict

from proxy.policy.plan import Matcher, UpstreamSpec
from proxy.policy.redact import EMPTY, Redactor

QUEUE_WAIT_HEADER = "x-signalbox-queue-wait-ms"
"""On every answer: how long the request waited in its queue before it was sent (0: it did not wait)."""

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Never forwarded upstream: framing aiohttp recomputes, and the client's proxy credentials.
_DROP_UP = HOP_BY_HOP | {"host", "content-length", "accept-encoding", "authorization", "x-api-key", "api-key"}
_DROP_DOWN = HOP_BY_HOP | {"content-length", "content-encoding", "server", "date", "x-request-id", "request-id"}
# The upstream's own request id: `x-request-id` (OpenAI and most compatible servers) or `request-id` (Anthropic).
_UPSTREAM_IDS = ("x-request-id", "request-id")
_CREDENTIAL_HEADERS = ("authorization", "x-api-key", "api-key")
USER_AGENT = "signalbox"
"""Sent upstream when the client sent no User-Agent of its own."""


def upstream_headers(
    client: Iterable[tuple[str, str]],
    spec: UpstreamSpec,
    *,
    request_id: str,
    drop: frozenset[str] = frozenset(),
    client_credentials: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Headers for the upstream request.

    `client_credentials` (pass-through mode) forwards the app's own credential headers instead of
    the upstream's configured key.
    """
    out: dict[str, str] = {}
    dropped = _DROP_UP | drop if drop else _DROP_UP
    named: list[str] = []
    for name, value in client:
        lower = name.lower()
        if lower in dropped:  # `connection` is hop-by-hop, so its test costs only the headers dropped
            if lower == "connection":
                named += _connection_tokens(value)
        elif lower in out:
            # A repeated field is one comma-separated list (RFC 9110 §5.3; two `OpenAI-Beta` lines must both
            # arrive); Cookie lines join with "; " (RFC 6265 §5.4).
            out[lower] += ("; " if lower == "cookie" else ", ") + value
        elif not lower.startswith("x-signalbox-"):  # instructions to this proxy (priority, tenant), not upstream
            out[lower] = value
    if named:
        for token in named:
            out.pop(token, None)
    for name, value in spec.headers:
        out[name] = value
    if spec.basic_auth is not None:  # from base_url's user:password@ (the loader refuses a second Authorization)
        out["authorization"] = spec.basic_auth
    if client_credentials:
        out.update(client_credentials)
    elif spec.api_key is not None:
        if spec.auth_header == "authorization":
            out["authorization"] = "Bearer " + spec.api_key
        else:
            out[spec.auth_header] = spec.api_key
    if spec.provider == "anthropic":
        out.setdefault("anthropic-version", "2023-06-01")
    out["accept-encoding"] = "identity"
    out["x-request-id"] = request_id
    if "user-agent" not in out:
        # Say who calls rather than let aiohttp name itself (and skipping its header costs work per request).
        out["user-agent"] = USER_AGENT
    return out


def _connection_tokens(value: str) -> list[str]:
    """Header names listed in a Connection header: hop-by-hop for this one connection (RFC 9110 §7.6.1)."""
    return [token.strip().lower() for token in value.split(",") if token.strip()]


def credentials_of(client: Mapping[str, str]) -> dict[str, str]:
    """The app's own credential headers, for pass-through mode."""
    return {name: client[name] for name in _CREDENTIAL_HEADERS if name in client}


def client_headers(
    upstream: Iterable[tuple[str, str]],
    *,
    request_id: str,
    route: str,
    upstream_name: str,
    hide: Matcher | None = None,
    redact: Redactor = EMPTY,
    protocol: str = "openai",
) -> CIMultiDict[str]:
    """Headers for the client response. Our request id goes out as `x-request-id`, and for an Anthropic
    client (`protocol`) also as `request-id`, where the anthropic SDK reads `_request_id`. The upstream's
    own id, whichever of the two headers it came in, survives as x-upstream-request-id (unless `hide`, the
    upstream's `hide_response_headers`, names that header). A value quoting a secret `redact` knows (a
    gateway echoing the credentials it got) has it replaced."""
    out: CIMultiDict[str] = CIMultiDict()
    add = out.add
    named: list[str] = []
    for name, value in upstream:
        lower = name.lower()
        if lower in _DROP_DOWN:  # `connection` included: its test costs only the headers dropped
            if lower == "connection":
                named += _connection_tokens(value)
            elif lower in _UPSTREAM_IDS and value != request_id and (hide is None or not hide(lower)):
                out["x-upstream-request-id"] = value
        elif hide is None or lower == "content-type" or not hide(lower):
            add(name, value)
    if named:
        for token in named:
            out.popall(token, None)
    if redact and out:
        _redact_values(out, redact)
    out["x-request-id"] = request_id
    if protocol == "anthropic":
        out["request-id"] = request_id
    out["x-signalbox-route"] = route
    out["x-signalbox-upstream"] = upstream_name
    return out


def _redact_values(headers: CIMultiDict[str], redact: Redactor) -> None:
    """One search over all values (the usual answer: nothing found), then value by value."""
    joined = "\n".join(headers.values())
    if redact.scrub_text(joined, masks=False) is joined:
        return
    items = [(name, redact.scrub_text(value, masks=False)) for name, value in headers.items()]
    headers.clear()
    headers.extend(items)
