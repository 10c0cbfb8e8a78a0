"""The header rules (proxy/upstream/headers.py) over generated header lists, against a plain statement of
them written header by header: which client headers go upstream (hop-by-hop, framing, credentials, the
tenant header, x-signalbox-*, names listed in Connection; repeats joined), and which upstream headers the
client gets (hidden ones, the upstream's request id kept aside)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from proxy.policy.plan import Matcher, Provider, UpstreamSpec
from proxy.policy.redact import EMPTY
from proxy.policy.sent_headers import sent_headers
from proxy.upstream.headers import HOP_BY_HOP, client_headers, upstream_headers

NAMES = (
    "Content-Type", "content-type", "Authorization", "X-Api-Key", "Api-Key", "Host", "Content-Length",
    "Accept-Encoding", "Cookie", "cookie", "OpenAI-Beta", "openai-beta", "User-Agent", "X-Tenant",
    "X-Signalbox-Priority", "x-signalbox-tenant", "Connection", "Keep-Alive", "TE", "Upgrade", "X-Hop",
    "X-Request-Id", "Request-Id", "Server", "Date", "Content-Encoding", "X-Ratelimit-Remaining", "Retry-After",
)
VALUES = st.sampled_from(("a", "b c", "ours", "rid", "x-hop, X-Ratelimit-Remaining", "keep-alive", "openai-beta", ""))
HEADERS = st.lists(st.tuples(st.sampled_from(NAMES), VALUES), max_size=12)
HIDES = st.sampled_from((None, ("x-ratelimit-*",), ("x-request-id", "content-type"), ("request-id", "retry-after")))


def _spec(
    provider: Provider = "openai",
    api_key: str | None = "sk-up",
    auth_header: str = "authorization",
    headers: tuple[tuple[str, str], ...] = (),
    basic_auth: str | None = None,
) -> UpstreamSpec:
    """As compile.py builds one (`sent` worked out from the fields)."""
    sent = (sent_headers(headers, basic_auth, api_key, auth_header), sent_headers(headers, basic_auth, None, ""))
    return UpstreamSpec(
        name="u", provider=provider, base_url="http://127.0.0.1:9/v1", api_key=api_key, auth_header=auth_header,
        headers=headers, query=(), max_connections=10, keepalive=30.0, mock=None, basic_auth=basic_auth, sent=sent,
    )


SPEC = _spec()


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


def _own_stated(
    out: dict[str, str], spec: UpstreamSpec, credentials: dict[str, str] | None, request_id: str
) -> dict[str, str]:
    """The upstream's own headers set over the client's one by one, as each request did before `spec.sent`."""
    out = dict(out)
    for name, value in spec.headers:
        out[name] = value
    if spec.basic_auth is not None:
        out["authorization"] = spec.basic_auth
    if credentials:
        out.update(credentials)
    elif spec.api_key is not None:
        out[spec.auth_header] = ("Bearer " + spec.api_key) if spec.auth_header == "authorization" else spec.api_key
    if spec.provider == "anthropic":
        out.setdefault("anthropic-version", "2023-06-01")
    out["accept-encoding"] = "identity"
    out["x-request-id"] = request_id
    out.setdefault("user-agent", "signalbox")
    return out


OWN_NAMES = ("authorization", "x-api-key", "anthropic-version", "user-agent", "openai-beta", "x-extra", "cookie")
OWN = st.lists(st.tuples(st.sampled_from(OWN_NAMES), st.sampled_from(("v1", "v2"))), max_size=4).map(
    lambda pairs: tuple(dict(pairs).items())  # compile.py's: one value per (lower-case) name
)


@settings(max_examples=400, deadline=None)
@given(
    HEADERS,
    st.sampled_from(("openai", "anthropic", "http")),
    st.sampled_from((None, "sk-up")),
    st.sampled_from(("authorization", "x-api-key")),
    OWN,
    st.sampled_from((None, "Basic dTpw")),
    st.sampled_from((None, {}, {"authorization": "Bearer app"}, {"x-api-key": "app", "api-key": "app2"})),
)
def test_upstream_headers_set_the_upstreams_own_as_the_rules_say(
    client: list[tuple[str, str]],
    provider: Provider,
    api_key: str | None,
    auth_header: str,
    own: tuple[tuple[str, str], ...],
    basic_auth: str | None,
    credentials: dict[str, str] | None,
) -> None:
    """`spec.sent` (worked out at compile time) gives what setting the upstream's headers one by one gave:
    the same names, values and order (the order is the request head's), pass-through credentials included."""
    spec = _spec(provider, api_key, auth_header, own, basic_auth)
    stated = _own_stated(_up_stated(client, frozenset()), spec, credentials, "rid")
    out = upstream_headers(client, spec, request_id="rid", client_credentials=credentials)
    assert list(out.items()) == list(stated.items())


def test_header_names_in_any_case_are_worked_out_alike_past_the_memo() -> None:
    """A name first seen in one case is remembered; the same name in another case, or a new one after the
    memo is full, still follows the rules."""
    client = [(f"X-Many-{i}", "v") for i in range(1100)] + [("CONNECTION", "x-many-5"), ("x-SIGNALBOX-tenant", "t")]
    for _ in range(2):
        out = upstream_headers(client + [("Cookie", "a"), ("COOKIE", "b")], SPEC, request_id="rid")
        assert "x-many-5" not in out and "x-many-1099" in out and "x-signalbox-tenant" not in out
        assert out["cookie"] == "a; b" and len(out) == 1099 + 5
        down = client_headers([("X-Request-ID", "up"), ("x-many-1050", "v"), ("request-ID", "rid")], request_id="rid",
                              route="r", upstream_name="u", hide=Matcher(("x-many-105*",)))
        assert down.getall("x-upstream-request-id") == ["up"] and "x-many-1050" not in down
