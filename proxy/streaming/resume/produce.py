"""The generation of a resumable stream: the relay's own pump (pump.py, framing.py) and watchdog, writing to
the stream's ring instead of a client, in a task of its own so that it outlives the client's connection.

Each whole event the framer hands over is stamped with its id and appended; heartbeats are the readers'
business (each reader writes its own), so the producer's watchdog keeps only the upstream's limits
(first token, idle, `timeouts.total`). However the stream ends, the ring gets its end, and a failure its one
error event in the client's protocol, so every reader ends the same way.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import aiohttp
import orjson
from aiohttp import web

from proxy.call import Call
from proxy.errors import ProxyError, stream_error_frame
from proxy.policy.plan import TimeoutSpec
from proxy.policy.redact import Redactor
from proxy.providers.exchange import StreamTranslator
from proxy.streaming.pump import pump
from proxy.streaming.reclaim import RECLAIMER
from proxy.streaming.resume.events import split, stamp
from proxy.streaming.resume.hub import Hub
from proxy.streaming.resume.ring import Ring
from proxy.streaming.settings import StreamSettings
from proxy.streaming.sink import Sink, Watch
from proxy.streaming.sse import SSEDecoder, SSEEvent
from proxy.streaming.watchdog import Watchdog


class Stopped(ProxyError):
    """A generation the proxy stopped on purpose (a cancel request, nobody read it for `ttl`)."""

    status = 200  # the stream's status had gone out already
    type = "server_error"
    code = "stream_stopped"
    outcome = "cancelled"


@dataclass(slots=True)
class Generation:
    """What producing needs from the call's answer (relay.Answer's parts, without importing the relay)."""

    upstream: aiohttp.ClientResponse
    timeouts: TimeoutSpec
    deadline: float
    redact: Redactor
    translator: StreamTranslator | None
    settings: StreamSettings
    sent_ago: float
    """Seconds since the request went upstream (first_token counts from then)."""


class RingSink(Sink):
    """A Sink whose writes go to a ring: split into events, stamped, appended; never blocks."""

    __slots__ = ("hub", "ring", "name_response")

    def __init__(self, hub: Hub, ring: Ring, watch: Watch, responses: bool) -> None:
        super().__init__(web.StreamResponse(), None, None, watch)
        self.hub = hub
        self.ring = ring
        self.name_response = responses
        """A Responses API stream whose response id is not known yet."""

    async def write(self, data: bytes) -> None:
        hub, ring = self.hub, self.ring
        for event in split(data):
            if self.name_response:
                self._name(event)
            if ring.blocked(len(event)):
                await ring.room(len(event))  # an attached reader still needs the oldest event: backpressure
            hub.append(ring, stamp(event, ring.next))
        self.watch.last_write = time.monotonic()

    async def beat(self) -> None:
        return  # heartbeats are per reader (follow.py)

    def _name(self, event: bytes) -> None:
        """Register the response id of a Responses stream's first event (response.created)."""
        if b'"response"' not in event:
            return
        self.name_response = False
        try:
            data = orjson.loads(SSEEvent(event).data_bytes())
        except orjson.JSONDecodeError:
            return
        response = data.get("response") if isinstance(data, dict) else None
        if isinstance(response, dict) and isinstance(response.get("id"), str) and response["id"]:
            self.hub.name_response(self.ring, response["id"])


async def produce(
    request: web.Request,
    call: Call,
    hub: Hub,
    ring: Ring,
    gen: Generation,
    open_streams: set[Callable[[ProxyError], None]] | None,
) -> None:
    """Relay the upstream's events into `ring` until the stream ends, fails or is stopped."""
    upstream = gen.upstream
    watch = Watch(time.monotonic())
    sink = RingSink(hub, ring, watch, responses=call.path == "/v1/responses")
    quiet = replace(gen.settings, heartbeat=0.0)
    dog = Watchdog(request, sink, upstream, gen.timeouts, quiet, gen.deadline, gen.sent_ago)

    def end(error: ProxyError) -> None:
        """Stop at the next event boundary with `error` (the drain at shutdown, a cancel, the ttl)."""
        if watch.failure is None:
            watch.failure = error
        upstream.close()

    def stop(reason: str) -> None:
        hub.stopped(reason)
        end(Stopped(f"the stream was stopped ({reason})"))

    hub.stoppers[ring.meta.id] = stop
    if open_streams is not None:
        open_streams.add(end)
    ended = False
    try:
        await pump(sink, upstream, SSEDecoder(), call, gen.settings, gen.translator, gen.redact)
        ended = watch.failure is None
    finally:
        dog.stop()
        if open_streams is not None:
            open_streams.discard(end)
        failure = watch.failure
        if failure is not None:
            call.error = failure.reason
            call.failure = failure
            hub.append(ring, stamp(stream_error_frame(failure, call.protocol, call.request_id), ring.next))
        hub.end(ring)
        if ended and upstream.content.at_eof():
            upstream.release()
        else:
            upstream.close()
        RECLAIMER.stream_ended()
