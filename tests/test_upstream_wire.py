"""The hand-written attempt (proxy/upstream/wire.py) against `ClientSession.request`, byte for byte on a raw
socket: the same request head and body over generated requests, the same resend of an idempotent request on
a dropped connection, the same connection closed on cancellation. An aiohttp upgrade that changes what its
client sends, or moves the internals wire.py uses, fails here."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from aiohttp.client_reqrep import ClientRequest
from hypothesis import given, settings
from hypothesis import strategies as st
from kit import until
from yarl import URL

from proxy.errors import UpstreamUnreachable
from proxy.tasks import spawn
from proxy.upstream import wire
from proxy.upstream.client import PoolConnector, open_session, send_once

pytestmark = pytest.mark.timeout(60)

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"
LIMITS = aiohttp.ClientTimeout(total=None, connect=None, sock_connect=5, sock_read=5)


class Capture:
    """A keep-alive HTTP/1.1 server that records each request's bytes (head and Content-Length body) and
    answers `reply`, or drops the first `drop` requests' connections before answering."""

    def __init__(self, drop: int = 0, reply: bytes = OK) -> None:
        self.seen: list[bytes] = []
        self.drop = drop
        self.reply = reply
        self.closed = asyncio.Event()
        self.server: asyncio.Server | None = None

    def url(self, path: str) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}{path}"

    async def __aenter__(self) -> Capture:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                self.seen.append(head + await reader.readexactly(length))
                if self.drop:
                    self.drop -= 1
                    return
                if self.reply:
                    is_head = head.startswith(b"HEAD ")
                    writer.write(self.reply.split(b"\r\n\r\n")[0] + b"\r\n\r\n" if is_head else self.reply)
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed.set()
        finally:
            writer.close()


FRAMING = {"content-length", "transfer-encoding", "expect"}  # sent as given they break the exchange: see below
NAMES = st.sampled_from([
    "accept", "Accept", "user-agent", "User-Agent", "content-type", "Content-Type", "accept-encoding",
    "Accept-Encoding", "authorization", "x-request-id", "cookie", "Cookie", "connection", "content-encoding",
    "openai-beta", "OpenAI-Beta", "x-api-key", "host", "Host",
]) | st.from_regex(r"\A[A-Za-z][A-Za-z0-9-]{0,12}\Z").filter(lambda n: n.lower() not in FRAMING)
VALUES = st.from_regex(r"\A[!-~]([ -~]{0,20}[!-~])?\Z").filter(lambda v: v.lower() != "100-continue")
BODIES = st.one_of(st.none(), st.just(b""), st.binary(max_size=80), st.just(b"x" * (wire.MAX_BODY + 1)))
Case = tuple[str, str, dict[str, str], bytes | None]
CASES = st.tuples(
    st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "post"]),
    st.sampled_from(["/v1/chat/completions", "/v1/x?a=1&b=%20c", "/v1/models/gpt-4o", "/"]),
    st.dictionaries(NAMES, VALUES, max_size=8),
    BODIES,
)


async def _aiohttp_path(session: aiohttp.ClientSession, method: str, url: str, headers: dict[str, str],
                        body: bytes | None) -> None:
    async with session.request(method, URL(url, encoded=True), data=body, headers=headers, timeout=LIMITS,
                               allow_redirects=False) as response:
        await response.read()


async def _wire_path(session: aiohttp.ClientSession, method: str, url: str, headers: dict[str, str],
                     body: bytes | None) -> None:
    response = await send_once(session, method, url, headers=headers, body=body, query=None, connect=5,
                               first_token=5, upstream="up")
    await response.read()
    response.release()


async def _both(cases: list[Case]) -> None:
    async with Capture() as capture:
        session = open_session(4, 4.0)
        try:
            for method, path, headers, body in cases:
                url = capture.url(path)
                await _aiohttp_path(session, method, url, headers, body)
                await _wire_path(session, method, url, headers, body)
                theirs, ours = capture.seen[-2:]
                assert ours == theirs, (method, path, headers, body)
                names = {n.lower() for n in headers}
                small = body is None or len(body) <= wire.MAX_BODY
                modelled = "host" not in names and len(names) == len(headers) and small
                assert (wire.head(wire.target(url), method.upper(), headers, body) is not None) == modelled
        finally:
            await session.close()


@settings(max_examples=40, deadline=None)
@given(st.lists(CASES, min_size=1, max_size=12))
def test_the_wire_path_sends_the_bytes_aiohttp_sends(cases: list[Case]) -> None:
    asyncio.run(_both(cases))


async def _target(url: str) -> wire.Target:
    return wire.target(url)  # (its connection key is made on the loop)


@given(st.sampled_from(sorted(FRAMING)), st.dictionaries(NAMES, VALUES, max_size=4), VALUES)
def test_a_framing_header_of_the_callers_is_left_to_aiohttp(name: str, headers: dict[str, str], value: str) -> None:
    where = asyncio.run(_target("http://127.0.0.1:9/v1/x"))
    assert wire.head(where, "POST", {**headers, name.title(): value}, b"{}") is None


