"""`OneShot` (proxy/streaming/oneshot.py) against `web.Response`, byte for byte on a raw socket: over generated
statuses, headers, bodies, methods, HTTP versions and client Connection headers, the two answers (and
whether the connection stays open for the next request) are the same but for the Date aiohttp stamps. An
aiohttp upgrade that changes what its Response writes, or moves the internals OneShot uses, fails here."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_writer import StreamWriter
from aiohttp.web_request import BaseRequest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from proxy.ingress.edge.connection import GuardedRunner
from proxy.runtime import ClientTimeouts
from proxy.streaming.oneshot import OneShot

pytestmark = pytest.mark.timeout(120)

GIVEN_DATE = "Thu, 01 Jan 1970 00:00:00 GMT"
_STAMPED = re.compile(rb"\r\nDate: (?!" + GIVEN_DATE.encode() + rb")[^\r]*")


class Spy(OneShot):
    """Notes whether the one-step path was taken (the bytes are what the test compares)."""

    fast: list[bool] = []

    async def _send(
        self, request: BaseRequest, writer: StreamWriter, body: bytes, headers: CIMultiDict[str]
    ) -> AbstractStreamWriter:
        assert writer._on_headers_sent is None and writer._on_chunk_sent is None  # what OneShot relies on
        Spy.fast.append(True)
        return await super()._send(request, writer, body, headers)


@dataclass(frozen=True)
class Case:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


CASES: dict[str, Case] = {}


async def _answer(request: web.Request) -> web.StreamResponse:
    case = CASES[request.match_info["id"]]
    headers = CIMultiDict(case.headers)
    if request.match_info["kind"] == "oneshot":
        return Spy(case.status, case.body, headers)
    return web.Response(status=case.status, body=case.body, headers=headers)


async def _end(request: web.Request) -> web.Response:
    return web.Response(text="end")


async def _hook(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["X-Prepared"] = str(response.prepared)  # the hook runs before the head is written


@pytest.fixture
async def port() -> AsyncIterator[int]:
    app = web.Application()
    app.router.add_route("*", "/{kind}/{id}", _answer)
    app.router.add_get("/end", _end)
    app.on_response_prepare.append(_hook)
    runner = GuardedRunner(app, ClientTimeouts(), access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    finally:
        await runner.cleanup()


async def _exchange(port: int, head: bytes, kept: bool) -> bytes:
    """Send `head` and, if the connection is to stay open (`kept`), a last request on it; everything read
    until the server closes (a server that keeps a connection open that it should close fails the test)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + (b"GET /end HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n" if kept else b""))
        async with asyncio.timeout(10):
            return _STAMPED.sub(b"\r\nDate: *", await reader.read(-1))
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


NAMES = ("Content-Type", "X-Request-Id", "Retry-After", "Server", "Connection", "Date", "x-signalbox-upstream",
         "Cache-Control", "Set-Cookie", "content-type")
VALUES = st.text("abcXYZ019-_;=/ ", min_size=1, max_size=12).map(str.strip).filter(bool)
HEADERS = st.lists(st.tuples(st.sampled_from(NAMES), VALUES), max_size=5)
BODIES = st.one_of(st.binary(max_size=40), st.just(b""), st.just(b'{"id": 1}' * 300))  # > 2 KiB: writelines
STATUSES = st.sampled_from([200, 201, 204, 299, 304, 400, 401, 404, 413, 429, 500, 502, 503, 504, 599])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    status=STATUSES, headers=HEADERS, body=BODIES, length=st.booleans(), date=st.booleans(),
    method=st.sampled_from(["POST", "GET", "HEAD", "DELETE"]), version=st.sampled_from(["1.1", "1.0"]),
    connection=st.sampled_from(["", "Connection: close\r\n", "Connection: keep-alive\r\n"]),
)
async def test_oneshot_writes_what_web_response_writes(
    port: int, status: int, headers: list[tuple[str, str]], body: bytes, length: bool, date: bool, method: str,
    version: str, connection: str,
) -> None:
    if length:
        headers = [*headers, ("Content-Length", str(len(body)))]
    if date:
        headers = [*headers, ("Date", GIVEN_DATE)]
    key = str(len(CASES))
    CASES[key] = Case(status, tuple(headers), body)
    Spy.fast.clear()
    sent = {kind: f"{method} /{kind}/{key} HTTP/{version}\r\nHost: t\r\n{connection}\r\n".encode()
            for kind in ("oneshot", "response")}
    kept = "keep-alive" in connection if version == "1.0" else "close" not in connection
    ours = await _exchange(port, sent["oneshot"], kept)
    theirs = await _exchange(port, sent["response"], kept)
    assert ours == theirs
    plain = version == "1.1" and "close" not in connection and method != "HEAD" and status not in (204, 304)
    assert Spy.fast == ([True] if plain and not length else [])  # the common case takes the one-step path


_KEY = web.ResponseKey("key", int)
_FIELDS = ("status", "reason", "body", "keep_alive", "prepared", "chunked", "compression", "body_length",
           "content_length", "content_type", "charset", "last_modified", "task")


@settings(max_examples=200, deadline=None)
@given(status=STATUSES | st.integers(100, 999), headers=HEADERS, body=BODIES)
def test_a_oneshot_is_built_as_web_response_builds_it(status: int, headers: list[tuple[str, str]], body: bytes) -> None:
    ours = OneShot(status, body, CIMultiDict(headers))
    theirs = web.Response(status=status, body=body, headers=CIMultiDict(headers))
    assert {name: getattr(ours, name) for name in _FIELDS} == {name: getattr(theirs, name) for name in _FIELDS}
    assert list(ours.headers.items()) == list(theirs.headers.items()) and len(ours) == len(theirs) == 0
    fields = set(vars(ours)) | set(vars(theirs))  # what either sets; the rest reads class-level defaults
    assert {name: getattr(ours, name) for name in fields} == {name: getattr(theirs, name) for name in fields}
    ours[_KEY] = theirs[_KEY] = 1  # each its own state mapping
    assert list(ours.items()) == list(theirs.items()) == [(_KEY, 1)]
    assert OneShot(status, body, CIMultiDict())._state is not ours._state
