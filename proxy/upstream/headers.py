"""Which headers cross the proxy, both ways (pure).

Upstream-bound: the client's headers minus hop-by-hop ones and minus its proxy credentials, plus
the upstream's own credentials. Client-bound: the upstream's headers minus hop-by-hop and framing
ones (aiohttp re-frames the body), plus our request id and route/upstream names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from multidict import CIMultiDict

from proxy.policy.plan import Matcher, UpstreamSpec
from proxy.policy.redact import EMPTY, Redactor
from proxy.policy.sent_headers import ANTHROPIC_VERSION

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
_MEMO_LIMIT = 1024
"""Header names remembered per rule set: clients and upstreams send the same few, a stranger is worked out anew."""
# What a name means in `_Kinds`: towards the upstream the lower-case name (forwarded), None (dropped) or ""
# (`Connection`, whose tokens name more to drop: falsy too); towards the client None (relayed as it came) or:
_DROP, _CONNECTION, _UPSTREAM_ID = "drop", "connection", "id"
_UPSTREAM_ID_HEADER = "x-upstream-request-id"


class _Kinds(dict[str, str | None]):
    """A header name as it came (any case) → what the rules do with it, worked out on its first sight:
    one dict lookup per header instead of lowering and testing it (`rule` is `_up` or `_down`)."""

    __slots__ = ("rule", "arg")

    def __init__(self, rule: Callable[[str, Any], str | None], arg: Any) -> None:
        super().__init__()
        self.rule = rule
        self.arg = arg

    def __missing__(self, name: str) -> str | None:
        kind = self.rule(name.lower(), self.arg)
        if len(self) < _MEMO_LIMIT:
            self[name] = kind
        return kind


def _up(lower: str, drop: frozenset[str]) -> str | None:
    """Towards the upstream: the name to forward, None (dropped) or "" (`Connection`); `drop`: the plan's."""
    if lower in _DROP_UP or lower in drop:
        return "" if lower == "connection" else None
    return None if lower.startswith("x-signalbox-") else lower  # instructions to this proxy (priority, tenant)


def _down(lower: str, hide: Matcher | None) -> str | None:
    """Towards the client: None (relayed as it came), `_DROP`, `_CONNECTION` or `_UPSTREAM_ID` (kept aside
    as x-upstream-request-id unless it is ours); `hide`: the upstream's `hide_response_headers`."""
    hidden = hide is not None and lower != "content-type" and hide(lower)
    if lower == "connection":
        return _CONNECTION
    if lower in _DROP_DOWN:
        return _UPSTREAM_ID if lower in _UPSTREAM_IDS and not hidden else _DROP
    return _DROP if hidden else None


class _Memos(dict[Any, _Kinds]):
    """One `_Kinds` per rule set (a plan's drop set, an upstream's `hide`); a reload brings new ones, so
    past a few dozen all are forgotten and worked out again."""

    __slots__ = ("rule",)

    def __init__(self, rule: Callable[[str, Any], str | None]) -> None:
        super().__init__()
        self.rule = rule

    def __missing__(self, arg: Any) -> _Kinds:
        if len(self) >= 64:
            self.clear()
        kinds = self[arg] = _Kinds(self.rule, arg)
        return kinds


_UP_KINDS = _Memos(_up)  # by the names the plan drops (its tenant header)
_DOWN_KINDS = _Memos(_down)  # by `hide` (a Matcher compares by identity)


def upstream_headers(
    client: Iterable[tuple[str, str]],
    spec: UpstreamSpec,
    *,
    request_id: str,
    drop: frozenset[str] = frozenset(),
    client_credentials: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Headers for the upstream request: the client's, then the upstream's own (`spec.sent`, worked out
    with the plan), then ours.

    `client_credentials` (pass-through mode) forwards the app's own credential headers instead of
    the upstream's configured key.
    """
    kinds = _UP_KINDS[drop]  # the plan's own set: its hash is kept, found by identity
    out: dict[str, str] = {}
    named: list[str] = []
    for name, value in client:
        lower = kinds[name]
        if not lower:  # dropped; `connection` is hop-by-hop, so its test costs only the headers dropped
            if lower is not None:
                named += _connection_tokens(value)
        elif lower in out:
            # A repeated field is one comma-separated list (RFC 9110 §5.3; two `OpenAI-Beta` lines must both
            # arrive); Cookie lines join with "; " (RFC 6265 §5.4).
            out[lower] += ("; " if lower == "cookie" else ", ") + value
        else:
            out[lower] = value
    for token in named:
        out.pop(token, None)
    if client_credentials:
        out.update(spec.sent[1])
        out.update(client_credentials)
    else:
        out.update(spec.sent[0])
    if spec.provider == "anthropic":
        out.setdefault("anthropic-version", ANTHROPIC_VERSION)
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
    kinds = _DOWN_KINDS[hide]
    out: CIMultiDict[str] = CIMultiDict()
    add = out.add
    named: list[str] = []
    for name, value in upstream:
        kind = kinds[name]
        if kind is None:
            add(name, value)
        elif kind == _UPSTREAM_ID:
            if value != request_id:
                out[_UPSTREAM_ID_HEADER] = value
        elif kind == _CONNECTION:
            named += _connection_tokens(value)
    for token in named:
        out.popall(token, None)
    search = redact.search  # a success's headers: the usual answer is nothing to redact, found in one C call
    if search is not None and out and search("\n".join(out.values()).encode("utf-8", "surrogatepass")) is not None:
        _redact_values(out, redact)
    out["x-request-id"] = request_id
    if protocol == "anthropic":
        out["request-id"] = request_id
    out["x-signalbox-route"] = route
    out["x-signalbox-upstream"] = upstream_name
    return out


def _redact_values(headers: CIMultiDict[str], redact: Redactor) -> None:
    """Value by value, once a search over all of them found a secret."""
    items = [(name, redact.scrub_text(value, masks=False)) for name, value in headers.items()]
    headers.clear()
    headers.extend(items)
