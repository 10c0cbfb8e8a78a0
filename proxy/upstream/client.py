"""Upstream connections: one pooled aiohttp session per upstream, and a single attempt over it.

Deliberate aiohttp settings (PROTOCOLS.md §5): no 300 s session total (streams outlive it), a pool
sized per upstream (the default 100 would cap concurrent streams), keep-alive shorter than vLLM's
5 s so we never reuse a socket the server closed, one safe retry when a pooled connection
turns out to be stale before any response byte arrived, and no cookie jar.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import aiohttp
from aiohttp.client_proto import ResponseHandler
from aiohttp.connector import Connection

from proxy.errors import ProxyError, UpstreamTimeout, UpstreamUnreachable
from proxy.policy.plan import MockPlan, Plan, UpstreamSpec
from proxy.upstream import wire
from proxy.upstream.protocol import LazyReadTimer
from proxy.upstream.registry import Registry

if TYPE_CHECKING:
    from proxy.mock.faults import MockSettings

log = logging.getLogger("signalbox.upstream")


_REUSED: ContextVar[bool] = ContextVar("signalbox_connection_reused", default=False)
"""Whether the connection of the request being sent (in this task) came from the pool."""
_STREAMING: ContextVar[bool] = ContextVar("signalbox_streaming", default=False)
"""Whether the request being sent (in this task) asks for a stream."""
STREAM_READ_BUFSIZE = 4 * 1024
"""A stream's response reader stops reading the socket past twice this (aiohttp's default: 64 KiB, so
128 KiB): the part of what a stalled client costs that sits in the upstream reader. The relay reads the
reader's pieces as they came (proxy/streaming/pump.py), so nothing raises this limit again. Plus the rest of
the socket read that crossed it, which aiohttp's parser keeps as its tail: see STREAM_RCVBUF."""
STREAM_RCVBUF = 16 * 1024
"""SO_RCVBUF of a stream's upstream socket. One socket read (up to 256 KiB on uvloop) lands in the reader
whole, past its limit (or in the parser's tail once the reader pauses it), and the kernel's receive queue
bounds that read: a stalled client's stream holds at most about this much more. On loopback (64 KiB MSS)
this window is below one segment: 8 KiB events from a local upstream flow at ~70 a second (32 KiB:
~10,000 a second, but ~66 KiB per stalled stream; docs/streams-memory.md). Linux doubles the value; the
window it leaves (~24 KiB) carries 250 KB/s at a 100 ms round trip, about 1,000 OpenAI chunk events a
second."""
BULK_RCVBUF = 4 * 1024 * 1024
"""SO_RCVBUF given back to a pooled socket a stream had, when a non-stream request reuses it (the kernel
caps it at net.core.rmem_max; the autotuning a socket starts with cannot be turned back on)."""
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
"""aiohttp resends these once on a dropped connection (RFC 9112 §9.3.1), fresh or pooled: the hand-written
path does the same, and neither adds a second resend."""


class PoolConnector(aiohttp.TCPConnector):
    """A TCPConnector that tells, per request, whether the connection was reused: only a reused keep-alive
    connection can be stale, so only there is a resend safe for a POST that produced no response. Its
    connections time socket reads with one timer per connection (LazyReadTimer)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        factory = functools.partial(LazyReadTimer, loop=self._loop)
        self._factory = cast("functools.partial[ResponseHandler]", factory)  # aiohttp's protocol factory

    async def connect(self, req: Any, traces: Any, timeout: aiohttp.ClientTimeout) -> Any:  # noqa: ASYNC109
        conn = await super().connect(req, traces, timeout)
        self.lent(conn, _STREAMING.get())
        return conn

    def lent(self, conn: Connection, streaming: bool) -> None:
        """A connection handed to a request (by `connect`, or taken from the pool by wire.send): whether it
        was reused (`_REUSED`), and its SO_RCVBUF a stream's or given back."""
        protocol = conn.protocol
        assert isinstance(protocol, LazyReadTimer)  # this connector's factory makes them
        _REUSED.set(protocol.served)
        protocol.served = True
        if streaming:
            if not protocol.narrowed and _set_rcvbuf(conn, STREAM_RCVBUF):
                protocol.narrowed = True
        elif protocol.narrowed and _set_rcvbuf(conn, BULK_RCVBUF):
            protocol.narrowed = False


def _set_rcvbuf(conn: Any, size: int) -> bool:
    transport = conn.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return False
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
    except OSError:
        return False
    return True


