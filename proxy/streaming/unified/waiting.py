"""The unified stream's waiting room: `queued` events (position, eta) while a request waits for a queue slot
or an upstream's limit, through the flow's `WaitingRoom` port (proxy/call.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from proxy.call import Call
from proxy.streaming.unified.channel import Channel
from proxy.streaming.unified.events import QUEUED, queued_payload
from proxy.tasks import spawn

QUEUED_EVERY = 1.0
"""Seconds between two `queued` events while the place in line or the eta changes; an unchanged status is
repeated only every `heartbeat` seconds (the stream's heartbeat keeps idle connections open)."""


class UnifiedWaiting:
    """Sends `queued` at once when the wait begins, then whenever the status changes (checked every
    QUEUED_EVERY s) or `heartbeat` s have passed; a client that left ends the wait (client_gone)."""

    __slots__ = ("channel", "call", "heartbeat", "_task", "_status", "_sent")

    def __init__(self, channel: Channel, call: Call, heartbeat: float) -> None:
        self.channel = channel
        self.call = call
        self.heartbeat = heartbeat
        self._task: asyncio.Task[None] | None = None
        self._status: Callable[[], str] = lambda: "queued"
        self._sent = ""

    async def begin(self, status: Callable[[], str]) -> None:
        self._status = status
        await self._send()
        if self._task is None:
            self._task = spawn(self._updates(), name="unified-queued")

    def end(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _send(self) -> None:
        text = self._status()
        self._sent = text
        try:
            await self.channel.send(self.channel.encoder.encode(QUEUED, queued_payload(text)))
        except ConnectionResetError:
            self.call.client_gone = True

    async def _updates(self) -> None:
        quiet = 0.0
        while True:
            await asyncio.sleep(QUEUED_EVERY)
            quiet += QUEUED_EVERY
            if self._status() != self._sent or (self.heartbeat > 0 and quiet >= self.heartbeat):
                quiet = 0.0
                await self._send()
