"""Tracing's switch, chosen once when the app is built, and its off path.

Tracing is off unless the standard `OTEL_*` variables ask for it (`choose`): then `from_env` imports the
OpenTelemetry SDK (proxy/telemetry/otel.py) and every request gets a `Trace` (`call.trace`). Off, the SDK
is never imported and the app holds `OFF`, whose `begin` only reads the client's `traceparent` for the
access log's trace id; the upstream gets the client's `traceparent`/`tracestate` unchanged (the header
filter passes them like any end-to-end header).
"""

from __future__ import annotations

import re
import typing
from collections.abc import Mapping

from proxy.call import Call, Trace

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"

# W3C Trace Context §3.2: version-traceid-parentid-flags, lowercase hex; a later version may append fields.
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-[^\s]*)?")
_ZERO_TRACE = "0" * 32
_ZERO_PARENT = "0" * 16

EXPORTERS = ("otlp", "none")
"""The OTEL_TRACES_EXPORTER values the proxy takes: OTLP over HTTP (protobuf), or nothing."""
PROTOCOL = "http/protobuf"


class TracingConfigError(ValueError):
    """The OTEL_* variables ask for something the proxy cannot do (said at start, never per request)."""


def trace_id_of(traceparent: str) -> str | None:
    """The trace id of a valid W3C traceparent, else None (a malformed one is ignored, as the spec says)."""
    found = _TRACEPARENT.fullmatch(traceparent.strip())
    if found is None:
        return None
    version, trace_id, parent, _flags, extra = found.groups()
    if version == "ff" or (version == "00" and extra) or trace_id == _ZERO_TRACE or parent == _ZERO_PARENT:
        return None
    return trace_id


def _flag(environ: Mapping[str, str], name: str) -> bool:
    return environ.get(name, "").strip().lower() == "true"


def choose(environ: Mapping[str, str]) -> bool:
    """Is tracing on? Pure over the environment.

    Off when OTEL_SDK_DISABLED=true or OTEL_TRACES_EXPORTER=none. On when OTEL_TRACES_EXPORTER=otlp, or,
    with no exporter named, when an OTLP endpoint is set (OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or
    OTEL_EXPORTER_OTLP_ENDPOINT): the SDK's own default (export to localhost:4318) is not assumed, so a
    proxy nobody configured never tries to send spans. Raises for an exporter or protocol it lacks."""
    if _flag(environ, "OTEL_SDK_DISABLED"):
        return False
    named = [part.strip().lower() for part in environ.get("OTEL_TRACES_EXPORTER", "").split(",") if part.strip()]
    unknown = [name for name in named if name not in EXPORTERS]
    if unknown:
        raise TracingConfigError(
            f"OTEL_TRACES_EXPORTER={','.join(unknown)} is not supported; use otlp (OTLP over HTTP) or none"
        )
    if named:
        on = "otlp" in named
    else:
        on = bool(environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))
    if on:
        protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        if protocol and protocol.strip() != PROTOCOL:
            raise TracingConfigError(
                f"OTLP protocol {protocol.strip()!r} is not supported; the proxy exports {PROTOCOL} "
                "(unset OTEL_EXPORTER_OTLP_PROTOCOL or set it to http/protobuf)"
            )
    return on


class Tracer(typing.Protocol):
    """What the app holds: `OFF`, or the SDK-backed tracer (proxy/telemetry/otel.py)."""

    @property
    def on(self) -> bool: ...

    def begin(self, call: Call, headers: Mapping[str, str]) -> Trace | None:
        """A request arrived: its trace (None when off); sets `call.trace_id`."""
        ...

    async def shutdown(self) -> None:
        """Export what is still queued, then stop (the app's cleanup)."""
        ...


class Off:
    """Tracing off: no spans, no SDK; the client's trace id, if valid, still reaches the access log."""

    __slots__ = ()

    @property
    def on(self) -> bool:
        return False

    def begin(self, call: Call, headers: Mapping[str, str]) -> Trace | None:
        parent = headers.get(TRACEPARENT)
        if parent is not None:
            call.trace_id = trace_id_of(parent)
        return None

    async def shutdown(self) -> None:
        return None


OFF = Off()


def from_env(environ: Mapping[str, str]) -> Tracer:
    """The tracer the OTEL_* variables ask for, chosen once at start. The SDK is imported only when on."""
    if not choose(environ):
        return OFF
    from proxy.telemetry.otel import OtelTracer  # only a proxy that traces pays for the SDK's import

    return OtelTracer.start()
