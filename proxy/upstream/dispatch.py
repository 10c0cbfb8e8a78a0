"""Dispatch: turn a resolved `Call` into an upstream request and return the upstream's response headers.

Builds the URL, headers and body for the route's upstream, makes the attempt and records it on
the call. The body forwarded is the client's bytes unless the route rewrites the model.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import aiohttp
import orjson

from proxy.call import Attempt, Call
from proxy.errors import InvalidRequest, ProxyError
from proxy.providers import exchange as exchanges
from proxy.headers import credentials_of, upstream_headers
from proxy.policy.plan import UpstreamSpec
from proxy.upstream.client import UpstreamClients, send_once


def upstream_body(call: Call) -> bytes | None:
    """The client's bytes, re-serialised only when the route rewrites the model or translates."""
    route = call.route
    exchange = call.exchange
    if exchange is not None and exchange.kind != "pass" and call.body is not None and route is not None:
        try:
            return exchanges.request_body(exchange, call.body, route.model_rewrite or call.model)
        except exchanges.TranslationError as exc:
            raise InvalidRequest(str(exc)) from None
    if call.body is not None and route is not None and route.model_rewrite and call.body.get("model") != route.model_rewrite:
        return orjson.dumps(_with_usage({**call.body, "model": route.model_rewrite}, call.strip_usage))
    if call.strip_usage and call.body is not None:
        return orjson.dumps(_with_usage(dict(call.body), True))
    return call.raw_body if call.method not in ("GET", "HEAD", "DELETE") or call.raw_body else None


def _with_usage(body: dict[str, Any], ask: bool) -> dict[str, Any]:
    """Ask an OpenAI-compatible stream for its usage chunk (a token limit settles on it; the relay
    strips that chunk again, since the client did not ask for it: `call.strip_usage`)."""
    if ask:
        options = body.get("stream_options")
        body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    return body


async def send(
    call: Call,
    clients: UpstreamClients,
    client_headers: Mapping[str, str],
    query_string: str,
    *,
    passthrough_auth: bool,
    identify_header: str | None,
) -> aiohttp.ClientResponse:
    assert call.route is not None
    spec: UpstreamSpec = call.plan.upstreams[call.route.upstream]
    session, base_url = clients.pool(spec.name)
    call.upstream = spec.name
    try:
        call.exchange = exchanges.choose(call.path, spec.provider)
    except exchanges.Untranslatable as exc:
        raise InvalidRequest(str(exc)) from None
    headers = upstream_headers(
        client_headers.items(),
        spec,
        request_id=call.request_id,
        drop=frozenset((identify_header,)) if identify_header else frozenset(),
        client_credentials=credentials_of(client_headers) if passthrough_auth else None,
    )
    url = base_url + call.exchange.upstream_path  # base_url ends at the version segment
    query = _query(query_string, spec)
    started = time.perf_counter()
    try:
        response = await send_once(
            session,
            call.method,
            url + query,
            headers=headers,
            body=upstream_body(call),
            query=None,
            timeouts=call.route.timeouts,
            upstream=spec.name,
            stream=call.stream,
        )
    except ProxyError as exc:
        call.attempts.append(Attempt(spec.name, 0, time.perf_counter() - started, exc.reason))
        raise
    call.attempts.append(Attempt(spec.name, response.status, time.perf_counter() - started))
    call.mark("upstream_headers")
    return response


def _query(client_query: str, spec: UpstreamSpec) -> str:
    if not spec.query:
        return "?" + client_query if client_query else ""
    from urllib.parse import urlencode

    extra = urlencode(spec.query)
    return "?" + (client_query + "&" + extra if client_query else extra)
