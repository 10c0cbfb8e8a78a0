"""The response protocol of an upstream connection (aiohttp's ResponseHandler): one lazy read timer per
connection, the marks PoolConnector keeps per connection, and the response parser kept from one response
to the next (client.py's PoolConnector makes these; wire.py sends on them)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from aiohttp.client_proto import ResponseHandler
from aiohttp.helpers import TimerNoop

if TYPE_CHECKING:
    from aiohttp import BaseConnector, ClientSession

NO_TIMER = TimerNoop()
"""The response timer of a session without a total timeout (client.open_session's)."""
_NONE_YET = object()


class LazyReadTimer(ResponseHandler):
    """aiohttp's response protocol with a lazy `sock_read` timer (the first_token bound of a whole answer's
    socket reads), and the marks PoolConnector keeps per connection. aiohttp cancels and re-arms a timer at
    every socket read and cancels it at the end of each response. Here a read only moves the deadline
    (`read_due`), the end of a response only turns it off, and the one timer of the connection, should it
    fire before the deadline, waits on for the rest (with no deadline it ends). Same limit, and a timer
    made about once per `sock_read` period of a busy connection rather than one per response; re-armed at
    once when a response's deadline comes before it. Closing the connection cancels it. The marks are
    slots: new attributes in aiohttp's instance dict would cost ~800 bytes a connection."""

    __slots__ = ("read_due", "timer_due", "served", "narrowed", "_kept_parser", "_kept_skip", "_kept_bufsize")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop=loop)
        self.read_due = 0.0
        """loop.time() by which the next socket read must come (0: none is awaited)."""
        self.timer_due = 0.0
        """When the timer (`_read_timeout_handle`), if any, fires."""
        self.served = False
        """The connection carried a request: the next request on it is a reuse."""
        self.narrowed = False
        """Its SO_RCVBUF is a stream's (STREAM_RCVBUF)."""
        self._kept_parser: object = _NONE_YET
        """The parser `expect` made, and what for (HEAD-like, reader buffer size)."""
        self._kept_skip = False
        self._kept_bufsize = 0

    def expect(self, session: ClientSession, connector: BaseConnector, skip_payload: bool, read_timeout: float | None,
               read_bufsize: int) -> None:
        """`set_response_params` as `ClientSession.request` calls it, for the next response on this connection.
        A parser is ready for the next message once one is complete (aiohttp's server keeps its own across
        keep-alive requests): the one made for the last response is kept when it was made here for the same
        kind of response and nothing is left over (a tail before the parser, a paused transport), rather than
        a new one per response. The rest of the parameters are the session's and the connector's."""
        if (self._parser is self._kept_parser and skip_payload is self._kept_skip
                and read_bufsize == self._kept_bufsize and not (self._tail or self._reading_paused
                                                                or self._buffer_paused)):
            self._read_timeout = read_timeout
            return
        self.set_response_params(
            timer=NO_TIMER, skip_payload=skip_payload, read_until_eof=True,
            auto_decompress=session._auto_decompress, read_timeout=read_timeout, read_bufsize=read_bufsize,
            timeout_ceil_threshold=connector._timeout_ceil_threshold, max_line_size=session._max_line_size,
            max_field_size=session._max_field_size, max_headers=session._max_headers,
        )
        self._kept_parser, self._kept_skip, self._kept_bufsize = self._parser, skip_payload, read_bufsize

    def _reschedule_timeout(self) -> None:
        timeout = self._read_timeout
        if not timeout:
            self.read_due = 0.0
            return
        due = self.read_due = self._loop.time() + timeout
        if self._read_timeout_handle is None or due < self.timer_due:
            self._arm(due, timeout)

    def _drop_timeout(self) -> None:
        self.read_due = 0.0  # the timer, if any, ends when it fires (or serves the next response)

    def _arm(self, due: float, delay: float) -> None:
        handle = self._read_timeout_handle
        if handle is not None:
            handle.cancel()
        self.timer_due = due
        self._read_timeout_handle = self._loop.call_later(delay, self._read_late)

    def _read_late(self) -> None:
        self._read_timeout_handle = None
        due = self.read_due
        if not due:
            return
        left = due - self._loop.time()
        if left > 0:  # a read came since the timer was set, or a later response's deadline: wait for it
            self._arm(due, left)
            return
        self._on_read_timeout()

    def _stop_timer(self) -> None:
        handle = self._read_timeout_handle
        if handle is not None:
            handle.cancel()
            self._read_timeout_handle = None
        self.read_due = 0.0

    def close(self) -> None:
        super().close()
        self._stop_timer()

    def abort(self) -> None:
        super().abort()
        self._stop_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_timer()
        super().connection_lost(exc)
