"""Metrics of the WebSocket endpoints: the unified stream's sockets and the Realtime pass-through's sessions.
Requests sent over a unified socket are counted like every request (signalbox_requests_total and the rest,
from their `Call`); these count the sockets and sessions themselves."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class SocketMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.sockets_active = Gauge(
            "signalbox_stream_sockets_active", "Unified-stream WebSockets open now.", registry=r,
        )
        self.sockets = Counter(
            "signalbox_stream_sockets", "Unified-stream WebSockets closed, by why: client_closed, idle_timeout, "
            "too_big (a message over stream_socket.max_message), gone (no close frame), error.", ["reason"],
            registry=r,
        )
        self.realtime_active = Gauge(
            "signalbox_realtime_sessions_active", "Realtime pass-through sessions open now.", registry=r,
        )
        self.realtime_sessions = Counter(
            "signalbox_realtime_sessions", "Realtime sessions ended (or refused), by outcome: client_closed, "
            "upstream_closed, idle_timeout, too_big, refused_limit, refused_auth, upstream_failed.",
            ["outcome"], registry=r,
        )
        self.realtime_frames = Counter(
            "signalbox_realtime_frames", "Realtime messages relayed, by direction (client_to_upstream, "
            "upstream_to_client).", ["direction"], registry=r,
        )
        self.realtime_bytes = Counter(
            "signalbox_realtime_bytes", "Realtime message payload bytes relayed, by direction.", ["direction"],
            registry=r,
        )

    def opened(self) -> None:
        self.sockets_active.inc()

    def closed(self, reason: str) -> None:
        self.sockets_active.dec()
        self.sockets.labels(reason).inc()
