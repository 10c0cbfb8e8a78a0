"""One request's spans while tracing is on (`CallTrace`, the `call.trace` the stages' hooks call):

    <method> <route>           SERVER    the request, arrival to the last byte (child of the client's span)
    ├─ signalbox.queue         INTERNAL  the wait for admission: limits and a queue slot
    ├─ <operation> <model>     CLIENT    one per upstream attempt (retries and fallbacks each their own),
    │                                    its context sent upstream as traceparent
    └─ signalbox.relay         INTERNAL  the answer to the client (a stream, event by event)

Spans carry the GenAI semantic conventions' attributes (proxy/telemetry/genai.py) and Signalbox's own
(`signalbox.*`: tenant, route, queue, class, outcome, reason, deployment): never content, never a header.
Times come from the call's clock (perf_counter offsets from its wall-clock start), so the spans line up
with the access log. An attempt span starts when the attempt is sent and ends at its recorded duration
(to its response headers, or a whole answer's last byte, or its failure); the queue span is drawn at the
end from the call's recorded wait.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from opentelemetry.trace import Span, SpanKind, Status, StatusCode, set_span_in_context

from proxy.call import Call
from proxy.policy.plan import DeploymentSpec
from proxy.telemetry import genai

if TYPE_CHECKING:
    from proxy.telemetry.otel import OtelTracer

TENANT = "signalbox.tenant"
ROUTE = "signalbox.route"
QUEUE = "signalbox.queue"
CLASS = "signalbox.class"
OUTCOME = "signalbox.outcome"
REASON = "signalbox.reason"
REQUEST_ID = "signalbox.request_id"
DEPLOYMENT = "signalbox.deployment"
UPSTREAM = "signalbox.upstream"
ATTEMPT = "signalbox.attempt"


def ns(call: Call, offset: float) -> int:
    """Nanoseconds since the epoch of a moment `offset` seconds after the call arrived."""
    return int((call.started_wall + offset) * 1e9)


def _now(call: Call) -> int:
    return ns(call, time.perf_counter() - call.started)


def request_attributes(call: Call) -> dict[str, Any]:
    return {"http.request.method": call.method, "url.path": call.path, REQUEST_ID: call.request_id}


class CallTrace:
    __slots__ = ("otel", "call", "span", "recording", "context", "facts", "attempt_span", "attempt_index",
                 "attempt_start", "attempts", "relay_span")

    def __init__(self, otel: OtelTracer, call: Call, span: Span) -> None:
        self.otel = otel
        self.call = call
        self.span = span
        self.recording = span.is_recording()
        """False when the sampler dropped the trace: its context still goes upstream, nothing else is done."""
        self.context = set_span_in_context(span)
        self.facts = genai.Facts()
        self.attempt_span: Span | None = None
        self.attempt_index = 0
        """The attempt's place in `call.attempts`: its record (status, duration) once it ended."""
        self.attempt_start = 0
        self.attempts = 0
        self.relay_span: Span | None = None

    def attempt(self, deployment: DeploymentSpec, url: str, headers: dict[str, str]) -> dict[str, str]:
        self._close_attempt()
        call = self.call
        self.attempts += 1
        self.attempt_index = len(call.attempts)
        self.attempt_start = _now(call)
        name, attributes = self._attempt_attributes(deployment, url) if self.recording else ("attempt", None)
        span = self.attempt_span = self.otel.tracer.start_span(
            name, context=self.context, kind=SpanKind.CLIENT, start_time=self.attempt_start, attributes=attributes
        )
        carrier: dict[str, str] = {}
        self.otel.propagator.inject(carrier, context=set_span_in_context(span))
        out = dict(headers)  # the per-upstream dict dispatch caches keeps the client's own values
        out["traceparent"] = carrier["traceparent"]
        if "tracestate" in carrier:
            out["tracestate"] = carrier["tracestate"]
        else:
            out.pop("tracestate", None)
        return out

    def _attempt_attributes(self, deployment: DeploymentSpec, url: str) -> tuple[str, dict[str, Any]]:
        """The attempt span's name ("<operation> <model>") and attributes."""
        call = self.call
        upstream = call.plan.upstreams.get(deployment.upstream)
        model = deployment.model or call.model
        operation = genai.operation(call.path)
        attributes: dict[str, Any] = {
            DEPLOYMENT: deployment.id, UPSTREAM: deployment.upstream, ATTEMPT: self.attempts,
            "http.request.method": call.method, genai.REQUEST_STREAM: call.stream,
        }
        if operation is not None:
            attributes[genai.OPERATION_NAME] = operation
        if model:
            attributes[genai.REQUEST_MODEL] = model
        provider = genai.provider(upstream.provider) if upstream is not None else None
        if provider is not None:
            attributes[genai.PROVIDER_NAME] = provider
        where = urlsplit(url)
        if where.hostname:
            attributes["server.address"] = where.hostname
            if where.port is not None:
                attributes["server.port"] = where.port
        return (f"{operation or call.method} {model}" if model else (operation or call.method)), attributes

    def _close_attempt(self, final: bool = False) -> None:
        """End the open attempt span at its recorded end, with its status (and, for the answer relayed,
        what the answer said)."""
        span = self.attempt_span
        if span is None:
            return
        self.attempt_span = None
        attempts = self.call.attempts
        end = None
        if len(attempts) > self.attempt_index:
            record = attempts[self.attempt_index]
            end = self.attempt_start + int(record.duration * 1e9)
            if record.status:
                span.set_attribute("http.response.status_code", record.status)
            if record.error is not None or record.status >= 400:
                error = record.error or str(record.status)
                span.set_attribute("error.type", error)
                span.set_status(Status(StatusCode.ERROR, error))
        if final:
            span.set_attributes(self.facts.attributes())
        span.end(end_time=end if end is not None else _now(self.call))

    def relaying(self, whole: bytes | None) -> None:
        if not self.recording:
            return
        if whole is not None and self.call.status < 400:
            genai.note_answer(self.facts, whole)
        self.relay_span = self.otel.tracer.start_span(
            "signalbox.relay", context=self.context, kind=SpanKind.INTERNAL, start_time=_now(self.call),
            attributes={genai.REQUEST_STREAM: self.call.stream},
        )

    def event(self, name: str | None, data: bytes) -> None:
        if self.recording:
            genai.note_event(self.facts, name, data)

    def end(self, call: Call, cls: str | None) -> None:
        if not self.recording:
            return  # nothing recorded, nothing to end (the SDK's non-recording spans hold nothing)
        end = _now(call)
        self._close_attempt(final=True)
        if self.relay_span is not None:
            self.relay_span.set_attributes({"signalbox.events": call.events_relayed, "signalbox.bytes": call.bytes_out})
            if call.outcome != "ok":
                self.relay_span.set_status(Status(StatusCode.ERROR, call.reason or call.outcome))
            self.relay_span.end(end_time=end)
        self._queue_span(call, cls, end)
        span = self.span
        span.update_name(f"{call.method} {call.route.name}" if call.route is not None else call.method)
        attributes = _signalbox_attributes(call, cls) | _request_end_attributes(call) | self.facts.attributes()
        if call.outcome != "ok":
            attributes["error.type"] = call.reason or call.outcome
            span.set_status(Status(StatusCode.ERROR, call.reason or call.outcome))
        span.set_attributes(attributes)  # at once: the SDK takes a lock and checks each value per call
        span.end(end_time=end)

    def _queue_span(self, call: Call, cls: str | None, end: int) -> None:
        """The wait for admission, drawn from what the flow recorded: for a route with a queue, from when the
        call entered it to its slot (or to when it left without one)."""
        route = call.route
        if route is None or route.queue is None or route.batch is not None:
            return
        marks = call.marks
        granted = marks.get("slot", marks.get("dispatch"))
        if granted is None and not call.queue_wait:
            return  # refused before it reached the queue
        stop = ns(call, granted) if granted is not None else end
        attributes: dict[str, Any] = {QUEUE: route.queue.name,
                                      "signalbox.queue_wait_ms": round(call.queue_wait * 1000, 3)}
        if cls is not None:
            attributes[CLASS] = cls
        span = self.otel.tracer.start_span(
            "signalbox.queue", context=self.context, kind=SpanKind.INTERNAL,
            start_time=stop - int(call.queue_wait * 1e9), attributes=attributes,
        )
        if granted is None:  # left the queue without a slot: timed out, cleared, shed, or the client left
            span.set_status(Status(StatusCode.ERROR, call.reason or call.outcome))
        span.end(end_time=stop)


def _signalbox_attributes(call: Call, cls: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {OUTCOME: call.outcome}
    if call.reason is not None:
        out[REASON] = call.reason
    if call.tenant is not None:
        out[TENANT] = call.tenant.name
    route = call.route
    if route is not None:
        out[ROUTE] = route.name
        if route.queue is not None:
            out[QUEUE] = route.queue.name
    if cls is not None:
        out[CLASS] = cls
    return out


def _request_end_attributes(call: Call) -> dict[str, Any]:
    out: dict[str, Any] = {"http.response.status_code": call.status, genai.REQUEST_STREAM: call.stream}
    operation = genai.operation(call.path)
    if operation is not None:
        out[genai.OPERATION_NAME] = operation
    if call.model:
        out[genai.REQUEST_MODEL] = call.model
    upstream = call.plan.upstreams.get(call.upstream) if call.upstream else None
    if upstream is not None:
        out[UPSTREAM] = upstream.name
        provider = genai.provider(upstream.provider)
        if provider is not None:
            out[genai.PROVIDER_NAME] = provider
    if call.attempts:
        out["signalbox.attempts"] = len(call.attempts)
    return out