@dataclass(slots=True)
class _Pool:
    spec: UpstreamSpec
    session: aiohttp.ClientSession
    base_url: str
    mock_runner: object | None = None


class UpstreamClients:
    """Sessions (and in-process mock servers) keyed by upstream name; reconfigured on reload."""

    def __init__(self, registry: Registry | None = None) -> None:
        self._pools: dict[str, _Pool] = {}
        self._retired: list[_Pool] = []
        self.registry = registry or Registry()
        """Breakers, pacing holds and load per deployment (see registry.py); survives reloads."""
        self.refusing: ProxyError | None = None
        """Set at shutdown, past the drain timeout: no new attempt is sent, each gets this error instead."""

    async def configure(self, plan: Plan) -> None:
        """Create pools for new or changed upstreams; keep unchanged ones (and their warm connections)."""
        for name, spec in plan.upstreams.items():
            current = self._pools.get(name)
            if current is not None and current.spec.fingerprint() == spec.fingerprint():
                current.spec = spec  # headers or key may have changed; the pool stays
                continue
            self._pools[name] = await self._open(spec)
            if current is not None:
                self._retired.append(current)
        for name in [n for n in self._pools if n not in plan.upstreams]:
            self._retired.append(self._pools.pop(name))
        self.registry.configure(plan)

    def pool(self, name: str) -> tuple[aiohttp.ClientSession, str]:
        pool = self._pools[name]
        return pool.session, pool.base_url

    def mock_url(self, name: str) -> str | None:
        pool = self._pools.get(name)
        return pool.base_url if pool is not None and pool.mock_runner is not None else None

    async def close(self) -> None:
        for pool in [*self._pools.values(), *self._retired]:
            await pool.session.close()
            if pool.mock_runner is not None:
                await pool.mock_runner.cleanup()  # type: ignore[attr-defined]
        self._pools.clear()
        self._retired.clear()

    async def _open(self, spec: UpstreamSpec) -> _Pool:
        runner = None
        base_url = spec.base_url or ""
        if spec.provider == "mock":
            assert spec.mock is not None
            from proxy.mock.server import start_mock  # only a policy with a mock upstream loads the mock

            runner, root = await start_mock(_mock_settings(spec.mock))
            base_url = root + "/v1"
        return _Pool(spec, open_session(spec.max_connections, spec.keepalive), base_url, runner)


def open_session(limit: int, keepalive: float) -> aiohttp.ClientSession:
    """A session over a PoolConnector of `limit` connections kept `keepalive` seconds."""
    connector = PoolConnector(
        limit=limit,
        limit_per_host=0,
        keepalive_timeout=keepalive,
        ttl_dns_cache=30,
        enable_cleanup_closed=False,
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=None),
        auto_decompress=True,
        raise_for_status=False,
        # Cookies an upstream sets (OpenAI's Cloudflare ones) are relayed to the caller that got them and
        # never kept: a shared jar would replay one tenant's cookies for every other. Also skips the
        # jar's per-request filtering.
        cookie_jar=aiohttp.DummyCookieJar(),
    )


def _mock_settings(plan: MockPlan) -> MockSettings:
    from proxy.mock.faults import MockFault, MockSettings

    faults = tuple(
        MockFault(
            kind=f.kind,
            probability=f.probability,
            status=f.status,
            retry_after=f.retry_after,
            stall=f.stall,
            after_events=f.after_events,
            times=f.times,
        )
        for f in plan.faults
    )
    return MockSettings(
        ttft=plan.ttft,
        token_delay=plan.token_delay,
        output_tokens=plan.output_tokens,
        embedding_dim=plan.embedding_dim,
        faults=faults,
        seed=plan.seed,
    )


