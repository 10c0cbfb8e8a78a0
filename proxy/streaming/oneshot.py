"""`OneShot`: a whole-body `web.Response` whose head and body go out in one write, in one step.

aiohttp prepares and ends a `web.Response` in layers (`prepare`, `_start` twice, `_prepare_headers`,
`_prepare_hook`, `_write_headers`, the writer's `write_headers`, `write_eof` twice,
`_send_headers_with_payload`, `_writelines`): ~500 Python bytecodes per answer, most of them deciding
what does not apply to a non-streamed answer on a kept-alive HTTP/1.1 connection (compression, chunking,
cookies, HTTP/1.0, an empty-body status or method). `OneShot.prepare` takes that case in one function,
with the same steps in the same order (Content-Length, Content-Type's default, Date, Server, the
on_response_prepare hook, the head serialised by aiohttp's own `_serialize_headers`, one write of head and
body), so the bytes are aiohttp's; any other case goes through `web.Response`'s own path.

Relies on StreamResponse/StreamWriter internals (`_payload_writer`, `_eof_sent`, `_keep_alive`,
`_serialize_headers`, the writer's counters, ...): tests/test_oneshot.py compares the bytes a raw socket gets
with web.Response's over generated answers, so an aiohttp upgrade that moves them fails there.
"""

from __future__ import annotations

from aiohttp import hdrs, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.client_exceptions import ClientConnectionResetError
from aiohttp.compression_utils import MAX_SYNC_CHUNK_SIZE
from aiohttp.helpers import EMPTY_BODY_STATUS_CODES, rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE, HttpVersion11
from aiohttp.http_writer import StreamWriter, _serialize_headers
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import REASON_PHRASES
from multidict import CIMultiDict

_OCTETS = "application/octet-stream"
_EMPTY_OR_TUNNEL = frozenset({hdrs.METH_HEAD, hdrs.METH_CONNECT})
"""aiohttp's `must_be_empty_body` by method: never a body to a HEAD, none to a CONNECT's 2xx."""


class OneShot(web.Response):
    """A non-streamed answer: `status`, `body` and `headers` (taken over, not copied: the caller is done
    with them)."""

    def __init__(self, status: int, body: bytes, headers: CIMultiDict[str]) -> None:
        # web.Response.__init__ (and StreamResponse's, _set_status's) for this case, without the copy of the
        # headers: every other field keeps its class-level default.
        self._state = {}
        self._headers = headers
        self._status = status = int(status)
        self._reason = REASON_PHRASES.get(status, "")
        self._body = body
        self._zlib_executor_size = MAX_SYNC_CHUNK_SIZE
        self._zlib_executor = None

    async def prepare(self, request: BaseRequest) -> AbstractStreamWriter | None:
        body = self._body
        headers = self._headers
        writer = request._payload_writer
        if (
            self._keep_alive is not None  # force_close() was called (or this was prepared already)
            or self._payload_writer is not None
            or self._eof_sent
            or self._compression
            or self._chunked
            or self._cookies
            or type(body) is not bytes
            or hdrs.CONTENT_LENGTH in headers
            or request.version != HttpVersion11
            or not request.keep_alive
            or self._status in EMPTY_BODY_STATUS_CODES
            or request.method in _EMPTY_OR_TUNNEL  # (a CONNECT's error could have a body: it takes the long way)
            or type(writer) is not StreamWriter  # (the server's, without hooks: tests/test_oneshot.py)
        ):
            return await super().prepare(request)
        return await self._send(request, writer, body, headers)

    async def _send(
        self, request: BaseRequest, writer: StreamWriter, body: bytes, headers: CIMultiDict[str]
    ) -> AbstractStreamWriter:
        """Response._start + StreamResponse._start, _prepare_headers, _write_headers and write_eof for this
        one case, in their order."""
        self._must_be_empty_body = False
        self._keep_alive = True
        self._req = request
        self._payload_writer = writer
        size = len(body)
        headers[hdrs.CONTENT_LENGTH] = str(size)
        writer.length = size
        if size:
            headers.setdefault(hdrs.CONTENT_TYPE, _OCTETS)
        if hdrs.DATE not in headers:
            headers[hdrs.DATE] = rfc822_formatted_time()
        headers.setdefault(hdrs.SERVER, SERVER_SOFTWARE)
        await request._prepare_hook(self)
        data = _serialize_headers(f"HTTP/1.1 {self._status} {self._reason}", headers)
        if size:
            data += body
        # StreamWriter._writelines/_write's bookkeeping and check, for one buffer (they join small ones too)
        written = len(data)
        writer.buffer_size += written
        writer.output_size += written
        transport = writer.transport
        if transport is None or transport.is_closing():
            raise ClientConnectionResetError("Cannot write to closing transport")
        transport.write(data)
        await writer.drain()
        writer._eof = True
        self._eof_sent = True
        self._req = None
        self._body_length = writer.output_size
        self._payload_writer = None
        return writer
