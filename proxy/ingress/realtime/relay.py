"""The Realtime pass-through: tenant, route and session limit decided before the upgrade, then the upstream's
WebSocket opened with the upstream's own key, then messages relayed both ways unchanged.

Decided before the client's upgrade, so refusals are plain HTTP answers in OpenAI's error shape: 401 (no or
unknown key), 404 (no route for `/v1/realtime` and the `model`), 429 (a session limit), 502/504 (the upstream
refused or did not answer its handshake). Bounded: one message at a time per direction (the next is read only
once the previous one was handed to the other side's transport, which waits above `send_buffer`), messages
up to `max_message`, an idle session closed after `idle_timeout` on both sides.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Literal

import aiohttp
from aiohttp import WebSocketError, WSCloseCode, WSMsgType, web
from multidict import CIMultiDict

from proxy.errors import (
    InvalidRequest,
    NoRoute,
    ProxyError,
    RateLimited,
    UpstreamTimeout,
    UpstreamUnreachable,
    render,
)
from proxy.ingress.identify import identify, request_id_of
from proxy.ingress.realtime.sessions import Sessions
from proxy.policy.plan import UpstreamSpec
from proxy.policy.schema_sockets import Realtime
from proxy.runtime import STATE, Runtime
from proxy.tasks import spawn
from proxy.telemetry.sockets import SocketMetrics
from proxy.upstream.headers import upstream_headers

Upstream = aiohttp.ClientWebSocketResponse[Literal[False]]
"""The upstream's socket, text messages left as bytes (decode_text=False)."""
SESSIONS = web.AppKey("realtime_sessions", Sessions)
PATH = "/v1/realtime"
_NOT_FORWARDED = ("sec-websocket-", "origin")
CLIENT_TO_UPSTREAM = "client_to_upstream"
UPSTREAM_TO_CLIENT = "upstream_to_client"