async def test_what_a_proxied_request_carries_goes_out_as_aiohttp_sent_it() -> None:
    """The shape upstream_headers builds (lowercase names, identity encoding, our user agent) and a JSON body."""
    headers = {"content-type": "application/json", "openai-beta": "assistants=v2", "authorization": "Bearer k",
               "accept-encoding": "identity", "x-request-id": "r1", "user-agent": "signalbox"}
    await _both([("POST", "/v1/chat/completions", headers, b'{"model":"m"}'), ("GET", "/v1/models", headers, None)])


async def test_only_requests_wire_does_not_model_take_aiohttps_request() -> None:
    started: list[str] = []

    async def on_start(_s: object, _c: object, params: aiohttp.TraceRequestStartParams) -> None:
        started.append(params.method)

    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(on_start)
    async with Capture() as capture:
        async with aiohttp.ClientSession(connector=PoolConnector(), trace_configs=[trace]) as session:
            await _wire_path(session, "POST", capture.url("/v1/a"), {"x-a": "1"}, b"{}")
            await _wire_path(session, "POST", capture.url("/v1/b"), {"Host": "elsewhere"}, b"{}")
            await _wire_path(session, "PUT", capture.url("/v1/c"), {"x-a": "1"}, b"x" * (wire.MAX_BODY + 1))
    assert started == ["POST", "PUT"]
    assert len(capture.seen) == 3 and b"\r\nHost: elsewhere\r\n" in capture.seen[1]


Path = Callable[[aiohttp.ClientSession, str, str, dict[str, str], bytes | None], Awaitable[None]]


@pytest.mark.parametrize("path", [_aiohttp_path, _wire_path], ids=["aiohttp", "wire"])
async def test_an_idempotent_request_is_resent_once_on_a_fresh_connection_dropped_without_answer(path: Path) -> None:
    async with Capture(drop=1) as capture:
        async with open_session(4, 4.0) as session:
            await path(session, "GET", capture.url("/v1/models"), {}, None)
    assert len(capture.seen) == 2 and capture.seen[0] == capture.seen[1]


@pytest.mark.parametrize("path", [_aiohttp_path, _wire_path], ids=["aiohttp", "wire"])
async def test_a_post_is_not_resent_on_a_fresh_connection_dropped_without_answer(path: Path) -> None:
    async with Capture(drop=1) as capture:
        async with open_session(4, 4.0) as session:
            with pytest.raises((aiohttp.ServerDisconnectedError, UpstreamUnreachable)):
                await path(session, "POST", capture.url("/v1/chat/completions"), {}, b"{}")
    assert len(capture.seen) == 1


@pytest.mark.parametrize("path", [_aiohttp_path, _wire_path], ids=["aiohttp", "wire"])
async def test_cancelling_while_waiting_for_the_answer_closes_the_connection(path: Path) -> None:
    async with Capture(reply=b"") as capture:
        async with open_session(4, 4.0) as session:
            task = spawn(path(session, "POST", capture.url("/v1/chat/completions"), {}, b"{}"), name="attempt")
            await until(lambda: capture.seen)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await asyncio.wait_for(capture.closed.wait(), 5)
            connector = session.connector
            assert isinstance(connector, PoolConnector)
            assert not connector._conns  # nothing went back to the pool


async def test_the_sessions_it_sends_on_use_nothing_it_leaves_out() -> None:
    """wire.py skips what ClientSession.request would add from the session: default headers and auth, a base
    URL, proxies from the environment, middlewares, trace hooks, forced close, HTTP/1.0. A session that
    gained one (here or in an aiohttp upgrade's defaults) would send something else on the hand-written path."""
    async with open_session(4, 4.0) as session:
        assert not session._default_headers and not session._skip_auto_headers
        assert session._default_auth is None and session._base_url is None and session._default_proxy is None
        assert not session._trust_env and not session._middlewares and not session._trace_configs
        assert session._version == aiohttp.HttpVersion11 and isinstance(session._cookie_jar, aiohttp.DummyCookieJar)
        assert session._retry_connection and not session._raise_for_status
        assert session.connector is not None and not session.connector.force_close


@pytest.mark.parametrize("url", ["https://api.openai.com/v1/chat/completions", "http://127.0.0.1:8000/v1/embeddings",
                                 "https://[::1]:8443/v1/messages?beta=true", "http://vllm.internal/v1/completions"])
async def test_the_pool_key_and_tls_are_the_ones_aiohttps_request_uses(url: str) -> None:
    """Both paths take and return connections under one key: TLS (and its verification), host and port."""
    where = wire.target(url)
    assert where.origin is not None
    theirs = ClientRequest("POST", URL(url, encoded=True), loop=asyncio.get_running_loop(), ssl=True)
    assert where.origin.connection_key == theirs.connection_key
    assert where.origin.is_ssl() == url.startswith("https:") and where.origin.ssl is True
    assert (where.host, where.path_qs) == (theirs.headers["Host"], theirs.url.raw_path_qs)
