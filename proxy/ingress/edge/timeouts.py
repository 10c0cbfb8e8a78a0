"""The timed read of a request body, which enforces the body limits of `ClientTimeouts` (their defaults
and why: proxy/runtime.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import StreamReader
from aiohttp.web import RequestPayloadError

from proxy.errors import MalformedRequest, ProxyError, RequestTimeout
from proxy.runtime import ClientTimeouts

CLOSE = {"connection": "close"}
"""On an answer whose request's bytes were not all read: the connection cannot carry another request."""


async def read_body(
    content: StreamReader, limit: int, too_large: Callable[[int], ProxyError], timeouts: ClientTimeouts
) -> bytes:
    """The whole body, at most `limit` bytes, within the body timeouts. A body that came with the head
    (most requests) is taken without a timer."""
    if content.is_eof():
        return read_ready(content, limit, too_large)
    try:
        return await _read_timed(content, limit, too_large, timeouts)
    except RequestPayloadError:
        raise _malformed() from None


def read_ready(content: StreamReader, limit: int, too_large: Callable[[int], ProxyError]) -> bytes:
    """A body that is all there (`content.is_eof()`): taken at once, without a coroutine or a timer."""
    try:
        data = content.read_nowait()
    except RequestPayloadError:
        raise _malformed() from None
    if len(data) > limit:
        raise too_large(len(data))
    return data


def _malformed() -> MalformedRequest:
    """Bad chunk framing or Content-Encoding (the parser's words may quote bytes, so they are not used)."""
    return MalformedRequest(
        "the request body could not be read: its chunked encoding or Content-Encoding is invalid",
        headers=dict(CLOSE),
    )


async def _read_timed(
    content: StreamReader, limit: int, too_large: Callable[[int], ProxyError], timeouts: ClientTimeouts
) -> bytes:
    loop = asyncio.get_running_loop()
    last = loop.time() + timeouts.body
    chunks: list[bytes] = []
    size = 0
    when = min(loop.time() + timeouts.body_idle, last)
    try:
        # One timer for the whole read, moved on at each chunk: the sooner of the idle and total limits.
        async with asyncio.timeout_at(when) as clock:
            while chunk := await content.readany():
                size += len(chunk)
                if size > limit:
                    raise too_large(size)
                chunks.append(chunk)
                when = min(loop.time() + timeouts.body_idle, last)
                clock.reschedule(when)
    except TimeoutError:
        raise _too_slow(when == last, timeouts) from None
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _too_slow(total: bool, timeouts: ClientTimeouts) -> RequestTimeout:
    if total:
        what = f"the request body took longer than {timeouts.body:g} s to arrive (serve --body-timeout)"
    else:
        what = f"the request body stalled: no byte for {timeouts.body_idle:g} s (serve --body-idle-timeout)"
    return RequestTimeout(f"{what}; send the body without pauses", headers=dict(CLOSE))
