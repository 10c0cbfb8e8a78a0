"""A whole answer taken from the response's reader at once (`body.arrived`, no read loop) is what aiohttp's
`read()` gives and keeps, and is taken only when all of it came with the head and fits the cap; the
connection goes back to the pool either way. A real upstream on loopback, in one piece, in two pieces
apart, or chunked; and a connection's read timer that serves a later response with a shorter limit."""

from __future__ import annotations

import asyncio
import random

import pytest
from aiohttp import web

from proxy.upstream.body import arrived, read_capped
from proxy.upstream.client import LazyReadTimer, open_session, send_once
from tests.kit.servers import Loopback

CAP = 1000


async def _upstream(loopback: Loopback, peers: list[object]) -> str:
    async def answer(request: web.Request) -> web.StreamResponse:
        peers.append(request.transport.get_extra_info("peername") if request.transport else None)
        body = bytes(random.Random(request.query["size"]).randbytes(int(request.query["size"])))
        mode = request.query["mode"]
        if mode == "one":
            return web.Response(body=body, content_type="application/json")
        response = web.StreamResponse()
        if mode == "two":
            response.content_length = len(body)
        else:
            response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(body[: len(body) // 2])
        await asyncio.sleep(0.05)  # the rest comes later: the reader is not at its end at the head
        await response.write(body[len(body) // 2:])
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/x", answer)
    return await loopback.serve(app)


@pytest.mark.parametrize(("mode", "size"), [
    ("one", 0), ("one", 1), ("one", 600), ("one", CAP), ("one", CAP + 1), ("one", 20_000),
    ("two", 600), ("two", 20_000), ("chunked", 600),
])
async def test_an_answer_that_came_whole_is_what_read_gives(loopback: Loopback, mode: str, size: int) -> None:
    peers: list[object] = []
    root = await _upstream(loopback, peers)
    expected = bytes(random.Random(str(size)).randbytes(size))
    session = open_session(4, 4.0)
    try:
        for _ in range(2):  # the second request: on the connection the first gave back
            response = await send_once(session, "POST", f"{root}/v1/x?mode={mode}&size={size}", headers={},
                                       body=b"{}", query=None, connect=5, first_token=5, upstream="up")
            whole = arrived(response, CAP)
            if mode == "one" and size <= CAP:
                assert whole is not None and whole.complete and whole.data == expected
                assert await response.read() == expected  # kept as read() keeps it
            else:  # not all there yet, over the cap, or no Content-Length: read as before
                assert whole is None
                whole = await read_capped(response, CAP)
                assert whole.complete == (size <= CAP)
                if whole.complete:
                    assert whole.data == expected
                await response.read()
            response.release()
        assert len(peers) == 2 and peers[0] == peers[1]
    finally:
        await session.close()


async def test_a_later_response_with_a_shorter_limit_is_timed_by_it() -> None:
    """The connection's timer outlives a response; a later one whose deadline comes sooner re-arms it."""
    loop = asyncio.get_running_loop()
    protocol = LazyReadTimer(loop=loop)
    fired: list[float] = []
    protocol._on_read_timeout = lambda: fired.append(loop.time())  # type: ignore[method-assign]
    protocol.read_timeout = 30.0
    protocol._reschedule_timeout()  # a first response, limit 30 s
    protocol._drop_timeout()  # its end: the timer stays, its deadline is off
    assert protocol._read_timeout_handle is not None
    protocol.read_timeout = 0.2
    started = loop.time()
    protocol._reschedule_timeout()  # the next response on the connection, limit 0.2 s
    await asyncio.sleep(0.6)
    assert len(fired) == 1 and fired[0] >= started + 0.2 - 0.002
    protocol._drop_timeout()
    protocol.read_timeout = 0.1
    protocol._reschedule_timeout()
    protocol._drop_timeout()  # ended before its limit: nothing fires, and the timer ends itself
    await asyncio.sleep(0.3)
    assert len(fired) == 1 and protocol._read_timeout_handle is None
    protocol.close()


async def test_a_connection_keeps_its_parser_for_responses_of_the_same_kind(loopback: Loopback) -> None:
    """One connection, answers of every kind in turn: each read right (a HEAD's Content-Length announces a body
    that never comes), the parser kept from one response to the next only when it was made for the same kind
    (HEAD-like or not, a stream's reader size or a whole answer's); a connection taken from the pool is marked
for a stream or not as one connect() made."""

    async def answer(request: web.Request) -> web.Response:
        return web.Response(body=b"hello " + request.method.encode())

    app = web.Application()
    app.router.add_route("*", "/v1/x", answer)
    url = await loopback.serve(app) + "/v1/x"
    session = open_session(1, 4.0)
    kinds = [("POST", False), ("POST", False), ("HEAD", False), ("HEAD", False), ("GET", False),
             ("POST", True), ("POST", True), ("HEAD", False), ("POST", False)]
    parsers: list[object] = []
    narrowed: list[bool] = []
    try:
        for method, stream in kinds:
            response = await send_once(session, method, url, headers={}, body=b"{}" if method == "POST" else None,
                                       query=None, connect=5, first_token=2, upstream="up", stream=stream)
            assert await response.read() == (b"" if method == "HEAD" else b"hello " + method.encode())
            response.release()
            (pooled,) = session.connector._conns.values()  # type: ignore[union-attr]  # the one connection, idle
            ((protocol, _),) = pooled
            parsers.append(protocol._parser)
            narrowed.append(protocol.narrowed)  # a stream's SO_RCVBUF while it streams, given back after
    finally:
        await session.close()
    same = [parsers[i] is parsers[i - 1] for i in range(1, len(parsers))]
    assert same == [True, False, True, False, False, True, False, False]
    assert narrowed == [stream for _, stream in kinds]


async def test_the_reader_is_left_as_read_nowait_leaves_it(loopback: Loopback) -> None:
    """What `arrived` takes without `read_nowait()`: the reader after it is the reader after `read_nowait()`
    (its buffer, size and position), on the same kind of answer."""
    root = await _upstream(loopback, [])
    session = open_session(2, 4.0)
    states = []
    try:
        for take in (True, False):
            response = await send_once(session, "POST", f"{root}/v1/x?mode=one&size=600", headers={}, body=b"{}",
                                       query=None, connect=5, first_token=5, upstream="up")
            content = response.content
            assert content.is_eof() and content._size == 600  # (the shape `arrived` takes)
            data = arrived(response, CAP).data if take else content.read_nowait()  # type: ignore[union-attr]
            states.append((data, list(content._buffer), content._size, content._cursor, content.at_eof()))
            response.release()
    finally:
        await session.close()
    assert states[0] == states[1]
    assert states[0][1:] == ([], 0, 600, True)


async def test_an_answer_without_a_body_is_taken_as_read_gives_it(loopback: Loopback) -> None:
    """A HEAD's answer (its Content-Length announces a body that never comes) and a 204: aiohttp's empty
    reader, which `arrived` reads as `read()` does."""

    async def answer(request: web.Request) -> web.Response:
        if request.method == "HEAD":
            return web.Response(body=b"0123456789")
        return web.Response(status=204)

    app = web.Application()
    app.router.add_route("*", "/v1/x", answer)
    url = await loopback.serve(app) + "/v1/x"
    session = open_session(1, 4.0)
    try:
        for method in ("HEAD", "DELETE", "HEAD"):
            response = await send_once(session, method, url, headers={}, body=None, query=None, connect=5,
                                       first_token=5, upstream="up")
            assert response.status == (200 if method == "HEAD" else 204)
            if method == "HEAD":
                assert response.content_length == 10
            whole = arrived(response, CAP)
            if response.content_length is not None:
                assert whole is not None and whole.complete and whole.data == b""
            assert await response.read() == b""
            response.release()
    finally:
        await session.close()
