"""The per-input embeddings cache: each input (a text or a token array) of an embeddings request is an entry
of its own, keyed with everything else in the body (model, dimensions, encoding_format, ...), the route,
the tenant (scope `tenant`) and the headers that change an answer.

A request whose inputs are all cached is answered here (a hit: the call's own limits, nothing upstream).
Otherwise only the missing inputs go onward, in one request (an input repeated in the request goes
once); with batching on, that request merges with other callers' like any other. The answer is put
back together in the caller's order, indexes renumbered, and its `usage` stays what the upstream billed
for the inputs it was sent. A request that missed entirely and repeats nothing is relayed untouched.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web
from multidict import CIMultiDict

from proxy.cache import answer
from proxy.cache.rules import body_bytes, request_key, storable_ttl
from proxy.call import Call
from proxy.errors import UpstreamBadResponse

if TYPE_CHECKING:
    from proxy.cache.serve import Limits, Onward, ResponseCache

Cached = tuple[str, float, Any]
"""(model, stored at, embedding) as kept per input."""


def split(value: Any) -> list[Any] | None:
    """The inputs of `input`: a text, a list of texts, one token array or a list of token arrays; None for
    anything else (cached as a whole request instead)."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value:
        return None
    if all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        return [value]  # one token array
    if all(isinstance(x, str) for x in value) or all(isinstance(x, list) for x in value):
        return list(value)
    return None


def input_keys(call: Call, request: web.Request, items: list[Any]) -> list[str]:
    route, tenant, body = call.route, call.tenant, call.body
    assert route is not None and route.cache is not None and tenant is not None and body is not None
    rest = {k: v for k, v in body.items() if k not in ("input", "user")}  # `user` never changes a vector
    parts = (call.method, call.path, request.rel_url.raw_query_string)
    salt = request_key(route.cache, tenant.name, parts, body_bytes(rest, b""), request.headers,
                       call.plan.identify.passthrough_auth).encode()
    return [hashlib.sha256(salt + orjson.dumps(item)).hexdigest() for item in items]


def _read(data: bytes | None) -> Cached | None:
    if data is None:
        return None
    try:
        model, stored, embedding = orjson.loads(data)
    except (orjson.JSONDecodeError, TypeError, ValueError):
        return None
    return str(model), float(stored), embedding


async def serve(cache: ResponseCache, request: web.Request, call: Call, onward: Onward, limits: Limits, *,
                use: bool) -> web.StreamResponse | None:
    """The answer, or None when the body's `input` is not a shape cached per input."""
    assert call.body is not None and call.route is not None
    items = split(call.body.get("input"))
    if items is None:
        return None
    keys = input_keys(call, request, items)
    found: list[Cached | None] = [None] * len(keys)
    if use:
        found = [_read(d) for d in await cache.store.get_many(keys)]
    route = call.route.name
    missing = list(dict.fromkeys(k for k, f in zip(keys, found, strict=True) if f is None))
    hits = len(items) - sum(1 for f in found if f is None)
    cache.metrics.inputs.inc((route, "hit"), hits)
    cache.metrics.inputs.inc((route, "miss"), len(items) - hits)
    if not missing:
        return await _all_cached(cache, call, found, limits)
    rewritten = len(missing) < len(items)
    if rewritten:  # only the misses go upstream, each once
        first = {k: items[i] for i, k in reversed(list(enumerate(keys)))}
        body = {**call.body, "input": [first[k] for k in missing]}
        call.body, call.raw_body = body, orjson.dumps(body)
    response = await cache.onward(call, onward, "miss" if use else "bypass")
    if not response.prepared:
        response.headers[answer.INPUT_HITS_HEADER] = str(hits)
    return await _reassemble(cache, call, response, keys, found, missing, rewritten=rewritten)


