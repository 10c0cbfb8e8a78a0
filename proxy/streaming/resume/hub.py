"""The process's resumable streams: a registry of rings (ring.py) by stream id and by Responses API
response id, the per-process limits (bytes buffered across streams, detached generations), the expiry of
ended streams, and, with the Redis state backend, the shared store a reader on another replica reads.

Transport-neutral: a producer appends stamped SSE blocks, a reader gets a `Source` and reads batches from
an id; how those bytes reach a client (the SSE writer in follow.py today) is the reader's business.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from aiohttp import web

from proxy.policy.plan import ResumableSpec
from proxy.streaming.resume.ring import Batch, Meta, Ring
from proxy.tasks import TaskSet
from proxy.telemetry.metrics import Metrics

STREAM_ID_HEADER = "x-signalbox-stream-id"
LAST_EVENT_ID = "Last-Event-ID"
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_DETACHED = 1000


class Shared(Protocol):
    """The Redis side (redis_events.py): a mirror of each ring, readable from any replica."""

    def mirror(self, ring: Ring, hub: Hub) -> None: ...

    async def find(self, key: str) -> Meta | None: ...

    async def read(self, meta: Meta, after: int, wait: float) -> Batch: ...

    async def newest(self, meta: Meta, count: int) -> tuple[list[bytes], bool]:
        """Up to `count` newest events, newest first, and whether the stream has ended."""
        ...

    async def cancel(self, meta: Meta) -> None: ...

    async def seen(self, meta: Meta) -> bool:
        """Has a reader on any replica read the stream within its ttl?"""
        ...

    async def close(self) -> None: ...


@dataclass(slots=True)
class Source:
    """Where a reader reads a stream from: this process's ring, or the shared store."""

    meta: Meta
    ring: Ring | None
    shared: Shared | None

    @property
    def where(self) -> str:
        return "local" if self.ring is not None else "shared"

    async def read(self, after: int, wait: float) -> Batch:
        if self.ring is not None:
            return await self.ring.read(after, wait)
        assert self.shared is not None
        return await self.shared.read(self.meta, after, wait)


class Hub:
    """Rings by id, their byte total and the detached count, with the process limits."""

    def __init__(
        self,
        metrics: Metrics | None = None,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_detached: int = DEFAULT_MAX_DETACHED,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.metrics = metrics
        self.max_bytes = max_bytes
        """Bytes of events held across every stream of the process: past it, the appending stream drops
        its own oldest events."""
        self.max_detached = max_detached
        """Generations that may run on without their client; one more client leaving stops its generation."""
        self.clock = clock
        self.rings: dict[str, Ring] = {}
        self.aliases: dict[str, str] = {}
        """Responses API response id -> stream id."""
        self.buffered = 0
        self.detached = 0
        self.shared: Shared | None = None
        self.stoppers: dict[str, Callable[[str], None]] = {}
        """Stream id -> stop(reason) of its running generation (cancel, ttl)."""
        self.tasks = TaskSet()
        self._expiry: dict[str, asyncio.TimerHandle] = {}
        if metrics is not None:
            metrics.streams_detached.set_function(lambda: self.detached)
            metrics.stream_buffered_bytes.set_function(lambda: self.buffered)

    @staticmethod
    def new_id() -> str:
        return "sbs_" + secrets.token_urlsafe(18)

    def open(self, meta: Meta, spec: ResumableSpec) -> Ring:
        ring = Ring(meta, spec.buffer, spec.ttl, last_read=self.clock())
        self.rings[meta.id] = ring
        if self.shared is not None:
            self.shared.mirror(ring, self)
        return ring

    def append(self, ring: Ring, event: bytes) -> None:
        """Add one stamped event, keeping the ring within its budget and the process within `max_bytes`."""
        before = ring.size
        ring.append(event)
        self.buffered += ring.size - before
        if self.buffered > self.max_bytes:
            freed = ring.trim(max(0, ring.size - (self.buffered - self.max_bytes)))
            self.buffered -= freed

    def name_response(self, ring: Ring, response_id: str) -> None:
        ring.response_id = response_id
        self.aliases[response_id] = ring.meta.id

    def end(self, ring: Ring) -> None:
        """The generation is over: readers get the rest, then the ring lives `ttl` more for late resumes."""
        ring.end()
        self.stoppers.pop(ring.meta.id, None)
        loop = asyncio.get_running_loop()
        self._expiry[ring.meta.id] = loop.call_later(ring.ttl, self.forget, ring.meta.id)

    def forget(self, stream_id: str) -> None:
        self._expiry.pop(stream_id, None)
        ring = self.rings.pop(stream_id, None)
        if ring is None:
            return
        if ring.response_id:
            self.aliases.pop(ring.response_id, None)
        self.buffered -= ring.release()

    def local(self, key: str) -> Ring | None:
        """A ring of this process by stream id or response id."""
        ring = self.rings.get(key)
        if ring is None and key in self.aliases:
            ring = self.rings.get(self.aliases[key])
        return ring

    async def find(self, key: str, tenant: str) -> Source | None:
        """The stream `key` names (a stream id or a response id) if `tenant` may read it; else None (the
        same answer whether it does not exist or is another tenant's, so ids cannot be probed)."""
        ring = self.local(key)
        if ring is not None:
            return Source(ring.meta, ring, None) if ring.meta.tenant == tenant else None
        if self.shared is None:
            return None
        meta = await self.shared.find(key)
        if meta is None or meta.tenant != tenant:
            return None
        return Source(meta, None, self.shared)

    async def stop(self, source: Source, reason: str) -> None:
        """Stop the stream's generation wherever it runs (here, or through the shared store elsewhere)."""
        stop = self.stoppers.get(source.meta.id)
        if stop is not None:
            stop(reason)
        elif self.shared is not None:
            await self.shared.cancel(source.meta)

    def resumed(self, source: Source) -> None:
        if self.metrics is not None:
            self.metrics.stream_resumes.labels(source.where).inc()

    def failed(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.stream_resume_failures.labels(reason).inc()

    def stopped(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.streams_stopped.labels(reason).inc()

    async def close(self) -> None:
        for handle in self._expiry.values():
            handle.cancel()
        self._expiry.clear()
        await self.tasks.close()
        if self.shared is not None:
            await self.shared.close()


HUB: web.AppKey[Hub] = web.AppKey("signalbox_streams", Hub)
"""The app's hub (set by proxy.app; the relay and ingress find it on the request's app)."""
