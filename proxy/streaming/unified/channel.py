"""Where one unified request's events go: an SSE response of its own, or its share of a WebSocket.

A channel frames events with its `Encoder` and hands the relay a `Sink` (proxy/streaming/sink.py: the one
timed write the watchdog judges a slow client by). Sending outside a stream (queued, a refusal, cancelled)
goes through `send`. What is bounded: SSE, the response's transport queue (the stream's `write_buffer`);
WebSocket, the socket's transport queue (`stream_socket.send_buffer`), shared by the requests on it.
"""

from __future__ import annotations

import time

from aiohttp import WSMsgType, web

from proxy.errors import ProxyError
from proxy.streaming.sink import Sink, Watch
from proxy.streaming.unified.events import (
    ERROR,
    FAILED,
    HEARTBEAT,
    STREAM_COMPLETE,
    Encoder,
    error_payload,
)

STREAM_ID_HEADER = "x-signalbox-stream-id"
SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


class Channel:
    """The transport-independent part: the encoder, and the terminal events every transport sends alike."""

    encoder: Encoder
    stream_id: str | None = None
    """The resumable stream this request's events are kept in (a route with `stream.resumable`)."""

    def from_ring(self, blocks: list[bytes]) -> bytes:
        """Events kept in a resumable stream's ring (unified SSE blocks) framed for this transport."""
        return b"".join(blocks)

    @property
    def opened(self) -> bool:
        """Events may have gone out: a refusal now is an `error` event, not an HTTP status."""
        return True

    async def send(self, data: bytes) -> None:
        raise NotImplementedError

    async def sink(self, watch: Watch, high: int) -> Sink:
        raise NotImplementedError

    async def finish(self) -> None:
        """The request's last event went out (SSE: the end of the body)."""

    async def fail(self, error: ProxyError) -> None:
        """`error`, then `stream_complete` with finish_reason `error`."""
        enc = self.encoder
        complete = enc.encode(STREAM_COMPLETE, {"finish_reason": FAILED})
        await self.send(enc.encode(ERROR, error_payload(error)) + complete)
        await self.finish()


class SSEChannel(Channel):
    """One POST's response: opened (200 and SSE headers) by the first event, queued or streamed."""

    def __init__(self, request: web.Request, request_id: str) -> None:
        self.request = request
        self.encoder = Encoder("sse")
        self.response: web.StreamResponse | None = None
        self._request_id = request_id

    @property
    def opened(self) -> bool:
        return self.response is not None

    async def open(self) -> web.StreamResponse:
        if self.response is None:
            response = web.StreamResponse(status=200, headers={**SSE_HEADERS, "x-request-id": self._request_id})
            if self.stream_id is not None:
                response.headers[STREAM_ID_HEADER] = self.stream_id
            await response.prepare(self.request)
            self.response = response
        return self.response

    async def send(self, data: bytes) -> None:
        await (await self.open()).write(data)

    async def sink(self, watch: Watch, high: int) -> Sink:
        response = await self.open()
        return SSESink(response, await response.prepare(self.request), self.request.transport, watch, high,
                       encoder=self.encoder)

    async def finish(self) -> None:
        if self.response is not None:
            await self.response.write_eof()


class SSESink(Sink):
    """The relay's sink with heartbeats as `heartbeat` events (numbered like the others)."""

    __slots__ = ("encoder",)

    def __init__(self, *args: object, encoder: Encoder, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.encoder = encoder

    def heartbeat(self) -> bytes:
        return self.encoder.encode(HEARTBEAT)


class SocketChannel(Channel):
    """One request's share of a WebSocket: its events carry its client-chosen `id`."""

    def __init__(self, ws: web.WebSocketResponse, request: web.Request, request_id: str) -> None:
        self.ws = ws
        self.request = request
        self.encoder = Encoder("ws", request_id)
        self.named = False
        """Has an event told the client its stream's id (`stream_id`, in the first event from the ring)?"""

    def from_ring(self, blocks: list[bytes]) -> bytes:
        out = []
        for block in blocks:
            obj = block[block.index(b"\ndata: ") + 7 : -2]
            at = obj.index(b'"seq":') + 6
            while obj[at] in _DIGITS:
                at += 1
            extra = b',"id":' + self.encoder.prefix
            if not self.named and self.stream_id is not None:
                extra += b',"stream_id":"' + self.stream_id.encode() + b'"'
                self.named = True
            out.append(obj[:at] + extra + obj[at:] + b"\n")
        return b"".join(out)

    async def send(self, data: bytes) -> None:
        await send_lines(self.ws, data)

    async def sink(self, watch: Watch, high: int) -> Sink:
        # No transport: the socket's buffer limits (stream_socket.send_buffer) are the socket's, set once by
        # its handler; a request's sink must not reset them to its stream's write_buffer.
        return SocketSink(self.ws, None, None, watch, high, encoder=self.encoder)


_DIGITS = frozenset(b"0123456789")


async def send_lines(ws: web.WebSocketResponse, data: bytes) -> None:
    """Each `\\n`-ended line of `data` as one text message. The socket's writer waits for the client once
    its queue passes `writer_limit` (set to the socket's send buffer), so a client that does not read
    stops every request on the socket at that bound."""
    if ws.closed:
        raise ConnectionResetError("the WebSocket is closed")
    start = 0
    while start < len(data):
        end = data.index(b"\n", start)
        await ws.send_frame(data[start:end], WSMsgType.TEXT)
        start = end + 1


class SocketSink(Sink):
    """The relay's sink over a WebSocket: messages instead of body writes, heartbeats as events."""

    __slots__ = ("encoder", "ws")

    def __init__(self, ws: web.WebSocketResponse, *args: object, encoder: Encoder, **kwargs: object) -> None:
        super().__init__(ws, *args, **kwargs)  # type: ignore[arg-type]
        self.ws = ws
        self.encoder = encoder

    def heartbeat(self) -> bytes:
        return self.encoder.encode(HEARTBEAT)

    async def write(self, data: bytes) -> None:
        watch = self.watch
        if not watch.writing:
            watch.write_started = time.monotonic()
        watch.writing += 1
        try:
            await send_lines(self.ws, data)
        except ConnectionError:
            raise ConnectionResetError("the WebSocket is closed") from None
        finally:
            watch.writing -= 1
            watch.last_write = time.monotonic()


__all__ = ["Channel", "SSEChannel", "SocketChannel", "send_lines"]
