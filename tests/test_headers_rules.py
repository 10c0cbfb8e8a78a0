"""The header rules (proxy/upstream/headers.py) over generated header lists, against a plain statement of
them written header by header: which client headers go upstream (hop-by-hop, framing, credentials, the
tenant header, x-signalbox-*, names listed in Connection; repeats joined), and which upstream headers the
client gets (hidden ones, the upstream's request id kept aside)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from proxy.policy.plan import Matcher, UpstreamSpec
from proxy.policy.redact import EMPTY
from proxy.upstream.headers import HOP_BY_HOP, client_headers, upstream_headers

NAMES = (
    "Content-Type", "content-type", "Authorization", "X-Api-Key", "Api-Key", "Host", "Content-Length",
    "Accept-Encoding", "Cookie", "cookie", "OpenAI-Beta", "openai-beta", "User-Agent", "X-Tenant",
    "X-Signalbox-Priority", "x-signalbox-tenant", "Connection", "Keep-Alive", "TE", "Upgrade", "X-Hop",
    "X-Request-Id", "Request-Id", "Server", "Date", "Content-Encoding", "X-Ratelimit-Remaining", "Retry-After",
)
VALUES = st.sampled_from(("a", "b c", "ours", "x-hop, X-Ratelimit-Remaining", "keep-alive", "openai-beta", ""))
HEADERS = st.lists(st.tuples(st.sampled_from(NAMES), VALUES), max_size=12)
HIDES = st.sampled_from((None, ("x-ratelimit-*",), ("x-request-id", "content-type"), ("request-id", "retry-after")))


SPEC = UpstreamSpec(
    name="u", provider="openai", base_url="http://127.0.0.1:9/v1", api_key="sk-up", auth_header="authorization",
    headers=(), query=(), max_connections=10, keepalive=30.0, mock=None,
)


def _tokens(value: str) -> list[str]:
    return [token.strip().lower() for token in value.split(",") if token.strip()]


def _up_stated(client: list[tuple[str, str]], drop: frozenset[str]) -> dict[str, str]:
    dropped = HOP_BY_HOP | {"host", "content-length", "accept-encoding", "authorization", "x-api-key", "api-key"}
    listed = {token for name, value in client if name.lower() == "connection" for token in _tokens(value)}
    out: dict[str, str] = {}
    for name, value in client:
        lower = name.lower()
        if lower in dropped or lower in drop or lower in listed or lower.startswith("x-signalbox-"):
            continue
        sep = "; " if lower == "cookie" else ", "
        out[lower] = out[lower] + sep + value if lower in out else value
    return out


@settings(max_examples=400, deadline=None)
@given(HEADERS, st.booleans())
def test_upstream_headers_forward_what_the_rules_say(client: list[tuple[str, str]], tenant_header: bool) -> None:
    drop = frozenset({"x-tenant"}) if tenant_header else frozenset()
    out = upstream_headers(client, SPEC, request_id="rid", drop=drop)
    ours = {"authorization", "accept-encoding", "x-request-id", "user-agent"}
    forwarded = {name: value for name, value in out.items() if name not in ours}
    assert forwarded == {name: value for name, value in _up_stated(client, drop).items() if name not in ours}
    assert list(forwarded) == [name for name in _up_stated(client, drop) if name not in ours]  # order kept
    assert out["x-request-id"] == "rid" and out["accept-encoding"] == "identity"


def _down_stated(upstream: list[tuple[str, str]], hide: Matcher | None) -> list[tuple[str, str]]:
    dropped = HOP_BY_HOP | {"content-length", "content-encoding", "server", "date", "x-request-id", "request-id"}
    listed = {token for name, value in upstream if name.lower() == "connection" for token in _tokens(value)}
    out: list[tuple[str, str]] = []
    kept_id: str | None = None
    for name, value in upstream:
        lower = name.lower()
        hidden = hide is not None and lower != "content-type" and hide(lower)
        if lower in ("x-request-id", "request-id") and value != "rid" and not hidden:
            kept_id = value
        if hidden or lower in dropped or lower in listed:
            continue
        out.append((name, value))
    if kept_id is not None and "x-upstream-request-id" not in listed:
        out.append(("x-upstream-request-id", kept_id))
    return out


@settings(max_examples=400, deadline=None)
@given(HEADERS, HIDES)
def test_client_headers_relay_what_the_rules_say(upstream: list[tuple[str, str]], hide: tuple[str, ...] | None) -> None:
    matcher = Matcher(hide) if hide else None
    out = client_headers(upstream, request_id="rid", route="r", upstream_name="u", hide=matcher, redact=EMPTY)
    ours = {"x-request-id", "x-signalbox-route", "x-signalbox-upstream"}
    relayed = CIMultiDict((name, value) for name, value in out.items() if name.lower() not in ours)
    stated = CIMultiDict(_down_stated(upstream, matcher))
    assert sorted(relayed.items()) == sorted(stated.items())
    assert [n for n, _ in relayed.items() if n != "x-upstream-request-id"] == [
        n for n, _ in stated.items() if n != "x-upstream-request-id"
    ]
