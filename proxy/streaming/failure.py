"""How a relayed response ends when something breaks: the error a failed upstream read becomes, and the one
error event that closes a stream in the client's protocol."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web

from proxy.call import Call
from proxy.errors import ProxyError, UpstreamTimeout, UpstreamUnreachable, stream_error_frame


async def finish_with_error(response: web.StreamResponse, call: Call, error: ProxyError) -> None:
    call.error = error.reason
    call.failure = error  # the client's outcome: a stream that ends with an error event is not a success
    try:
        await response.write(stream_error_frame(error, call.protocol, call.request_id))
        await response.write_eof()
    except ConnectionResetError:
        call.client_gone = True


def read_failure(call: Call, exc: BaseException) -> ProxyError:
    if isinstance(exc, asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        return UpstreamTimeout(f"upstream '{call.upstream}' stopped sending (read timeout)")
    return UpstreamUnreachable(f"upstream '{call.upstream}' broke the connection mid-response ({type(exc).__name__})")
