"""One upstream attempt written by hand onto aiohttp's pooled connection, read back by aiohttp's ClientResponse.

Why hand-written: per request, this path runs ~1,900 fewer Python bytecodes of aiohttp's for ~300 of its own
(bench/bytecodes.py, 2026-12-03; ~1,650 fewer in all, ~20 % of a minimal request). `ClientSession.request`
spends them (`_request` 363, `ClientRequest.__init__` and its `update_*` steps ~600, `send` 171, a task to
write the body, payload objects) on what no attempt uses: cookies, redirects, auth, trace hooks, base-URL
joining, middlewares, proxies, compression. Here the request head is
aiohttp's own serializer over the fields `ClientRequest` would send, in its order; it goes out with the body
in one write on a connection from the session's connector (pool, keep-alive, DNS cache, TLS, and
PoolConnector's marks), and aiohttp's response protocol, parser and `ClientResponse.start` read the answer.
What this path does not model (a Host, Expect or framing header of the caller's, two names differing only
in case, a body that could fill the socket's send buffer, a URL with credentials or a fragment) goes
through `ClientSession.request` unchanged (`head` returns None). What a session could add (default headers
or auth, a base URL, proxies, hooks) this path leaves out: client.open_session's sessions add none (pinned).
tests/test_upstream_wire.py captures both paths' bytes on a raw socket over generated requests and pins
the aiohttp internals used here (aiohttp 3.14).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Mapping
from typing import TYPE_CHECKING

from aiohttp import ClientError, ClientOSError, ClientResponse, ClientSession, ClientTimeout, hdrs
from aiohttp.client_exceptions import (
    ClientConnectionError,
    ClientConnectionResetError,
    ConnectionTimeoutError,
)
from aiohttp.client_reqrep import ClientRequest, ConnectionKey, RequestInfo
from aiohttp.helpers import EMPTY_BODY_METHODS
from aiohttp.http import SERVER_SOFTWARE
from aiohttp.http_writer import _serialize_headers
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.upstream.protocol import NO_TIMER

if TYPE_CHECKING:
    from aiohttp.abc import AbstractStreamWriter
    from aiohttp.client_proto import ResponseHandler

    from proxy.upstream.client import PoolConnector
    from proxy.upstream.protocol import LazyReadTimer

_UNMODELLED = frozenset({"host", "expect", "content-length", "transfer-encoding"})
"""Caller headers that change what aiohttp does (replace Host, wait for 100 Continue, framing)."""
MAX_BODY = 32 * 1024
"""Bodies up to this go out in one write that cannot fill the transport's 64 KiB buffer, so no wait for a
drain before the response; aiohttp writes larger ones from a task of their own."""
_ACCEPT = ClientRequest.DEFAULT_HEADERS[hdrs.ACCEPT]
_ACCEPT_ENCODING = ClientRequest.DEFAULT_HEADERS[hdrs.ACCEPT_ENCODING]
_OCTETS = "application/octet-stream"
_GET_METHODS = frozenset(ClientRequest.GET_METHODS)
_POST_METHODS = frozenset(ClientRequest.POST_METHODS)
Head = tuple[bytes, RequestInfo]  # what a session without a total timeout gives each request


class _Origin(ClientRequest):
    """What the connector reads of a request (address, TLS, proxy: none), made once per upstream URL. The
    connection key, a property aiohttp computes per request, is worked out once here."""

    connection_key: ConnectionKey = None  # type: ignore[assignment]  # shadows the property: set per instance

    def __init__(self, url: URL) -> None:
        super().__init__("GET", url, loop=asyncio.get_running_loop())
        self.connection_key = ClientRequest.connection_key.fget(self)  # type: ignore[attr-defined]


class Target:
    """An upstream URL, parsed once: what every request to it sends and which pool key it uses."""

    __slots__ = ("url", "host", "path_qs", "origin", "lean")

    def __init__(self, url: URL) -> None:
        self.url = url
        self.host = url.host_port_subcomponent or ""
        """The Host header aiohttp sends."""
        self.path_qs = url.raw_path_qs
        self.lean = bool(url.raw_host) and not (url.raw_user or url.raw_password or url.raw_fragment)
        """Whether requests to it may take this path (aiohttp strips and sends a URL's credentials)."""
        self.origin = _Origin(url) if self.lean else None


@functools.lru_cache(maxsize=256)
def target(url: str) -> Target:
    """Parsed once per distinct upstream URL (they repeat: base URL + path, rarely a query)."""
    return Target(URL(url, encoded=True))


class _Shapes(dict[tuple[str, ...], "tuple[dict[str, str], bool] | None"]):
    """A request's header names (as given, in order) → what aiohttp adds to them: the defaults the caller
    lacks (Accept, Accept-Encoding, User-Agent) and whether it sent a Content-Type; None where this path
    does not model aiohttp (a Host, Expect or framing header, two names differing only in case). Worked out
    on a tuple's first sight (a proxied request's names repeat call after call), remembered up to
    `_SHAPE_LIMIT` tuples."""

    __slots__ = ()

    def __missing__(self, names: tuple[str, ...]) -> tuple[dict[str, str], bool] | None:
        lower = set(map(str.lower, names))
        shape = None
        if len(lower) == len(names) and lower.isdisjoint(_UNMODELLED):
            defaults = {}
            if "accept" not in lower:
                defaults["Accept"] = _ACCEPT
            if "accept-encoding" not in lower:
                defaults["Accept-Encoding"] = _ACCEPT_ENCODING
            if "user-agent" not in lower:
                defaults["User-Agent"] = SERVER_SOFTWARE
            shape = defaults, "content-type" in lower
        if len(self) < _SHAPE_LIMIT:
            self[names] = shape
        return shape


_SHAPE_LIMIT = 1024
_SHAPES = _Shapes()


def head(target: Target, method: str, headers: Mapping[str, str], body: bytes | None) -> Head | None:
    """The request head `ClientSession.request(method, url, headers=headers, data=body)` sends (method upper
    case), and the request_info its ClientResponse carries into the errors it raises; None where this path
    does not model aiohttp. The fields in aiohttp's order: Host first, the caller's, the defaults it lacks
    (Accept, Accept-Encoding, User-Agent: `_Shapes`), then Content-Length and Content-Type (a body, or a
    POST, PUT or PATCH without one). aiohttp's serializer writes them (it refuses control characters)."""
    shape = _SHAPES[tuple(headers)]
    if shape is None or (body is not None and len(body) > MAX_BODY):
        return None
    defaults, typed = shape
    out = {"Host": target.host, **headers, **defaults}
    if body is not None:
        out["Content-Length"] = str(len(body))
    elif method not in _GET_METHODS:
        out["Content-Length"] = "0"
    if not typed and (body is not None or method in _POST_METHODS):
        out["Content-Type"] = _OCTETS
    line = _serialize_headers(f"{method} {target.path_qs} HTTP/1.1", out)  # type: ignore[arg-type]  # (items())
    return line, tuple.__new__(RequestInfo, (target.url, method, CIMultiDictProxy(CIMultiDict(out)), target.url))


class ConvertedOSError(ClientOSError):
    """An OSError aiohttp's request turns into a ClientOSError, which it then does not resend."""


async def send(
    session: ClientSession, target: Target, method: str, request: Head, body: bytes | None, limits: ClientTimeout,
    read_bufsize: int, stream: bool,
) -> ClientResponse:
    """aiohttp's `_connect_and_send_request` for a request's `head` (method upper case): one attempt; the
    caller resends (aiohttp resends an idempotent one once on a dropped connection). Anything raised after
    the connection was taken (cancellation included) closes it."""
    connector: PoolConnector = session._connector  # type: ignore[assignment]  # (client.open_session's)
    if connector is None or connector.closed:
        raise RuntimeError("Session is closed")
    try:
        # An idle pooled connection, as connector.connect takes it first (the origin has no proxy), without
        # connect's coroutine and PoolConnector's; else connect makes one (or waits for the pool's limit).
        conn = await connector._get(target.origin.connection_key, [])  # type: ignore[union-attr]
        if conn is not None:
            connector.lent(conn, stream)
        else:
            try:  # (a lean target has an origin)
                conn = await connector.connect(target.origin, [], limits)
            except TimeoutError as exc:
                raise ConnectionTimeoutError(f"Connection timeout to host {target.url}") from exc
        protocol: LazyReadTimer = conn.protocol  # type: ignore[assignment]  # (PoolConnector's; no cast() call)
        protocol.expect(session, connector, method in EMPTY_BODY_METHODS, limits.sock_read, read_bufsize)
        try:
            sent = _write(protocol, request[0], body)
            protocol._reschedule_timeout()  # start_timeout(): the socket read timeout runs from the request's end
            response = session._response_class(
                method, target.url, writer=None, continue100=None, timer=NO_TIMER, request_info=request[1], traces=[],
                loop=protocol._loop, session=session, stream_writer=sent,
            )
            try:
                await response.start(conn)
            except BaseException:
                response.close()
                raise
        except BaseException:
            conn.close()
            raise
        return response
    except ClientError:
        raise
    except OSError as exc:
        if exc.errno is None and isinstance(exc, TimeoutError):
            raise
        raise ConvertedOSError(*exc.args) from exc


class _Sent:
    """The one thing ClientResponse reads of a finished request writer: how many bytes went out."""

    __slots__ = ("output_size",)

    def __init__(self, size: int) -> None:
        self.output_size = size


def _write(protocol: ResponseHandler, line: bytes, body: bytes | None) -> AbstractStreamWriter:
    """Head and body in one write (aiohttp coalesces them too). A transport closed under us fails as aiohttp's
    writer fails: the error itself without a body, wrapped by the body writer with one."""
    transport = protocol.transport
    if transport is None or transport.is_closing():
        if body:
            raise ClientConnectionError("Failed to send bytes into the underlying connection")
        raise ClientConnectionResetError("Cannot write to closing transport")
    if body:
        line += body
    transport.write(line)
    return _Sent(len(line))  # type: ignore[return-value]
