"""Pure decisions of the response cache: the key of a request, what a client's and an upstream's
`Cache-Control` allow, and which response headers an entry keeps.

The key is a sha256 over everything that changes the answer, so no prompt, credential or tenant name
is kept in a key's name (Redis `KEYS` shows hex only):

- the route's salt (its name and pool: a reload that points it elsewhere starts afresh),
- the tenant's name (scope `tenant`; nothing under scope `shared`),
- method, path and query string exactly as sent,
- the body: JSON re-serialised with sorted keys (so key order and spacing do not matter), any other
  body as its bytes,
- the request headers in `KEY_HEADERS`, and under `identify: passthrough` the client's own credential
  (its answer may depend on whose key it is).

`Accept-Encoding` is not in the key: the proxy's upstream client asks for its own encodings and stores
the decoded body, and the client's encoding is negotiated again on every answer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import orjson

from proxy.policy.cache_rule import CacheRule

KEY_HEADERS = (
    "accept", "content-type", "anthropic-version", "anthropic-beta", "openai-beta", "openai-organization",
    "openai-project",
)
"""Request headers that change an LLM API's answer (version and beta switches, the organisation or
project billed, the media type asked for)."""
CREDENTIAL_HEADERS = ("authorization", "x-api-key", "api-key")
CACHED_METHODS = frozenset({"GET", "POST"})
"""GET and POST answers are cached; other methods change state upstream and always go there."""
KEPT_OUT = frozenset({
    "x-request-id", "content-length", "date", "transfer-encoding", "connection", "keep-alive", "set-cookie",
    "age", "x-signalbox-route", "x-signalbox-upstream", "x-signalbox-attempts", "x-signalbox-deployment",
    "x-signalbox-fallback", "x-signalbox-queue-wait-ms", "x-signalbox-batch-size", "x-signalbox-cache",
    "x-should-retry",
})
"""Response headers an entry does not keep: per-request facts (ids, timing, who answered) and framing."""

ClientMode = Literal["use", "refresh", "skip"]


def directives(value: str | None) -> dict[str, str]:
    """`Cache-Control` as {directive: argument} (lower-case names, quotes dropped)."""
    if not value:
        return {}
    out: dict[str, str] = {}
    for part in value.split(","):
        name, _, argument = part.strip().partition("=")
        if name:
            out[name.strip().lower()] = argument.strip().strip('"')
    return out


def client_mode(cache_control: str | None) -> ClientMode:
    """What the client's `Cache-Control` allows: `no-store` neither reads nor writes the cache, `no-cache`
    (or `max-age=0`) skips the lookup and refreshes the entry, anything else uses it."""
    if not cache_control:
        return "use"
    found = directives(cache_control)
    if "no-store" in found:
        return "skip"
    if "no-cache" in found or found.get("max-age") == "0":
        return "refresh"
    return "use"


def storable_ttl(status: int, headers: Mapping[str, str], ttl: float) -> float:
    """Seconds the answer may be kept (0: not at all): only a whole 2xx (not 206) without `Set-Cookie`,
    whose `Cache-Control` has none of no-store, private or no-cache, `Vary: *` neither; the upstream's
    `s-maxage` (a shared cache's) or `max-age` shortens the policy's ttl."""
    if not 200 <= status < 300 or status == 206 or "set-cookie" in headers:
        return 0.0
    if "*" in headers.get("vary", ""):
        return 0.0
    found = directives(headers.get("cache-control"))
    if "no-store" in found or "private" in found or "no-cache" in found:
        return 0.0
    age = found.get("s-maxage", found.get("max-age"))
    if age is not None:
        try:
            return max(0.0, min(ttl, float(int(age))))
        except ValueError:
            return 0.0  # a malformed max-age: treated as stale (RFC 9111 §4.2.1)
    return ttl


def kept_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(name, value) for name, value in headers if name.lower() not in KEPT_OUT]


def body_bytes(body: dict[str, Any] | None, raw: bytes) -> bytes:
    """The body as keyed: parsed JSON with sorted keys, else the bytes as sent."""
    if body is None:
        return raw
    return orjson.dumps(body, option=orjson.OPT_SORT_KEYS)


def request_key(
    rule: CacheRule,
    tenant: str,
    parts: Iterable[str],
    body: bytes,
    headers: Mapping[str, str],
    credentials: bool,
) -> str:
    """The hex sha256 an answer is stored under (see the module docstring for what goes in)."""
    digest = hashlib.sha256(rule.salt)
    digest.update(b"\x00t" + (tenant.encode() if rule.scope == "tenant" else b""))
    for part in parts:
        digest.update(b"\x00p" + part.encode("utf-8", "surrogateescape"))
    for name in KEY_HEADERS:
        value = headers.get(name)
        if value is not None:
            digest.update(b"\x00h" + name.encode() + b":" + value.encode("utf-8", "surrogateescape"))
    if credentials:
        for name in CREDENTIAL_HEADERS:
            value = headers.get(name)
            if value is not None:
                digest.update(b"\x00c" + name.encode() + b":" + value.encode("utf-8", "surrogateescape"))
    digest.update(b"\x00b")
    digest.update(body)
    return digest.hexdigest()
