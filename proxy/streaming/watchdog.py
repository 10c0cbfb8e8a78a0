"""The one timer per stream: heartbeats, the first-token and idle limits, the deadline, a slow client."""

from __future__ import annotations

import asyncio
import time

import aiohttp
from aiohttp import web

from proxy.errors import SlowClient, UpstreamTimeout
from proxy.policy.plan import TimeoutSpec
from proxy.streaming.settings import StreamSettings
from proxy.streaming.sink import Sink
from proxy.tasks import spawn


class Watchdog:
    """Wakes at the next due time: heartbeat, first token, idle, deadline or slow client.

    A timer re-armed at each wake-up rather than a task per stream (the task, its coroutine and its
    cancellation cost about 1 µs per relayed event in bench/overhead.py); a heartbeat write, when one
    is due (after `heartbeat` of silence, so rarely), runs as a short task of its own."""

    __slots__ = (
        "request", "sink", "upstream", "watch", "timeouts", "settings", "deadline", "started", "_loop",
        "_handle", "_beating", "_stopped",
    )

    def __init__(
        self,
        request: web.Request,
        sink: Sink,
        upstream: aiohttp.ClientResponse,
        timeouts: TimeoutSpec,
        settings: StreamSettings,
        deadline: float,
        sent_ago: float = 0.0,
    ) -> None:
        self.request = request
        self.sink = sink
        self.upstream = upstream
        self.watch = sink.watch
        self.timeouts = timeouts
        self.settings = settings
        self.deadline = deadline
        self.started = time.monotonic() - sent_ago  # when the request went upstream
        self._loop = asyncio.get_running_loop()
        self._handle: asyncio.TimerHandle | None = None
        self._beating: asyncio.Task[None] | None = None
        self._stopped = False
        self._wake()

    def stop(self) -> None:
        self._stopped = True
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._beating is not None and not self._beating.done():
            self._beating.cancel()

    def _wake(self) -> None:
        self._handle = None
        if self._stopped:
            return
        watch, settings, timeouts, upstream = self.watch, self.settings, self.timeouts, self.upstream
        now = time.monotonic()
        if watch.writing and now - watch.write_started >= settings.slow_client:
            watch.failure = SlowClient("client stopped reading; stream ended by the slow-client limit")
            upstream.close()
            if self.request.transport is not None:
                self.request.transport.abort()  # the blocked write then fails and the relay loop ends
            return
        limit, reason = (
            (watch.last_event + timeouts.idle, "idle")
            if watch.first_event
            else (self.started + timeouts.first_token, "first_token")
        )
        if now >= self.deadline:
            limit, reason = self.deadline, "total"
        if now >= limit:
            watch.failure = UpstreamTimeout(_timeout_message(reason, timeouts))
            upstream.close()
            return
        if settings.heartbeat > 0 and not watch.writing and now - watch.last_write >= settings.heartbeat:
            self._beating = spawn(self._beat(), name="heartbeat")
            return
        due = min(limit, self.deadline)
        if not watch.first_event:  # once the first event arrives the nearer idle limit applies: look again by then
            due = min(due, now + timeouts.idle)
        due = min(due, watch.write_started + settings.slow_client if watch.writing else now + settings.slow_client)
        if settings.heartbeat > 0:
            due = min(due, watch.last_write + settings.heartbeat)
        self._handle = self._loop.call_later(max(0.005, due - now), self._wake)

    async def _beat(self) -> None:
        try:
            await self.sink.beat()
        except Exception:  # the client is gone (ConnectionResetError) or the response broke: stop generating
            self.upstream.close()
            return
        self._wake()



def _timeout_message(reason: str, timeouts: TimeoutSpec) -> str:
    if reason == "first_token":
        return f"upstream sent no event within timeouts.first_token ({timeouts.first_token:g}s)"
    if reason == "idle":
        return f"upstream went silent for longer than timeouts.idle ({timeouts.idle:g}s)"
    return "the request ran past its total deadline (timeouts.total)"
