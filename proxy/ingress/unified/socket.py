"""`GET /signalbox/v1/stream` upgraded to a WebSocket: several unified requests multiplexed by a
client-chosen id over one socket (aiohttp's own WebSocket server).

The tenant is identified once, from the upgrade request (an unknown or missing key gets the 401 before
any upgrade). Client messages: `request` (id, path, body, headers) and `cancel` (id). Bounds from the
policy's `stream_socket`: requests in flight, message size, idle time, pings, the send buffer. Closing the
socket cancels every request on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping
from typing import Any

import orjson
from aiohttp import WebSocketError, WSCloseCode, WSMsgType, web
from multidict import CIMultiDict

from proxy.errors import InvalidRequest, ProxyError, RateLimited, render
from proxy.ingress.identify import identify, request_id_of
from proxy.ingress.unified import resume
from proxy.ingress.unified.run import new_call, serve, stream_body, target_of
from proxy.policy.plan import TenantRule
from proxy.policy.schema_sockets import StreamSocket
from proxy.runtime import STATE, Runtime
from proxy.streaming.resume.hub import HUB
from proxy.streaming.unified.channel import SocketChannel, send_lines
from proxy.streaming.unified.events import ERROR, FAILED, STREAM_COMPLETE, Encoder, error_payload
from proxy.streaming.unified.resumable import CANCEL_REASON
from proxy.tasks import spawn

PROTOCOL = "signalbox.v1"
"""The subprotocol a browser names (browsers cannot set headers on a WebSocket): chosen when offered."""
BEARER_PROTOCOL = "signalbox.bearer."
"""`signalbox.bearer.<key>` offered beside `signalbox.v1` carries the API key from a browser; never echoed."""
MAX_ID = 128
"""Longest request id a client may choose (printable ASCII)."""
_NOT_FORWARDED = ("sec-websocket-", "authorization", "x-api-key", "api-key")
"""Upgrade headers that are about the socket (or its tenant), not about any request sent over it."""


async def socket_handler(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    plan = state.plans.current
    offered = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
    key = next((p[len(BEARER_PROTOCOL):] for p in offered if p.startswith(BEARER_PROTOCOL)), None)
    try:
        tenant = identify(request.clone(headers=_with_key(request, key)) if key else request, plan)
    except ProxyError as err:
        return render(err, "openai", request_id_of(request.headers))
    bounds = plan.stream_socket
    ws = web.WebSocketResponse(
        heartbeat=bounds.ping_interval or None, max_msg_size=bounds.max_message, compress=False,
        writer_limit=bounds.send_buffer, protocols=(PROTOCOL,) if PROTOCOL in offered else (),
    )
    await ws.prepare(request)
    if request.transport is not None:
        request.transport.set_write_buffer_limits(high=bounds.send_buffer, low=bounds.send_buffer // 4)
    metrics = state.metrics.sockets
    metrics.opened()
    reason = "client_closed"
    try:
        reason = await Socket(request, ws, state, tenant, bounds).run()
    finally:
        metrics.closed(reason)
    return ws


class Socket:
    """One socket's requests by id, and its read loop."""

    def __init__(
        self, request: web.Request, ws: web.WebSocketResponse, state: Runtime, tenant: TenantRule, bounds: StreamSocket
    ) -> None:
        self.request = request
        self.ws = ws
        self.state = state
        self.tenant = tenant
        self.bounds = bounds
        self.running: dict[str, asyncio.Task[None]] = {}
        self.channels: dict[str, SocketChannel] = {}
        """The running requests' channels: a resumable one names its stream (`stream_id`)."""
        self.last_active = time.monotonic()
        base = CIMultiDict((k, v) for k, v in request.headers.items() if not k.lower().startswith(_NOT_FORWARDED))
        self.headers = base

    async def run(self) -> str:
        """Read until the client closes, the socket idles out or breaks; returns why it closed."""
        ws = self.ws
        try:
            while True:
                left = self.bounds.idle_timeout - (time.monotonic() - self.last_active)
                if self.running:
                    left = self.bounds.idle_timeout
                if left <= 0:
                    await ws.close(code=1000, message=b"idle timeout")
                    return "idle_timeout"
                try:
                    message = await ws.receive(timeout=left)
                except TimeoutError:
                    continue  # the loop decides: requests in flight keep the socket busy
                if message.type == WSMsgType.TEXT:
                    self.last_active = time.monotonic()
                    await self._on_text(message.data)
                elif message.type == WSMsgType.BINARY:
                    await self._refuse(None, InvalidRequest("send requests as JSON text messages"))
                elif message.type == WSMsgType.ERROR:
                    return "too_big" if _too_big(message.data) else "error"
                else:  # CLOSE, CLOSING, CLOSED
                    return "client_closed" if ws.close_code != 1006 else "gone"
        finally:
            await self._cancel_all()
            with contextlib.suppress(Exception):
                await ws.close()

    async def _cancel_all(self) -> None:
        """Cancel every request; one whose generation runs on detached (a resumable stream) is not waited
        for: it holds its slot until the generation ends, the socket is gone already."""
        tasks = list(self.running.items())
        for _, task in tasks:
            task.cancel()
        waited = [task for rid, task in tasks if self._generation(rid) is None]
        if waited:
            await asyncio.gather(*waited, return_exceptions=True)

    def _generation(self, rid: str) -> Callable[[str], None] | None:
        """The stop() of the resumable generation request `rid` reads, while it runs."""
        channel = self.channels.get(rid)
        if channel is None or channel.stream_id is None:
            return None
        return self.request.app[HUB].stoppers.get(channel.stream_id)

    async def _on_text(self, text: str) -> None:
        try:
            message = orjson.loads(text)
        except orjson.JSONDecodeError:
            await self._refuse(None, InvalidRequest("a message must be a JSON object"))
            return
        if not isinstance(message, dict):
            await self._refuse(None, InvalidRequest("a message must be a JSON object"))
            return
        kind = message.get("type")
        rid = message.get("id")
        if not isinstance(rid, str) or not 0 < len(rid) <= MAX_ID or not rid.isascii() or not rid.isprintable():
            await self._refuse(None, InvalidRequest(f"'id' must be a string of 1 to {MAX_ID} printable ASCII "
                                                    "characters", param="id"))
            return
        if kind == "cancel":
            stop = self._generation(rid)
            task = self.running.get(rid)
            if stop is not None:
                stop(CANCEL_REASON)  # the generation ends with stream_complete (cancelled), read as any event
            elif task is not None:
                task.cancel()  # its stream_complete (cancelled) is sent by the request itself
            return
        if kind not in ("request", "resume"):
            await self._refuse(rid, InvalidRequest("'type' must be 'request', 'resume' or 'cancel'", param="type"))
            return
        if rid in self.running:
            await self._refuse(rid, InvalidRequest(f"request '{rid}' is still running: choose another id"))
            return
        if len(self.running) >= self.bounds.max_in_flight:
            too_many = RateLimited(
                f"this socket already runs {len(self.running)} requests (stream_socket.max_in_flight); wait "
                "for one to complete", should_retry=True,
            )
            too_many.code = "too_many_in_flight"
            await self._refuse(rid, too_many)
            return
        if kind == "resume":
            reading = self._resume(rid, message.get("stream"), message.get("after"))
            self.running[rid] = spawn(reading, name="unified-resume")
            return
        self._start(rid, message)

    async def _resume(self, rid: str, stream: object, after: object) -> None:
        """A `resume` message: the events of stream `stream` after seq `after`, with this request id."""
        channel = self.channels[rid] = SocketChannel(self.ws, self.request, rid)
        hub = self.request.app[HUB]
        seq = after if isinstance(after, int) and not isinstance(after, bool) and after >= -1 else None
        try:
            source, _ = await resume.find(hub, self.tenant, stream, seq)
            assert seq is not None
            await resume.follow_for(self.state, hub, source, channel, seq)
        except ProxyError as err:
            with contextlib.suppress(ConnectionResetError):
                await channel.fail(err)
        except (ConnectionResetError, TimeoutError, asyncio.CancelledError):
            pass  # the socket is gone (or the client cancelled): the generation goes on without this reader
        finally:
            self.running.pop(rid, None)
            self.channels.pop(rid, None)
            self.last_active = time.monotonic()

    def _start(self, rid: str, message: Mapping[str, Any]) -> None:
        headers = CIMultiDict(self.headers)
        extra = message.get("headers")
        if isinstance(extra, dict):
            for name, value in extra.items():
                if isinstance(name, str) and isinstance(value, str) and not name.lower().startswith(_NOT_FORWARDED):
                    headers[name] = value
        request_id = request_id_of(headers)  # the message's own x-request-id if it is a plain token
        headers.pop("x-request-id", None)
        task = spawn(self._one(rid, message, headers, request_id), name="unified-request")
        self.running[rid] = task

    async def _one(self, rid: str, message: Mapping[str, Any], headers: CIMultiDict[str], request_id: str) -> None:
        channel = self.channels[rid] = SocketChannel(self.ws, self.request, rid)
        try:
            path = target_of(message.get("path"))
            body = stream_body(message.get("body"), path)
            call = new_call(self.state, request_id, path)
            view = self.request.clone(rel_url=path, headers=headers)
            await serve(view, self.state, channel, call, self.tenant, body)
        except ProxyError as err:  # refused before it reached the data path (a bad path or body)
            with contextlib.suppress(ConnectionResetError):
                await channel.fail(err)
        except asyncio.CancelledError:
            pass  # cancelled by the client or the socket's end: stream_complete already said so
        finally:
            self.running.pop(rid, None)
            self.channels.pop(rid, None)
            self.last_active = time.monotonic()

    async def _refuse(self, rid: str | None, error: ProxyError) -> None:
        """An `error` for a message that started no request (and its `stream_complete` if it named one)."""
        enc = Encoder("ws", rid or "")
        data = enc.encode(ERROR, error_payload(error))
        if rid is not None:
            data += enc.encode(STREAM_COMPLETE, {"finish_reason": FAILED})
        else:
            data = data.replace(b',"id":""', b',"id":null', 1)
        with contextlib.suppress(ConnectionResetError):
            await send_lines(self.ws, data)


def _too_big(error: object) -> bool:
    """aiohttp reports a message over max_msg_size as an ERROR carrying a WebSocketError (code 1009)."""
    return isinstance(error, WebSocketError) and error.code == WSCloseCode.MESSAGE_TOO_BIG


def _with_key(request: web.Request, key: str) -> CIMultiDict[str]:
    """The upgrade's headers with the subprotocol's key as the Authorization a header-sending client uses."""
    headers = CIMultiDict(request.headers)
    headers["Authorization"] = "Bearer " + key
    return headers
