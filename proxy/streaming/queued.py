"""The waiting room of a stream: its 200 and SSE headers go out at once, comments follow while it waits."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp
from aiohttp import web

from proxy.call import Call
from proxy.errors import ProxyError, UpstreamBadResponse, UpstreamUnreachable
from proxy.streaming.failure import finish_with_error, read_failure
from proxy.streaming.sse import encode_comment
from proxy.streaming.whole import BodyTransform, read_body, too_large
from proxy.tasks import spawn
from proxy.upstream.body import Whole


class QueuedStream:
    """A streamed request that must wait (for a queue slot or a limit) and whose queue sets
    `heartbeat_while_queued`: the 200 and SSE headers go out at once, then a comment such as
    `: queued position=12` every heartbeat, so load balancers do not cut the idle connection.

    The trade-off: once the 200 is out, a later refusal (queue timeout, cleared, an upstream error)
    reaches the client only as an error event inside the stream, not as a 429/503 status.
    """

    __slots__ = ("request", "call", "interval", "response", "_task", "_status")

    def __init__(self, request: web.Request, call: Call, interval: float) -> None:
        self.request = request
        self.call = call
        self.interval = interval
        self.response: web.StreamResponse | None = None
        self._task: asyncio.Task[None] | None = None
        self._status: Callable[[], str] = lambda: "queued"

    async def begin(self, status: Callable[[], str]) -> None:
        self._status = status
        if self.response is None:
            headers = {
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
                "x-request-id": self.call.request_id,
            }
            if self.call.protocol == "anthropic":
                headers["request-id"] = self.call.request_id  # the anthropic SDK's `_request_id`
            if self.call.route is not None:
                headers["x-signalbox-route"] = self.call.route.name
            response = web.StreamResponse(status=200, headers=headers)
            try:
                await response.prepare(self.request)
            except ConnectionResetError:
                self.call.client_gone = True
                return
            self.response = response
        await self._beat()
        if self.interval > 0 and self._task is None:
            self._task = spawn(self._beats(), name="queued-heartbeat")

    def end(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _beat(self) -> None:
        assert self.response is not None
        try:
            await self.response.write(encode_comment(self._status(), end_block=True))
        except ConnectionResetError:
            self.call.client_gone = True

    async def _beats(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self._beat()

    async def fail(self, error: ProxyError) -> web.StreamResponse:
        """A refusal after the 200 went out: one error event in the client's protocol, then the end."""
        assert self.response is not None
        self.end()
        self.call.status = 200
        await finish_with_error(self.response, self.call, error)
        return self.response

    async def relay_whole(
        self,
        upstream: aiohttp.ClientResponse,
        transform: BodyTransform | None = None,
        read_timeout: float | None = None,
        whole: Whole | None = None,
    ) -> web.StreamResponse:
        """The upstream answered without a stream (an error, usually): pass it on as one error event.
        `whole`: what dispatch already read of it."""
        try:
            if whole is None:
                whole = await read_body(upstream, read_timeout, self.call.plan.max_buffered_response)
            if not whole.complete:
                upstream.close()
                return await self.fail(UpstreamBadResponse(too_large(self.call, upstream)))
        except (TimeoutError, aiohttp.ClientError) as exc:
            return await self.fail(read_failure(self.call, exc))
        finally:
            upstream.release()
        body = whole.data
        assert self.response is not None
        status = upstream.status
        if transform is not None:
            status, body = transform(status, body)  # the error body in the client's protocol
        body = body.strip()
        self.call.status = 200
        if status >= 400 and body.startswith(b"{") and b'"error"' in body:
            head = b"event: error\n" if self.call.protocol == "anthropic" else b""
            frame = head + b"data: " + body + b"\n\n"
            self.call.error = f"upstream_{status}"
            try:
                await self.response.write(frame)
                await self.response.write_eof()
            except ConnectionResetError:
                self.call.client_gone = True
            return self.response
        what = f"upstream '{self.call.upstream}' answered {upstream.status} without a stream"
        return await self.fail(UpstreamUnreachable(what))
