"""A stream's settings: the process defaults (command line) with a route's `stream:` overrides."""

from __future__ import annotations

from dataclasses import dataclass, replace

from proxy.policy.plan import ResumableSpec, StreamSpec


@dataclass(frozen=True, slots=True)
class StreamSettings:
    heartbeat: float = 15.0
    """Write `: ping` after this much downstream silence (0 turns heartbeats off)."""
    slow_client: float = 60.0
    """End the stream when one write to the client has been blocked this long."""
    max_event_buffer: int = 16 * 1024 * 1024
    """Largest partial event held while waiting for its end."""
    write_buffer: int = 4 * 1024
    """Bytes queued for a client above which the relay waits for it and stops reading the upstream: with the
    upstream reader's buffer (proxy/upstream/client.py, STREAM_READ_BUFSIZE) what a client that stopped
    reading costs in stream data (docs/streams-memory.md)."""
    resumable: ResumableSpec | None = None
    """The route's resumable streams (a route setting only; proxy/streaming/resume/)."""
    resume_max_bytes: int = 256 * 1024 * 1024
    """Bytes of events held for resumable streams across the process (serve --resume-max-bytes)."""
    resume_max_detached: int = 1000
    """Generations that may run on without their client at once (serve --resume-max-detached)."""


def route_settings(process: StreamSettings, route: StreamSpec | None) -> StreamSettings:
    """The process settings with a route's `stream:` overrides applied."""
    if route is None:
        return process
    return replace(
        process,
        heartbeat=process.heartbeat if route.heartbeat is None else route.heartbeat,
        slow_client=process.slow_client if route.slow_client is None else route.slow_client,
        resumable=route.resumable,
    )