async def send_once(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    headers: Mapping[str, str],
    body: bytes | None,
    query: Mapping[str, str] | None,
    connect: float,
    first_token: float,
    upstream: str,
    stream: bool = False,
    deadline_bound: bool = False,
) -> aiohttp.ClientResponse:
    """One upstream attempt up to the response headers. Errors become `UpstreamUnreachable`/`Timeout`.

    `first_token` bounds the wait for the headers (and, for a non-stream, each socket read); when the
    call's total deadline is nearer, dispatch passes what is left and `deadline_bound`, so the error names
    the deadline. Retries once, at once, only when the server closed the connection before sending
    anything on a connection reused from the pool, which is what a stale keep-alive connection looks like
    (vLLM closes idle ones after 5 s). A fresh connection that drops, or any response byte, means the
    upstream may have taken the request: no resend (a second generation would be billed twice). An
    idempotent method is resent once on any dropped connection, as aiohttp does. The attempt goes through
    wire.py where that models aiohttp's request, through `ClientSession.request` otherwise.
    """
    # A stream's body reads are timed by the relay's watchdog (first event, then `idle` between events):
    # a socket read timeout of first_token would cut a stream whose events are further apart than that.
    timeout = _client_timeout(connect, None if stream else first_token)
    where = wire.target(url)
    idempotent = method in _IDEMPOTENT
    # The hand-written path (wire.py) where it models aiohttp: an upper-case method, no query to encode, and
    # not an idempotent stream (whose resend aiohttp makes within the same first_token window).
    lean = where.lean and not query and method.isupper() and not (stream and idempotent)
    head = wire.head(where, method, headers, body) if lean else None
    # aiohttp resends an idempotent request once on a dropped connection (RFC 9112 §9.3.1): here on the
    # hand-written path, inside session.request otherwise. Any other is resent once on a stale pooled one.
    _STREAMING.set(stream)
    for resend in (head is not None or not idempotent, False):
        _REUSED.set(False)
        try:
            if not stream:  # the socket read timeout bounds the wait for the headers
                if head is not None:
                    return await wire.send(session, where, method, head, body, timeout, session._read_bufsize, False)
                return await session.request(
                    method, where.url, data=body, headers=headers, params=query, timeout=timeout,
                    allow_redirects=False,
                )
            async with asyncio.timeout(first_token):
                if head is not None:
                    return await wire.send(session, where, method, head, body, timeout, STREAM_READ_BUFSIZE, True)
                return await session.request(
                    method, where.url, data=body, headers=headers, params=query, timeout=timeout,
                    allow_redirects=False, read_bufsize=STREAM_READ_BUFSIZE,
                )
        except aiohttp.ClientConnectorError as exc:
            raise UpstreamUnreachable(
                f"could not connect to upstream '{upstream}' ({_reason(exc)}); check that it is running"
            ) from None
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, aiohttp.ClientConnectionResetError) as exc:
            if resend and _resend(exc, idempotent):
                log.debug("upstream %s closed a pooled connection; retrying once", upstream)
                continue
            raise UpstreamUnreachable(
                f"upstream '{upstream}' closed the connection before answering; try again"
            ) from None
        except aiohttp.ConnectionTimeoutError:
            raise UpstreamUnreachable(
                f"could not connect to upstream '{upstream}' within {connect:g}s (timeouts.connect)"
            ) from None
        except (TimeoutError, aiohttp.ServerTimeoutError):
            if deadline_bound:
                raise UpstreamTimeout("the request ran past its total deadline (timeouts.total)") from None
            raise UpstreamTimeout(
                f"upstream '{upstream}' did not answer within {first_token:g}s; "
                "try again later or raise timeouts.first_token"
            ) from None
        except aiohttp.ClientError as exc:
            raise UpstreamUnreachable(f"upstream '{upstream}' failed: {type(exc).__name__}") from None
    raise AssertionError("unreachable")


def _resend(exc: Exception, idempotent: bool) -> bool:
    """Whether a connection that broke before the answer's headers may carry the request again. Closed or
    reset before any response byte on a reused connection: the server had just closed it (its FIN raced our
    request), seen as a disconnect, EPIPE or ECONNRESET. A disconnect after the first byte of a status line
    carries the partial message. An idempotent request: what aiohttp resends (a dropped connection, reused or
    not, but not a reset while writing nor an OSError it converted)."""
    if idempotent:
        return isinstance(exc, (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError)) and not isinstance(
            exc, wire.ConvertedOSError)
    no_answer = not isinstance(exc, aiohttp.ServerDisconnectedError) or isinstance(exc.message, str)
    return no_answer and _REUSED.get()


@functools.lru_cache(maxsize=64)
def _client_timeout(connect: float, read: float | None) -> aiohttp.ClientTimeout:
    """One immutable ClientTimeout per (connect, read) pair: the values come from the policy."""
    return aiohttp.ClientTimeout(total=None, connect=None, sock_connect=connect, sock_read=read)


def _reason(exc: aiohttp.ClientConnectorError) -> str:
    error = exc.os_error
    return (error.strerror or type(error).__name__) if error is not None else "connection failed"