async def _reassemble(cache: ResponseCache, call: Call, response: web.StreamResponse, keys: list[str],
                      found: list[Cached | None], missing: list[str], *, rewritten: bool) -> web.StreamResponse:
    """Store the vectors the upstream sent and, if only the misses were sent, answer every input in order."""
    got = _vectors(response, len(missing))
    if got is None:
        if rewritten and answer.whole_body(response) is not None and 200 <= response.status < 300:
            # The caller did not send the request this answers: half an answer would be a wrong one.
            raise UpstreamBadResponse(f"upstream '{call.upstream}' answered the {len(missing)} inputs not cached "
                                      "with a body that is not one embedding per input; nothing was stored")
        return response  # an error, or an answer to the caller's own request: relayed as it came
    parsed, vectors = got
    await _store(cache, call, response, missing, parsed.get("model"), vectors)
    if rewritten:
        fresh = dict(zip(missing, vectors, strict=True))
        parsed["data"] = [_item(i, f[2]) if f is not None else {**fresh[k], "index": i}
                          for i, (k, f) in enumerate(zip(keys, found, strict=True))]
        assert isinstance(response, web.Response)  # _vectors read its whole body
        response.body = orjson.dumps(parsed)
    return response


async def _all_cached(cache: ResponseCache, call: Call, found: list[Cached | None], limits: Limits) -> web.Response:
    """Every input was cached: answered here, with a usage of nothing (no upstream billed anything)."""
    assert call.route is not None
    vectors = [f for f in found if f is not None]
    body = {
        "object": "list",
        "data": [_item(i, f[2]) for i, f in enumerate(vectors)],
        "model": vectors[0][0],
        "usage": {"prompt_tokens": 0, "total_tokens": 0},
    }
    call.cache = "hit"
    async with limits():  # counted against the tenant's and the route's request limits
        call.mark("dispatch")
        data = orjson.dumps(body)
    now = cache.wall()
    headers = CIMultiDict({
        "Content-Type": "application/json", "x-request-id": call.request_id, "x-signalbox-route": call.route.name,
        "x-signalbox-attempts": "0", answer.CACHE_HEADER: "hit", answer.INPUT_HITS_HEADER: str(len(vectors)),
        "Age": str(int(max(0.0, now - min(f[1] for f in vectors)))),
    })
    cache.metrics.result(call.route.name, "hit")
    call.status = 200
    call.bytes_out = len(data)
    return web.Response(status=200, body=data, headers=headers)


def _item(index: int, embedding: Any) -> dict[str, Any]:
    return {"object": "embedding", "index": index, "embedding": embedding}


def _vectors(response: web.StreamResponse, expected: int) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
    """The upstream's answer and its items in input order, if it is a whole 2xx list of `expected` items."""
    body = answer.whole_body(response)
    if body is None or not 200 <= response.status < 300:
        return None
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    data = parsed.get("data") if isinstance(parsed, dict) else None
    if not isinstance(data, list) or len(data) != expected:
        return None
    if not all(isinstance(d, dict) and isinstance(d.get("index"), int) and "embedding" in d for d in data):
        return None
    ordered = sorted(data, key=lambda d: d["index"])
    if [d["index"] for d in ordered] != list(range(expected)):
        return None
    return parsed, ordered


async def _store(cache: ResponseCache, call: Call, response: web.StreamResponse, keys: list[str], model: Any,
                 vectors: list[dict[str, Any]]) -> None:
    rule = call.route.cache if call.route is not None else None
    assert rule is not None and call.route is not None
    ttl = storable_ttl(response.status, response.headers, rule.ttl)
    if ttl <= 0:
        return
    now = cache.wall()
    name = str(model) if model is not None else call.model
    items = [(k, orjson.dumps([name, now, v["embedding"]])) for k, v in zip(keys, vectors, strict=True)]
    items = [(k, d) for k, d in items if len(d) <= rule.max_entry]
    if items:
        await cache.store.put_many(items, ttl, call.route.name)
        cache.metrics.stored.inc((call.route.name,), sum(len(d) for _, d in items))
