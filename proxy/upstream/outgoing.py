"""What one attempt sends: the upstream URL, headers and body for a deployment, built once per call
and upstream (the attempt itself is attempt.py, through client.send_once). The body forwarded is
the client's bytes unless a deployment rewrites the model or the protocol differs."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Mapping
from typing import Any

import aiohttp
import orjson

from proxy.call import Call
from proxy.errors import InvalidRequest, UpstreamTimeout, UpstreamUnreachable
from proxy.policy.plan import DeploymentSpec, UpstreamSpec
from proxy.providers import exchange as exchanges
from proxy.providers import multipart
from proxy.providers.exchange import Exchange
from proxy.upstream.body import Whole, read_capped
from proxy.upstream.client import UpstreamClients
from proxy.upstream.headers import credentials_of, upstream_headers


def upstream_body(call: Call, model_rewrite: str | None = None) -> bytes | None:
    """The client's bytes, re-serialised only when the deployment rewrites the model or translates."""
    exchange = call.exchange
    if exchange is not None and exchange.kind != "pass" and call.body is not None:
        try:
            default_max = call.route.anthropic_max_tokens if call.route is not None else exchanges.DEFAULT_MAX_TOKENS
            return exchanges.request_body(exchange, call.body, model_rewrite or call.model, default_max)
        except exchanges.TranslationError as exc:
            raise InvalidRequest(exc.message, param=exc.param) from None
    if model_rewrite or call.strip_usage:  # else (most calls) nothing below can apply: the client's bytes
        rewritten = _rewritten(call, model_rewrite)
        if rewritten is not None:
            return rewritten
    return call.raw_body if call.method not in ("GET", "HEAD", "DELETE") or call.raw_body else None


def _rewritten(call: Call, model_rewrite: str | None) -> bytes | None:
    """A pass-through body with the model renamed or usage asked for; None: the client's bytes go as they are."""
    if call.body is not None and model_rewrite and call.body.get("model") != model_rewrite:
        return orjson.dumps(_with_usage({**call.body, "model": model_rewrite}, call.strip_usage))
    if call.strip_usage and call.body is not None:
        return orjson.dumps(_with_usage(dict(call.body), True))
    if call.form_model is not None and model_rewrite and model_rewrite != call.model:
        return multipart.with_field(call.raw_body, call.form_model, model_rewrite)
    return None


def _with_usage(body: dict[str, Any], ask: bool) -> dict[str, Any]:
    """Ask an OpenAI-compatible stream for its usage chunk (a token limit settles on it; the relay
    strips that chunk again, since the client did not ask for it: `call.strip_usage`)."""
    if ask:
        options = body.get("stream_options")
        body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    return body


_STREAM_USAGE_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})


def wants_stream_usage(call: Call, provider: str) -> bool:
    """Should the proxy add `stream_options.include_usage` upstream (and strip that chunk again)?

    Only for OpenAI-protocol streams to OpenAI-compatible upstreams, when the client did not ask.
    """
    body = call.body
    if not call.stream or body is None or call.protocol != "openai" or provider not in ("openai", "mock"):
        return False
    if call.path not in _STREAM_USAGE_PATHS:
        return False
    options = body.get("stream_options")
    return options is None or (isinstance(options, dict) and options.get("include_usage") is not True)


class Outgoing:
    """What every attempt of one call shares; headers and body are built once per upstream/model.

    No `__slots__`: the caches start as class defaults (empty), so making one costs four stores."""

    _headers_for = ""
    """The upstream `_headers` were built for ("": none yet)."""
    _headers: dict[str, str]
    _body_key: tuple[str | None, str, bool] | None = None
    _body: bytes | None = None

    def __init__(
        self,
        call: Call,
        clients: UpstreamClients,
        client_headers: Mapping[str, str],
        query_string: str,
    ) -> None:
        self.call = call
        self.clients = clients
        self.client_headers = client_headers
        self.query_string = query_string

    def headers(self, spec: UpstreamSpec) -> dict[str, str]:
        if self._headers_for != spec.name:
            identify = self.call.plan.identify  # what it drops and passes on was worked out with the plan
            self._headers = upstream_headers(
                self.client_headers.items(),
                spec,
                request_id=self.call.request_id,
                drop=identify.drop_upstream,
                client_credentials=credentials_of(self.client_headers) if identify.passthrough_auth else None,
            )
            self._headers_for = spec.name
        return self._headers

    def body(self, model: str | None, exchange: Exchange) -> bytes | None:
        key = (model, exchange.kind, self.call.strip_usage)
        if self._body_key != key:
            self._body = upstream_body(self.call, model)
            self._body_key = key
        return self._body

    def prepare(self, deployment: DeploymentSpec) -> tuple[aiohttp.ClientSession, str, dict[str, str], bytes | None]:
        """What one attempt on the deployment sends: the session, URL, headers and body (and the call learns
        its upstream and exchange). A plain call, so sending adds no coroutine of its own to the path."""
        call = self.call
        spec = call.plan.upstreams[deployment.upstream]
        session, base_url = self.clients.pool(spec.name)
        call.upstream = spec.name
        try:
            prefix = call.route.tool_prefix if call.route is not None else None
            exchange = _choose(call.path, spec.provider) if prefix is None else exchanges.tool(call.path, prefix)
        except exchanges.Untranslatable as exc:
            raise InvalidRequest(str(exc)) from None
        call.exchange = exchange
        if call.want_usage:  # per attempt: a pool or a fallback may mix providers
            call.strip_usage = wants_stream_usage(call, spec.provider)
        headers = self.headers(spec)
        body = self.body(deployment.model, exchange)
        url = base_url + exchange.upstream_path + _query(self.query_string, spec)  # base_url ends at /v1
        return session, url, headers, body


async def read_whole(response: aiohttp.ClientResponse, upstream: str, limit: float | None, cap: int) -> Whole:
    """Read a whole answer, up to `cap` bytes (the rest of a larger one stays on the connection for the
    relay). Socket reads are bounded by first_token; `limit` (what is left of the deadline, when nearer) too."""
    try:
        if limit is None:
            return await read_capped(response, cap)
        async with asyncio.timeout(limit):
            return await read_capped(response, cap)
    except aiohttp.ServerTimeoutError:
        response.close()
        raise UpstreamTimeout(f"upstream '{upstream}' stopped sending mid-response") from None
    except TimeoutError:
        response.close()
        raise UpstreamTimeout("the request ran past its total deadline (timeouts.total)") from None
    except aiohttp.ClientError as exc:
        response.close()
        raise UpstreamUnreachable(
            f"upstream '{upstream}' broke the connection mid-response ({type(exc).__name__})"
        ) from None


_choose = functools.lru_cache(maxsize=256)(exchanges.choose)
"""The exchange for a front path and a provider: the same few pairs over and over (an Untranslatable
pair raises each time: lru_cache keeps no exceptions)."""


def _query(client_query: str, spec: UpstreamSpec) -> str:
    if not spec.query:
        return "?" + client_query if client_query else ""
    from urllib.parse import urlencode

    extra = urlencode(spec.query)
    return "?" + (client_query + "&" + extra if client_query else extra)
