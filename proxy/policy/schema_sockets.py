"""Policy models for the WebSocket endpoints: the unified stream's socket (docs/apps/unified-stream.md) and
the Realtime API pass-through (docs/apps/realtime.md). Read per connection from the current plan."""

from __future__ import annotations

from pydantic import Field

from proxy.policy.schema_base import Strict
from proxy.policy.units import ByteSize, Duration


class StreamSocket(Strict):
    """Bounds of one unified-stream WebSocket (`GET /signalbox/v1/stream`)."""

    max_in_flight: int = Field(default=16, ge=1, le=1024)
    """Requests one socket may run at once; one more is answered with an `error` event (429,
    `too_many_in_flight`) and its `stream_complete`, and the socket stays open."""
    max_message: ByteSize = 1024 * 1024
    """Largest message the client may send (a request with its body); a larger one closes the socket
    with code 1009 (message too big)."""
    idle_timeout: Duration = 60.0
    """A socket with no request in flight and no message from the client for this long is closed
    (code 1000, reason `idle timeout`)."""
    ping_interval: Duration = 20.0
    """The proxy pings the client this often; a client that does not answer with a pong within half of
    it is gone (its requests are cancelled). 0 turns pings off."""
    send_buffer: ByteSize = 64 * 1024
    """Bytes queued for the client above which every request on the socket waits for it to read (and
    stops reading its upstream); a wait longer than the route's `stream.slow_client` closes the socket."""


class Realtime(Strict):
    """The Realtime API pass-through (`GET /v1/realtime`, a WebSocket relayed to an OpenAI-compatible
    upstream that the route for `/v1/realtime` and the `model` query parameter resolve to)."""

    max_sessions: int = Field(default=100, ge=0, le=100_000)
    """Sessions open at once through this proxy; one more is refused with 429 before the upgrade."""
    max_sessions_per_tenant: int | None = Field(default=None, ge=0, le=100_000)
    """Sessions one tenant may hold open at once (unset: only `max_sessions` applies)."""
    idle_timeout: Duration = 300.0
    """A session in which neither side sent a message for this long is closed (code 1000, reason
    `idle timeout`) on both sides."""
    max_message: ByteSize = 16 * 1024 * 1024
    """Largest message relayed either way (audio appends are large); a larger one closes the session
    with code 1009."""
    send_buffer: ByteSize = 1024 * 1024
    """Bytes queued toward either side above which the relay stops reading from the other side."""
    connect_timeout: Duration = 10.0
    """Longest wait for the upstream's WebSocket handshake; past it the client gets 504."""


__all__ = ["Realtime", "StreamSocket"]
