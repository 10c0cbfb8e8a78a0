"""Resumable streams in Redis Streams, so that a reader that reaches another replica resumes too.

Each stream's ring (ring.py) is mirrored by one flusher task, itself a reader of the ring: it sends what is
new in one pipeline per batch (`XADD` with explicit ids `0-(seq+1)`, trimmed with `MINID ~` to the ring's
byte budget, and the keys' expiry), then an end entry when the stream ends. Readers on this replica read the
ring; a reader elsewhere reads Redis: `XRANGE` for what is there, `XREAD BLOCK` for the live tail. Because
ids are consecutive, a reader sees at once whether the events it needs were trimmed away.

    {prefix}:rs:{<stream id>}          the events (field d: the stamped SSE block; field end: the end)
    {prefix}:rs:{<stream id>}:meta     tenant, protocol, path, route, ttl
    {prefix}:rs:{<stream id>}:seen     set by remote readers while they read (the ttl counts from the last)
    {prefix}:rs:{<stream id>}:cancel   set by a cancel that reached another replica
    {prefix}:rs:alias:<response id>    a Responses API response id -> stream id

Keys of one stream share a hash slot (the braces), for Redis Cluster. If Redis fails, the stream goes on for
the readers of this replica; only resuming elsewhere is lost (logged, counted as a `store` failure).
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

from redis.exceptions import RedisError

from proxy.errors import Protocol
from proxy.streaming.resume.hub import Hub
from proxy.streaming.resume.ring import MAX_BATCH, Batch, Dropped, Meta, Ring, StoreDown

log = logging.getLogger("signalbox.streams")
IDLE_FLUSH = 5.0
"""Longest pause between two flushes of a silent stream (the keys' expiry and a remote cancel are looked at)."""
LIVE_MARGIN = 600.0
"""Seconds a running stream's keys outlive its last flush beyond its ttl."""


def _entry_id(seq: int) -> str:
    return f"0-{seq + 1}"


def _seq(entry_id: bytes | str) -> int:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.partition("-")[2]) - 1


class RedisEvents:
    """The `Shared` store of hub.py over one redis-py asyncio client (its own pool: blocked tail reads must
    not hold the limiter store's connections)."""

    def __init__(self, client: Any, prefix: str) -> None:
        self.client = client
        self.prefix = prefix

    def _key(self, stream_id: str) -> str:
        return f"{self.prefix}:rs:{{{stream_id}}}"

    def mirror(self, ring: Ring, hub: Hub) -> None:
        hub.tasks.spawn(self._flush(ring, hub), name="resumable-stream-mirror")

    async def _flush(self, ring: Ring, hub: Hub) -> None:
        meta = ring.meta
        key = self._key(meta.id)
        live_ms = round((meta.ttl + LIVE_MARGIN) * 1000)
        sizes: deque[tuple[int, int]] = deque()  # (seq, bytes) of what Redis should still hold
        held = 0
        after = -1
        named = False
        try:
            await self.client.hset(key + ":meta", mapping={
                "tenant": meta.tenant, "protocol": meta.protocol, "path": meta.path, "route": meta.route,
                "ttl": repr(meta.ttl),
            })
            while True:
                try:
                    batch = await ring.read(after, IDLE_FLUSH)
                except Dropped:
                    after = ring.first - 1  # the ring moved on faster than Redis took it: Redis drops them too
                    continue
                pipe = self.client.pipeline(transaction=False)
                for offset, event in enumerate(batch.events):
                    seq = batch.first + offset
                    sizes.append((seq, len(event)))
                    held += len(event)
                    while held > ring.budget and len(sizes) > 1:
                        held -= sizes.popleft()[1]
                    pipe.xadd(key, {"d": event}, id=_entry_id(seq), minid=_entry_id(sizes[0][0]), approximate=True)
                if batch.events:
                    after = batch.first + len(batch.events) - 1
                if ring.response_id and not named:
                    named = True
                    pipe.set(f"{self.prefix}:rs:alias:{ring.response_id}", meta.id, px=live_ms)
                if batch.ended:
                    pipe.xadd(key, {"end": b"1"}, id=_entry_id(batch.first))
                expire = round(meta.ttl * 1000) if batch.ended else live_ms
                pipe.pexpire(key, expire)
                pipe.pexpire(key + ":meta", expire)
                if named:
                    pipe.pexpire(f"{self.prefix}:rs:alias:{ring.response_id}", expire)
                pipe.exists(key + ":cancel")
                results = await pipe.execute()
                if results[-1]:
                    stop = hub.stoppers.get(meta.id)
                    if stop is not None:
                        stop("cancelled")
                if batch.ended:
                    return
        except RedisError as exc:
            log.warning("resumable stream %s: Redis failed (%s); it resumes on this replica only",
                        meta.id, type(exc).__name__)
            hub.failed("store")

    async def find(self, key: str) -> Meta | None:
        try:
            stream_id = key
            if not key.startswith("sbs_"):
                found = await self.client.get(f"{self.prefix}:rs:alias:{key}")
                if found is None:
                    return None
                stream_id = found.decode() if isinstance(found, bytes) else str(found)
            fields = await self.client.hgetall(self._key(stream_id) + ":meta")
        except RedisError:
            return None
        if not fields:
            return None
        got = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
               for k, v in fields.items()}
        protocol: Protocol = "anthropic" if got.get("protocol") == "anthropic" else "openai"
        return Meta(stream_id, got.get("tenant", ""), protocol, got.get("path", ""), got.get("route", ""),
                    float(got.get("ttl", "300")))

    async def read(self, meta: Meta, after: int, wait: float) -> Batch:
        key = self._key(meta.id)
        start = after + 1
        try:
            await self.client.set(key + ":seen", b"1", px=max(1, round(meta.ttl * 1000)))
            entries = await self.client.xrange(key, min=_entry_id(start), count=MAX_BATCH)
            if not entries and wait > 0:
                found = await self.client.xread({key: f"0-{start}"}, count=MAX_BATCH, block=max(1, round(wait * 1000)))
                entries = found[0][1] if found else []
            if not entries and not await self.client.exists(key + ":meta"):
                raise StoreDown("the stream expired")
        except RedisError as exc:
            raise StoreDown(f"the shared stream store failed ({type(exc).__name__})") from None
        return _batch(entries, start)

    async def newest(self, meta: Meta, count: int) -> tuple[list[bytes], bool]:
        try:
            entries = await self.client.xrevrange(self._key(meta.id), count=count)
        except RedisError:
            return [], False
        ended = bool(entries) and b"end" in entries[0][1]
        return [fields[b"d"] for _, fields in entries if b"d" in fields], ended

    async def cancel(self, meta: Meta) -> None:
        try:
            await self.client.set(self._key(meta.id) + ":cancel", b"1", px=max(1, round(meta.ttl * 1000)))
        except RedisError:
            log.warning("resumable stream %s: a cancel could not reach Redis", meta.id)

    async def seen(self, meta: Meta) -> bool:
        try:
            return bool(await self.client.exists(self._key(meta.id) + ":seen"))
        except RedisError:
            return False

    async def close(self) -> None:
        await self.client.aclose()


def _batch(entries: list[Any], start: int) -> Batch:
    """Events from Redis entries that should begin at id `start` (raises Dropped on a gap)."""
    if not entries:
        return Batch(start, [], False)
    first = _seq(entries[0][0])
    if first != start:
        raise Dropped(f"events after id {start - 1} are no longer buffered")
    events: list[bytes] = []
    for _, fields in entries:
        data = fields.get(b"d")
        if data is None:
            return Batch(start, events, not events)
        events.append(data)
    return Batch(start, events, False)
