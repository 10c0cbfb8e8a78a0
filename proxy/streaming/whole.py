"""Relays a non-streamed upstream response: status, headers and the body bytes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict

from proxy.call import Call
from proxy.streaming.failure import read_failure as _read_failure

BodyTransform = Callable[[int, bytes], tuple[int, bytes]]


async def respond_whole(
    call: Call,
    upstream: aiohttp.ClientResponse,
    headers: CIMultiDict[str],
    transform: BodyTransform | None = None,
    read_timeout: float | None = None,
) -> web.Response:
    """Relay a non-streamed response: status, headers and body bytes untouched unless `transform` is given
    (protocol translation, or an upstream error shape normalised). `read_timeout` bounds the body read
    when the connection has no socket read timeout (a stream request answered with a whole body)."""
    try:
        body = await _read(upstream, read_timeout)
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise _read_failure(call, exc) from None
    finally:
        upstream.release()
    status = upstream.status
    if call.want_usage and 200 <= status < 300:
        call.usage = _usage_of_body(body)
    if transform is not None:
        status, body = transform(status, body)
        headers["Content-Type"] = "application/json"
    call.status = status
    call.bytes_out = len(body)
    return web.Response(status=status, body=body, headers=headers)


async def _read(upstream: aiohttp.ClientResponse, limit: float | None) -> bytes:
    if limit is None:
        return await upstream.read()
    async with asyncio.timeout(limit):
        return await upstream.read()


def _usage_of_body(body: bytes) -> dict[str, Any] | None:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    usage = parsed.get("usage") if isinstance(parsed, dict) else None
    return usage if isinstance(usage, dict) else None
