"""The cache's side of an answer, pure of I/O: whether a response the proxy is about to send may be stored
(a whole body not yet sent), and the response a hit replays."""

from __future__ import annotations

from aiohttp import web
from multidict import CIMultiDict

from proxy.cache.entry import Entry
from proxy.cache.rules import kept_headers, storable_ttl
from proxy.call import Call
from proxy.policy.cache_rule import CacheRule
from proxy.streaming.oneshot import OneShot

CACHE_HEADER = "x-signalbox-cache"
INPUT_HITS_HEADER = "x-signalbox-cache-hits"


def whole_body(response: web.StreamResponse) -> bytes | None:
    """The body of a whole answer not sent yet (a stream, or a large body streamed through, has none)."""
    if type(response) not in (web.Response, OneShot) or response.prepared:  # (an HTTPException is a Response)
        return None
    assert isinstance(response, web.Response)
    body = response.body
    return body if isinstance(body, bytes) else None


def storable(response: web.StreamResponse, rule: CacheRule) -> tuple[bytes, float] | None:
    """(body, ttl) when the answer may be kept, else None."""
    body = whole_body(response)
    if body is None or len(body) > rule.max_entry:
        return None
    ttl = storable_ttl(response.status, response.headers, rule.ttl)
    return (body, ttl) if ttl > 0 else None


def to_entry(response: web.StreamResponse, body: bytes, now: float) -> Entry:
    return Entry(response.status, kept_headers(response.headers.items()), body, now)


def label(response: web.StreamResponse, result: str) -> None:
    """`x-signalbox-cache` on a whole answer (the data path's relay labels a stream's headers itself)."""
    if not response.prepared:
        response.headers[CACHE_HEADER] = result


def replay(call: Call, entry: Entry, now: float) -> web.Response:
    """A hit: the stored status, headers and body, with this request's own id, route and Age."""
    assert call.route is not None
    headers: CIMultiDict[str] = CIMultiDict(entry.headers)
    headers["x-request-id"] = call.request_id
    headers["x-signalbox-route"] = call.route.name
    headers["x-signalbox-attempts"] = "0"
    headers[CACHE_HEADER] = "hit"
    headers["Age"] = str(int(max(0.0, now - entry.stored)))
    call.status = entry.status
    call.bytes_out = len(entry.body)
    return web.Response(status=entry.status, body=entry.body, headers=headers)
