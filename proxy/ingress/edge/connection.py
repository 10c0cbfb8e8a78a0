"""aiohttp's connection protocol with what it lacks for a server any client can reach.

aiohttp bounds only the idle time between requests (`keepalive_timeout`). Nothing bounds how long a client
may take over its request line and headers, and what aiohttp answers itself (a request the parser refuses,
a path no route takes) is text/plain: the parser's 400 quotes the offending line, tenant key included,
and is logged at ERROR with a traceback. There is no option or hook for either (the parser is C, the
answers are built inside `RequestHandler`), so this subclass adds, per connection:

- a header clock: from the accept (new connection) or from the first byte of the next request (kept-alive
  connection) until the parser has the whole head. At the limit a client that sent something gets a 408,
  one that sent nothing is closed silently; either way the connection ends.
- JSON answers in the client's protocol for everything aiohttp answers itself (`handle_error`,
  `finish_response`), never quoting the request, logged once per connection at INFO (DEBUG for non-HTTP
  traffic) without a traceback;
- a malformed body (bad chunk framing after the head went to a handler) fails that body's read, so the
  handler answers the one 400, instead of aiohttp queuing a second answer behind a read that never ends.

The body's own clock is in `proxy.ingress.edge.timeouts.read_body`. This relies on a few RequestHandler internals
(`_messages`, `_waiter`, `_request_in_progress`, `_next_keepalive_close_time`, `_ErrInfo`), which the
tests in tests/test_edge_*.py exercise through real sockets.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import RequestHandler, _ErrInfo
from aiohttp.web_request import BaseRequest

from proxy.errors import ProxyError, render
from proxy.ingress.edge import answers, exact
from proxy.ingress.identify import request_id_of
from proxy.runtime import STATE, ClientTimeouts
from proxy.telemetry.hot import HotCounter

log = logging.getLogger("signalbox.edge")
_AFTER = 1.0
"""aiohttp's idle timer is held this long past a head's deadline, so the header clock is the one that ends it."""


class GuardedHandler(RequestHandler):
    __slots__ = ("_admin", "_body", "_errors", "_head", "_head_started", "_head_timer", "_reported", "_timeouts")

    def __init__(
        self, manager: web.Server, timeouts: ClientTimeouts, admin: bool, errors: HotCounter | None, **kwargs: Any
    ) -> None:
        super().__init__(manager, **kwargs)
        self._timeouts = timeouts
        self._admin = admin
        self._errors = errors
        """signalbox_proxy_errors_total, which counts these answers like the handlers' own."""
        self._head: bytes | None = None
        """The first bytes of the request being read (up to SNIFF), to answer a parse failure in its protocol."""
        self._head_started = 0.0
        self._head_timer: asyncio.TimerHandle | None = None
        self._body: StreamReader | None = None
        """The body of the last request handed to a handler; bytes are body bytes until it ends."""
        self._reported = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._start_head_clock(self._loop.time())  # a new connection's first head is timed from the accept

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_head_clock()
        self._head = self._body = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._force_close or self._close:
            return
        body = self._body
        in_body = body is not None and not body.is_eof()
        if not in_body and data:
            self._note_head(data)
        waiting = self._waiter is not None and not self._waiter.done()
        count = self._request_count
        super().data_received(data)
        if self._request_count != count:
            self._parsed(body if in_body else None, waiting)
        elif self._head is not None and self._head_timer is None:
            # A kept-alive connection's next head did not come whole in one read: its clock runs from its
            # first byte. (A head that comes whole, the usual case, never costs a timer.)
            self._start_head_clock(self._head_started)

    def _note_head(self, data: bytes) -> None:
        if self._head is None:
            self._head = data
            self._head_started = self._loop.time()
        elif len(self._head) < answers.SNIFF:
            self._head += data[: answers.SNIFF]

    def _parsed(self, body: StreamReader | None, waiting: bool) -> None:
        """The parser handed out a request, or failed."""
        self._stop_head_clock()
        message, payload = self._messages[-1]
        if not isinstance(message, _ErrInfo):
            self._head = None
            self._body = payload
            return
        if body is None or waiting:
            return  # a failed head: aiohttp answers it through handle_error
        # The body of a request already handed out is malformed: end that body instead of queuing a second
        # answer behind a read that would never finish.
        self._messages.pop()
        self._report(self._failure(message.exc).kind)
        if self._request_in_progress:
            body.set_exception(web.RequestPayloadError("invalid body framing"))
        else:
            body.feed_eof()  # answered already (aiohttp is discarding the rest): just stop waiting for it
        self.close()

    def _start_head_clock(self, started: float) -> None:
        loop = self._loop
        deadline = started + self._timeouts.header
        self._head_timer = loop.call_at(deadline, self._head_late)
        self._next_keepalive_close_time = max(self._next_keepalive_close_time, deadline + _AFTER)

    def _stop_head_clock(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_late(self) -> None:
        self._head_timer = None
        if self._force_close or self._close or self.transport is None:
            return
        if self._request_in_progress:  # an earlier request on this connection is still being answered
            self._start_head_clock(self._loop.time())
            return
        waiter = self._waiter
        if not self._head or waiter is None or waiter.done():
            self.force_close()  # nothing of a request arrived: closed without an answer
            return
        late = _ErrInfo(status=408, exc=answers.HeadTimeout(self._timeouts.header), message="")
        self._messages.append((late, EMPTY_PAYLOAD))
        waiter.set_result(None)  # answered through handle_error, like a head the parser refused

    def handle_error(
        self, request: BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        """aiohttp's answer to a refused head, a header timeout, or an exception that escaped a handler."""
        error: ProxyError
        if status >= 500:
            if status == 500:
                log.error("an exception escaped a handler (request from %s)", request.remote, exc_info=exc)
            error = answers.for_handler_failure(status)
            protocol = answers.protocol_of(request.path, request.headers)
        else:
            failure = self._failure(exc)
            self._report(failure.kind, quiet=failure.quiet)
            error = failure.error
            protocol = answers.protocol_of_head(self._head)
        self._head = None
        if request.writer.output_size > 0:
            raise ConnectionError("the response had begun: the connection is closed instead")
        self._count(error)
        response = render(error, protocol, request_id_of(request.headers))
        response.force_close()
        return response

    def finish_response(
        self, request: BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> Coroutine[Any, Any, tuple[web.StreamResponse, bool]]:
        """aiohttp awaits what this returns: its own coroutine, with a JSON answer in place of its own
        refusals (a plain method, so every response does not pay a coroutine of ours around aiohttp's)."""
        if isinstance(resp, web.HTTPException) and resp.status >= 400:  # the router's 404/405, Expect's 417
            error = answers.for_http_refusal(resp.status, resp.headers.get("Allow"), request.path, self._admin)
            request_id = request_id_of(request.headers)
            resp = render(error, answers.protocol_of(request.path, request.headers), request_id)
            self._count(error)
        return super().finish_response(request, resp, start_time)

    def _count(self, error: ProxyError) -> None:
        if self._errors is not None:
            self._errors.inc((error.reason,))

    def _failure(self, exc: BaseException | None) -> answers.Failure:
        return answers.for_parse_error(exc, self.max_field_size, self.max_headers)

    def log_exception(self, *args: Any, **kw: Any) -> None:
        """aiohttp's "Unhandled exception": also what it says when the unread rest of a body it is
        discarding after an answer turns out malformed (bad gzip, say). That is the client's fault, not
        ours: one line without a traceback. Anything else keeps its traceback."""
        exc = kw.get("exc_info")
        if isinstance(exc, web.RequestPayloadError | HttpProcessingError):
            self._report(self._failure(exc).kind)
            return
        super().log_exception(*args, **kw)

    def _report(self, kind: str, *, quiet: bool = False) -> None:
        """One log line per connection, naming the kind of fault and the peer, never request bytes."""
        if self._reported:
            return
        self._reported = True
        peer = self.peername
        where = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "a client"
        log.log(logging.DEBUG if quiet else logging.INFO, "closing the connection from %s: %s", where, kind)


class GuardedServer(web.Server):
    """aiohttp's Server, making GuardedHandlers."""

    def __init__(
        self, handler: Any, *, timeouts: ClientTimeouts, admin: bool, errors: HotCounter | None, **kwargs: Any
    ) -> None:
        super().__init__(handler, **kwargs)
        self._timeouts = timeouts
        self._admin = admin
        self._errors = errors

    def __call__(self) -> RequestHandler:
        return GuardedHandler(self, self._timeouts, self._admin, self._errors, loop=self._loop, **self._kwargs)


class GuardedRunner(web.AppRunner):
    """An AppRunner whose connections have the client timeouts and JSON answers (`admin` picks the 404 hint)."""

    __slots__ = ("_admin", "_timeouts")

    def __init__(self, app: web.Application, timeouts: ClientTimeouts, *, admin: bool = False, **kwargs: Any) -> None:
        # aiohttp reads and drops what is left of an unread body for `lingering_time` (10 s) after an early
        # answer, so the client can read it; no longer than a body may go silent, or a cut body keeps the
        # connection past its limits.
        kwargs.setdefault("lingering_time", min(10.0, timeouts.body_idle))
        super().__init__(app, keepalive_timeout=timeouts.keepalive, **kwargs)
        self._timeouts = timeouts
        self._admin = admin

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()
        return GuardedServer(
            exact.request_handler(self.app),  # exact paths past the router; the rest by app._handle
            timeouts=self._timeouts,
            admin=self._admin,
            errors=self.app[STATE].metrics.errors if STATE in self.app else None,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            loop=asyncio.get_running_loop(),
            **plain._kwargs,  # what the app added (debug, access log class, handler_args)
        )
