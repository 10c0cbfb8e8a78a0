"""The OpenTelemetry SDK behind tracing, set up once at start when the OTEL_* variables turn it on
(proxy/telemetry/tracing.py decides; only then is this module imported).

The SDK reads the standard variables itself: the resource (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES;
the service is called `signalbox` when neither names it), the sampler (OTEL_TRACES_SAMPLER and its
argument; parent-based always-on by default, so a client's sampled flag is followed), the batch
processor (OTEL_BSP_*: a bounded queue, spans dropped rather than waited for when it is full) and the
OTLP/HTTP exporter (OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT, _HEADERS, _TIMEOUT, _COMPRESSION, ...). The
exporter runs on the batch processor's own thread, so export never blocks the event loop. The provider is
the app's own (never the global one), so every app built in a process has its own.

Propagation is W3C Trace Context (traceparent, tracestate), from the client to each upstream attempt.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from importlib import metadata

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, Tracer, format_trace_id
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from proxy.call import Call, Trace
from proxy.telemetry import spans

SERVICE = "signalbox"
SCOPE = "signalbox"


class OtelTracer:
    """Tracing on: one `spans.CallTrace` per request, exported in batches over OTLP/HTTP."""

    __slots__ = ("provider", "tracer", "propagator")

    def __init__(self, provider: TracerProvider, tracer: Tracer) -> None:
        self.provider = provider
        self.tracer = tracer
        self.propagator = TraceContextTextMapPropagator()

    @classmethod
    def start(cls) -> OtelTracer:
        version = _version()
        resource = Resource.create({SERVICE_VERSION: version} if version else {})
        if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
            resource = resource.merge(Resource({SERVICE_NAME: SERVICE}))
        provider = TracerProvider(resource=resource)
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        return cls(provider, provider.get_tracer(SCOPE, version or None))

    @property
    def on(self) -> bool:
        return True

    def begin(self, call: Call, headers: Mapping[str, str]) -> Trace | None:
        """The request span (SERVER): a child of the client's traceparent when it sent a valid one."""
        parent = self.propagator.extract(headers) if "traceparent" in headers else None
        span = self.tracer.start_span(
            call.method, context=parent, kind=SpanKind.SERVER, start_time=spans.ns(call, 0.0),
            attributes=spans.request_attributes(call),  # (the sampler may read them)
        )
        call.trace_id = format_trace_id(span.get_span_context().trace_id)
        return spans.CallTrace(self, call, span)

    async def shutdown(self) -> None:
        """Flush the queued spans and stop, off the loop: the export is a blocking HTTP call."""
        await asyncio.to_thread(self.provider.shutdown)


def _version() -> str:
    """The installed signalbox's version, for service.version (empty when run from a bare checkout)."""
    try:
        return metadata.version("signalbox")
    except metadata.PackageNotFoundError:
        return ""
