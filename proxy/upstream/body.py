"""Reading a whole (non-streamed) upstream answer within the policy's `max_buffered_response`.

An answer that fits is read into memory (to retry a cut one, translate or normalise it); one that
does not is left on the connection, its head (at most the cap) kept, for the relay to stream through
(a pass-through success) or refuse with a 502 (an answer that must be transformed).
"""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp.streams import StreamReader

from proxy.errors import UpstreamBadResponse

_ERROR_BODY_WAIT = 10.0
"""Longest read of a retriable error's body (kept to relay if no retry succeeds)."""


class Whole:
    """`data`: the whole body when `complete`. `head`: when not `complete`, what was read before the cap was
    reached, as read (not joined: no second copy), emptied by whoever relays it. A plain `__slots__` class:
    one is made per non-streamed answer (a frozen dataclass with a default_factory cost ~35 bytecodes)."""

    __slots__ = ("complete", "data", "head")
    data: bytes
    complete: bool
    head: list[bytes]

    def __init__(self, data: bytes, complete: bool, head: list[bytes] | None = None) -> None:
        self.data = data
        self.complete = complete
        self.head = [] if head is None else head


def arrived(response: aiohttp.ClientResponse, cap: int) -> Whole | None:
    """The whole body, without a wait, when it has all come in already with the head (a small answer whose
    Content-Length fits in `cap`: its bytes sit parsed in the response's reader, which is at its end); else
    None, and `read_capped` reads it. What `response.read()` returns and keeps, without its read loop and
    coroutines (aiohttp's reader already gave the connection back at the body's end)."""
    content = response.content
    if not content.is_eof() or response._body is not None or response._writer is not None:
        return None  # (a body aiohttp still writes: its read() waits for that)
    length = response.content_length
    if length is None or length > cap:
        return None
    if (type(content) is StreamReader and content._exception is None and not content._buffer_offset
            and content._http_chunk_splits is None and not content._protocol._reading_paused):  # (not EMPTY_PAYLOAD)
        data = _take(content)
    else:
        try:
            data = content.read_nowait()  # raises the reader's error as read() does
        except BaseException:
            response.close()
            raise
    response._body = data
    return Whole(data, True)


def _take(content: StreamReader) -> bytes:
    """What `read_nowait()` returns of a reader at its end that nothing has read from (no error, not chunked,
    its protocol not paused), and the reader left as it leaves it, without its `resume_reading()` per chunk:
    for a protocol that is not paused that call only feeds the parser b"" and resumes a transport that reads
    (~150 bytecodes of aiohttp's for nothing)."""
    buffer = content._buffer
    data = buffer[0] if len(buffer) == 1 else b"".join(buffer)
    buffer.clear()
    size = len(data)
    content._size -= size
    content._cursor += size
    return data


async def read_capped(response: aiohttp.ClientResponse, cap: int) -> Whole:
    """The body when it fits in `cap` bytes; else what was read of it, the rest left unread.

    A declared Content-Length over the cap reads nothing. Raises what reading raises (aiohttp's
    ClientError, a timeout from the caller's bound)."""
    length = response.content_length
    if length is not None:
        if length > cap:
            return Whole(b"", False)
        return Whole(await response.read(), True)  # aiohttp reads exactly Content-Length bytes
    chunks: list[bytes] = []
    size = 0
    content = response.content
    while True:
        chunk = await content.readany()
        if not chunk:
            break
        size += len(chunk)
        chunks.append(chunk)
        if size > cap:
            return Whole(b"", False, chunks)
    return Whole(chunks[0] if len(chunks) == 1 else b"".join(chunks), True)


async def read_all(response: aiohttp.ClientResponse, cap: int, already: Whole | None, upstream: str) -> bytes:
    """The whole body: what was `already` read of it, or read now. For callers that need the answer
    whole (a batched call split back per caller): one over `cap` is refused with a 502."""
    whole = already if already is not None else await read_capped(response, cap)
    if not whole.complete:
        response.close()
        raise UpstreamBadResponse(f"upstream '{upstream}' answered a body over max_buffered_response ({cap} bytes)")
    return whole.data


async def read_error(response: aiohttp.ClientResponse, left: float, cap: int) -> Whole | None:
    """Read a retriable error's body (kept, so it can still be relayed); at the end of the body aiohttp
    returns the connection to the pool for the retry. One over `cap` is closed at once and kept
    incomplete (the relay answers 502 for it); None (closed) if it could not be read within `left`."""
    try:
        async with asyncio.timeout(max(0.001, min(_ERROR_BODY_WAIT, left))):
            whole = await read_capped(response, cap)
    except (TimeoutError, aiohttp.ClientError):
        response.close()
        return None
    if not whole.complete:
        response.close()
    return whole
