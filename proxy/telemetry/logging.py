"""JSON access log: one line per request, keyed by request id, written without the logging module.

`logging` costs tens of microseconds per record; an access line is built with orjson and written
to a buffered stream. No header values and no bodies are logged, so keys cannot leak here.
"""

from __future__ import annotations

import sys
from typing import IO

import orjson

from proxy.call import Call


class AccessLog:
    def __init__(self, stream: IO[bytes] | None = None, enabled: bool = True) -> None:
        self._stream = stream if stream is not None else sys.stdout.buffer
        self.enabled = enabled

    def write(self, call: Call) -> None:
        if not self.enabled:
            return
        line = {
            "ts": round(call.started_wall, 3),
            "request_id": call.request_id,
            "method": call.method,
            "path": call.path,
            "tenant": call.tenant.name if call.tenant else None,
            "route": call.route.name if call.route else None,
            "model": call.model or None,
            "upstream": call.upstream or None,
            "stream": call.stream,
            "status": call.status,
            "duration_ms": round(call.elapsed() * 1000, 2),
            "ttfb_ms": round(call.marks["upstream_headers"] * 1000, 2) if "upstream_headers" in call.marks else None,
            "attempts": [
                {"upstream": a.upstream, "status": a.status, "ms": round(a.duration * 1000, 2), "error": a.error}
                for a in call.attempts
            ],
            "events": call.events_relayed or None,
            "bytes": call.bytes_out,
            "error": call.error,
            "client_gone": call.client_gone or None,
        }
        try:
            self._stream.write(orjson.dumps(line) + b"\n")
            self._stream.flush()
        except (OSError, ValueError):
            pass  # a closed or broken stdout must never fail a request
