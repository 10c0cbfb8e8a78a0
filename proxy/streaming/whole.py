"""Relays a non-streamed upstream answer: read whole within the plan's `max_buffered_response`, then
passed on as is or transformed (translated, an error normalised and redacted); a larger pass-through
answer is streamed through as it arrives, a larger one to transform is refused with a 502."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from proxy.call import Call
from proxy.errors import UpstreamBadResponse
from proxy.providers.usage import usage_of
from proxy.streaming.failure import read_failure
from proxy.streaming.oneshot import OneShot
from proxy.upstream.body import Whole, read_capped

BodyTransform = Callable[[int, bytes], tuple[int, bytes]]


async def respond_whole(
    call: Call,
    upstream: aiohttp.ClientResponse,
    headers: CIMultiDict[str],
    transform: BodyTransform | None = None,
    read_timeout: float | None = None,
    *,
    request: web.Request,
    whole: Whole | None = None,
) -> web.StreamResponse:
    """Relay a non-streamed response: status, headers and body bytes untouched unless `transform` is given
    (protocol translation, or an upstream error shape normalised). `read_timeout` bounds the body read
    when the connection has no socket read timeout (a stream request answered with a whole body).
    `whole`: what dispatch already read. A body over the plan's max_buffered_response is streamed
    through as it arrives when nothing transforms it, else refused with a 502."""
    try:
        if whole is None:
            whole = await read_body(upstream, read_timeout, call.plan.max_buffered_response)
        if not whole.complete:
            if transform is None:
                return await _pass_large(request, call, upstream, headers, whole.head)
            upstream.close()
            raise UpstreamBadResponse(too_large(call, upstream))
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise read_failure(call, exc) from None
    finally:
        upstream.release()
    body = whole.data
    status = upstream.status
    if call.want_usage and 200 <= status < 300:
        call.usage = usage_of(body)
    if transform is not None:
        status, body = transform(status, body)
        if call.exchange is None or call.exchange.provider != "http":  # a tool's error keeps its own type
            headers["Content-Type"] = "application/json"
    call.status = status
    call.bytes_out = len(body)
    return OneShot(status, body, headers)  # web.Response's bytes, written in one step


async def read_body(upstream: aiohttp.ClientResponse, limit: float | None, cap: int) -> Whole:
    if limit is None:
        return await read_capped(upstream, cap)
    async with asyncio.timeout(limit):
        return await read_capped(upstream, cap)


def too_large(call: Call, upstream: aiohttp.ClientResponse) -> str:
    return (
        f"upstream '{call.upstream}' answered {upstream.status} with a body over this proxy's "
        f"max_buffered_response ({call.plan.max_buffered_response} bytes), which it cannot translate whole"
    )


_PASS_CHUNK = 64 * 1024


async def pass_through(
    request: web.Request, call: Call, upstream: aiohttp.ClientResponse, headers: CIMultiDict[str]
) -> web.StreamResponse:
    """An answer relayed as it arrives, chunk by chunk, never buffered whole (a tool's chunked answer)."""
    try:
        return await _pass_large(request, call, upstream, headers, [])
    finally:
        upstream.release()


async def _pass_large(
    request: web.Request, call: Call, upstream: aiohttp.ClientResponse, headers: CIMultiDict[str], head: list[bytes]
) -> web.StreamResponse:
    """A pass-through answer too large to buffer: the bytes read so far, then the rest as it arrives (one
    chunk at a time: each write waits for the client). A cut upstream or an expired deadline cuts the
    client's response too (its length or chunked framing then tells the client it is incomplete)."""
    response = web.StreamResponse(status=upstream.status, headers=headers)
    if upstream.content_length is not None:
        response.content_length = upstream.content_length
    call.status = upstream.status
    await response.prepare(request)
    try:
        head.reverse()
        while head:  # each chunk is dropped once written: the memory goes as the client takes it
            chunk = head.pop()
            call.bytes_out += len(chunk)
            await response.write(chunk)
        while chunk := await upstream.content.read(_PASS_CHUNK):
            call.bytes_out += len(chunk)
            await response.write(chunk)
        await response.write_eof()
    except ConnectionResetError:
        call.client_gone = True
        upstream.close()
    except (TimeoutError, aiohttp.ClientError, asyncio.CancelledError) as exc:
        upstream.close()
        call.error = "upstream_cut"
        if request.transport is not None:
            request.transport.abort()
        if isinstance(exc, asyncio.CancelledError):
            raise
    return response
