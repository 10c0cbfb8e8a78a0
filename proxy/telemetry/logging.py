"""JSON access log: one line per request, keyed by request id, written without the logging module.

`logging` costs tens of microseconds per record; an access line is built with orjson and written
to a buffered stream. The stream is flushed at most `FLUSH_AFTER` seconds after a line was
written (one timer per batch of lines, not a write system call per request) and when the app
stops. No header values and no bodies are logged, so keys cannot leak here.
"""

from __future__ import annotations

import asyncio
import io
import sys
from time import perf_counter
from typing import IO

import orjson

from proxy.call import Attempt, Call

FLUSH_AFTER = 0.1
"""Longest time a written line may wait in the buffer: `kubectl logs` shows requests promptly."""


def _stdout() -> IO[bytes]:
    """Our own buffer over fd 1: with PYTHONUNBUFFERED=1 (usual in containers) `sys.stdout.buffer` is
    the raw file, which would make every line a system call."""
    try:
        raw = io.FileIO(sys.stdout.fileno(), "wb", closefd=False)
    except (AttributeError, OSError, ValueError):  # stdout replaced or closed (embedding, tests)
        return sys.stdout.buffer
    return io.BufferedWriter(raw, buffer_size=64 * 1024)


def _ms2(seconds: float) -> float:
    """Milliseconds to 2 decimals, as round(seconds * 1000, 2) gives them for durations (non-negative, far
    from a float's precision): round() with digits goes through a decimal string, about 5x the cost.
    Inlined where the value is a perf_counter() reading or difference from the call's or the attempt's start,
    so never negative: there `(x + 0.5) // 1` is `int(x + 0.5)` without int's type call (~0.6k instructions
    less). int() stays here: it truncates towards zero, the float floor does not, and a difference of two
    marks (ttft, processing) is not negative by construction."""
    return int(seconds * 100_000 + 0.5) / 100


def _ms3(wall: float) -> float:
    """round(wall, 3), the same float, without the decimal string round() goes through. wall * 1000 is off
    from the exact product by half a unit in the last place at most (under 2**-11 until the year 2248), so
    rounding half up gives round()'s answer except near a tie, which is left to round() itself."""
    scaled = wall * 1000
    if -0.001 < scaled % 1 - 0.5 < 0.001:  # `% 1` and `// 1`: int() for a time after 1970, in C
        return round(wall, 3)
    return (scaled + 0.5) // 1 / 1000


def _waited(a: Attempt) -> dict[str, object]:
    """A retry that waited first: its entry with the wait planned and how it was chosen."""
    assert a.wait is not None
    return {"deployment": a.upstream, "status": a.status, "ms": _ms2(a.duration), "error": a.error,
            "wait_ms": _ms2(a.wait[0]), "after": a.wait[1]}


def _attempt(a: Attempt) -> dict[str, object]:
    if a.wait is None:  # the usual case: _ms2 inlined (a perf_counter() difference: `// 1`)
        return {"deployment": a.upstream, "status": a.status, "ms": (a.duration * 100_000 + 0.5) // 1 / 100,
                "error": a.error}
    return _waited(a)


class AccessLog:
    __slots__ = ("_stream", "enabled", "_flush_due")

    def __init__(self, stream: IO[bytes] | None = None, enabled: bool = True) -> None:
        self._stream = stream if stream is not None else _stdout()
        self.enabled = enabled
        self._flush_due = False

    def write(self, call: Call) -> None:
        if not self.enabled:
            return
        marks = call.marks
        ttfb = marks.get("upstream_headers")
        elapsed = perf_counter() - call.started  # call.elapsed(), inlined: this runs for every request
        dispatched = marks.get("dispatch")
        first = marks.get("first_token")
        tenant = call.tenant
        route = call.route
        queue_wait = call.queue_wait
        attempts = call.attempts
        line = {
            "ts": _ms3(call.started_wall),
            "request_id": call.request_id,
            "trace_id": call.trace_id,
            "method": call.method,
            "path": call.path,
            "tenant": tenant.name if tenant is not None else None,
            "route": route.name if route is not None else None,
            "model": call.model or None,
            "upstream": call.upstream or None,
            "stream": call.stream,
            "status": call.status,
            "outcome": call.outcome,
            "reason": call.reason,
            "duration_ms": (elapsed * 100_000 + 0.5) // 1 / 100,  # _ms2, inlined (non-negative: `// 1`)
            "ttfb_ms": (ttfb * 100_000 + 0.5) // 1 / 100 if ttfb is not None else None,
            "queue_wait_ms": round(queue_wait * 1000, 1) if queue_wait else None,
            # Both from dispatch, after any queue wait: the last byte, and a stream's first event.
            "processing_ms": int((elapsed - dispatched) * 100_000 + 0.5) / 100 if dispatched is not None else None,
            "ttft_ms": _ms2(first - dispatched) if first is not None and dispatched is not None else None,
            # One entry per upstream attempt: the deployment, its status (0: no response), the time to its
            # headers or failure, and why it failed without a response (upstream_unreachable,
            # upstream_timeout, cancelled), and for a retry after a wait, the wait planned and how it was
            # chosen (`after`: exponential, fixed, reset, or hint when the upstream's replaced the backoff).
            # One attempt (the usual case) without a helper's or a comprehension's frame (~1k instructions).
            "attempts": [_attempt(attempts[0])] if len(attempts) == 1 else [_attempt(a) for a in attempts],
            "events": call.events_relayed or None,
            "bytes": call.bytes_out,
            "error": call.error,
            "client_gone": call.client_gone or None,
        }
        try:
            self._stream.write(orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE))
        except (OSError, ValueError):
            return  # a closed or broken stdout must never fail a request
        if not self._flush_due:
            self._flush_due = True
            try:
                asyncio.get_running_loop().call_later(FLUSH_AFTER, self.flush)
            except RuntimeError:  # no loop (a synchronous caller): flush now
                self.flush()

    def flush(self) -> None:
        self._flush_due = False
        try:
            self._stream.flush()
        except (OSError, ValueError):
            pass