async def realtime_handler(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    metrics = state.metrics.sockets
    request_id = request_id_of(request.headers)
    plan = state.plans.current
    limits = plan.realtime
    sessions = request.app[SESSIONS]
    try:
        tenant = identify(request, plan)
    except ProxyError as err:
        metrics.realtime_sessions.labels("refused_auth").inc()
        return render(err, "openai", request_id)
    model = request.query.get("model", "")
    try:
        spec, model_sent = _upstream_for(state, model, tenant)
    except ProxyError as err:
        metrics.realtime_sessions.labels("refused_route").inc()
        return render(err, "openai", request_id)
    why = sessions.refusal(tenant.name, limits)
    if why is not None:
        metrics.realtime_sessions.labels("refused_limit").inc()
        return render(RateLimited(why + "; close a session first", should_retry=False), "openai", request_id)
    outcome = "upstream_failed"
    try:
        upstream = await _connect(state, request, spec, model, model_sent, limits, request_id)
    except ProxyError as err:
        sessions.give(tenant.name)
        metrics.realtime_sessions.labels(outcome).inc()
        return render(err, "openai", request_id)
    metrics.realtime_active.inc()
    client = web.WebSocketResponse(
        max_msg_size=limits.max_message, compress=False, writer_limit=limits.send_buffer, autoping=True,
        protocols=(upstream.protocol,) if upstream.protocol else (), decode_text=False,
    )
    session = Session(client, upstream, limits, metrics)
    try:
        await client.prepare(request)
        await session.run()
    finally:
        # Cancelled (the client's connection went without a close frame) still ends as the client's doing.
        outcome = session.ended or "client_closed"
        sessions.give(tenant.name)
        metrics.realtime_active.dec()
        metrics.realtime_sessions.labels(outcome).inc()
        await upstream.close()
    return client


def _upstream_for(state: Runtime, model: str, tenant: object) -> tuple[UpstreamSpec, str]:
    """The upstream (and the model name it gets) of the route for /v1/realtime and `model`."""
    plan = state.plans.current
    route = plan.resolve(PATH, model, tenant)  # type: ignore[arg-type]
    if route is None:
        raise NoRoute(f"no route for model '{model}' on {PATH}", param="model")
    upstream_name = route.deployments[0].upstream if route.deployments else route.upstream
    rewrite = route.deployments[0].model if route.deployments else route.model_rewrite
    spec = plan.upstreams[upstream_name]
    if spec.provider == "anthropic":
        raise InvalidRequest(f"route '{route.name}' goes to an Anthropic upstream, which has no Realtime API")
    return spec, rewrite or model


async def _connect(
    state: Runtime, request: web.Request, spec: UpstreamSpec, model: str, model_sent: str, limits: Realtime,
    request_id: str,
) -> Upstream:
    session, base_url = state.clients.pool(spec.name)
    query = CIMultiDict(request.query)
    if model:
        query["model"] = model_sent
    for name, value in spec.query:
        query[name] = value
    client_headers = [(k, v) for k, v in request.headers.items() if not k.lower().startswith(_NOT_FORWARDED)]
    headers = upstream_headers(client_headers, spec, request_id=request_id)
    headers.pop("accept-encoding", None)
    protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
    try:
        async with asyncio.timeout(limits.connect_timeout):
            return await session.ws_connect(
                base_url.rstrip("/") + "/realtime", params=query, headers=headers, protocols=protocols,
                max_msg_size=limits.max_message, autoping=True, compress=0, decode_text=False,
                timeout=aiohttp.ClientWSTimeout(ws_close=5.0),
            )
    except aiohttp.WSServerHandshakeError as exc:
        raise UpstreamUnreachable(f"upstream '{spec.name}' refused the realtime session ({exc.status})") from None
    except TimeoutError:
        raise UpstreamTimeout(f"upstream '{spec.name}' did not open the realtime session in time") from None
    except aiohttp.ClientError as exc:
        raise UpstreamUnreachable(f"upstream '{spec.name}' is unreachable ({type(exc).__name__})") from None


class Session:
    """Relays one session's messages both ways until either side closes or it idles out."""

    def __init__(
        self, client: web.WebSocketResponse, upstream: Upstream, limits: Realtime,
        metrics: SocketMetrics,
    ) -> None:
        self.client = client
        self.upstream = upstream
        self.limits = limits
        self.metrics = metrics
        self.last_active = time.monotonic()
        self.ended: str | None = None

    async def run(self) -> str:
        up = spawn(self._pipe(self.client, self.upstream, CLIENT_TO_UPSTREAM, "client_closed"), name="realtime-up")
        down = spawn(self._pipe(self.upstream, self.client, UPSTREAM_TO_CLIENT, "upstream_closed"),
                     name="realtime-down")
        pipes = {up, down}
        try:
            while True:
                left = self.limits.idle_timeout - (time.monotonic() - self.last_active)
                if left <= 0:
                    self.ended = self.ended or "idle_timeout"
                    break
                done, _ = await asyncio.wait(pipes, timeout=left, return_when=asyncio.FIRST_COMPLETED)
                if done:
                    break
        finally:
            for pipe in pipes:
                pipe.cancel()
            await asyncio.gather(*pipes, return_exceptions=True)
            reason = b"idle timeout" if self.ended == "idle_timeout" else b""
            with contextlib.suppress(Exception):
                await self.client.close(code=_close_code(self.upstream, self.ended), message=reason)
            with contextlib.suppress(Exception):
                await self.upstream.close(code=1000, message=reason)
        return self.ended or "client_closed"

    async def _pipe(
        self,
        source: web.WebSocketResponse | Upstream,
        target: web.WebSocketResponse | Upstream,
        direction: str,
        closed: str,
    ) -> None:
        frames = self.metrics.realtime_frames.labels(direction)
        size = self.metrics.realtime_bytes.labels(direction)
        while True:
            message = await source.receive()
            if message.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                data: bytes = message.data  # decode_text=False: text arrives as its UTF-8 bytes, relayed as is
                await target.send_frame(data, message.type)
            elif message.type == WSMsgType.ERROR and _too_big(message.data):
                self.ended = self.ended or "too_big"
                return
            else:  # CLOSE, CLOSING, CLOSED or a broken connection
                self.ended = self.ended or closed
                return
            self.last_active = time.monotonic()
            frames.inc()
            size.inc(len(data))


def _close_code(upstream: Upstream, ended: str | None) -> int:
    if ended == "upstream_closed" and upstream.close_code:
        return upstream.close_code
    return 1009 if ended == "too_big" else 1000


def _too_big(error: object) -> bool:
    return isinstance(error, WebSocketError) and error.code == WSCloseCode.MESSAGE_TOO_BIG
