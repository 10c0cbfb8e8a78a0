"""OpenTelemetry: the spans a traced request produces, as an OTLP/HTTP collector receives them (an in-process
receiver decoding the protobuf export), and the traceparent each upstream attempt gets; tracing off leaves the
client's trace headers untouched, makes no spans and never imports the SDK."""

from __future__ import annotations

import gzip
import subprocess
import sys
import textwrap
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest
from aiohttp import web
from conftest import EchoUpstream, Proxy, Reply
from kit import Loopback, build_policy, route_spec, until, upstream_spec
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from outcome_helpers import mock_url
from stream_helpers import SSE, chat_chunk, sse

from proxy.telemetry.tracing import TracingConfigError, choose, trace_id_of

pytestmark = pytest.mark.timeout(60)
__all__ = ["mock_url"]  # the fixture
StartProxy = Callable[..., Awaitable[Proxy]]
OpenAIFactory = Callable[..., openai.AsyncOpenAI]

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_PARENT = "00f067aa0ba902b7"
CLIENT_TRACEPARENT = f"00-{CLIENT_TRACE}-{CLIENT_PARENT}-01"
CLIENT_TRACESTATE = "congo=t61rcWkgMzE"
SERVER, CLIENT, INTERNAL = 2, 3, 1  # opentelemetry.proto.trace.v1.Span.SpanKind
STATUS_ERROR = 2


@dataclass
class Span:
    name: str
    trace_id: str
    span_id: str
    parent: str
    kind: int
    attributes: dict[str, Any]
    status: int
    start: int
    end: int
    resource: dict[str, Any]


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    return getattr(value, kind) if kind is not None else None


@dataclass
class Collector:
    """An OTLP/HTTP traces endpoint: POST /v1/traces with an ExportTraceServiceRequest (protobuf)."""

    url: str = ""
    spans: list[Span] = field(default_factory=list)
    posts: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        assert request.content_type == "application/x-protobuf"
        self.posts += 1
        export = ExportTraceServiceRequest.FromString(body)
        for resource_spans in export.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope in resource_spans.scope_spans:
                for s in scope.spans:
                    self.spans.append(Span(
                        s.name, s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(), s.kind,
                        {a.key: _value(a.value) for a in s.attributes}, s.status.code,
                        s.start_time_unix_nano, s.end_time_unix_nano, resource,
                    ))
        answer = ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=answer, content_type="application/x-protobuf")

    def trace(self, trace_id: str) -> list[Span]:
        return [s for s in self.spans if s.trace_id == trace_id]


@pytest.fixture
async def collector(loopback: Loopback) -> Collector:
    found = Collector()
    app = web.Application()
    app.router.add_post("/v1/traces", found.handle)
    found.url = await loopback.serve(app)
    return found


@pytest.fixture
def traced(collector: Collector, monkeypatch: pytest.MonkeyPatch) -> Collector:
    """Tracing on through the standard variables, exporting to the collector every 50 ms."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", collector.url + "/v1/traces")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    return collector


def _policy(echo: EchoUpstream, retry: dict[str, Any] | None = None) -> str:
    return build_policy(
        {"up": upstream_spec(echo.url)},
        [route_spec("chat", "up", queue="chat", retry=retry or {"attempts": 1})],
        queues="{chat: {concurrency: 4, max_waiting: 10, max_wait: 5s}}",
    )


COMPLETION = orjson.dumps({
    "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o-2024-08-06",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "secret answer"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18},
})
BUSY = b'{"error": {"message": "busy", "type": "server_error"}}'
REQUEST = {"model": "gpt-4o", "messages": [{"role": "user", "content": "private question"}]}


async def _post(proxy: Proxy, body: dict[str, Any], headers: dict[str, str] | None = None) -> aiohttp.ClientResponse:
    async with aiohttp.ClientSession() as session:
        response = await session.post(
            proxy.v1 + "/chat/completions", json=body,
            headers={"Authorization": "Bearer sk-alpha", **(headers or {})},
        )
        await response.read()
        return response


def _tree(spans: list[Span]) -> tuple[Span, dict[str, list[Span]]]:
    """The request span and its children by name (everything else in the trace must hang under it)."""
    (root,) = [s for s in spans if s.kind == SERVER]
    children: dict[str, list[Span]] = {}
    for span in spans:
        if span is not root:
            assert span.parent == root.span_id, span.name
            children.setdefault(span.name, []).append(span)
    return root, children


def _no_secrets(spans: list[Span]) -> None:
    """No content, no header value (keys included) in any attribute."""
    text = repr([(s.name, s.attributes) for s in spans])
    for secret in ("sk-alpha", "private question", "secret answer", "Bearer", CLIENT_TRACESTATE):
        assert secret not in text


async def test_a_request_is_one_trace_under_the_clients_span(
    traced: Collector, echo: EchoUpstream, start_proxy: StartProxy, async_openai: OpenAIFactory
) -> None:
    echo.reply(Reply(body=COMPLETION))
    proxy = await start_proxy(_policy(echo))
    completion = await async_openai(proxy).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "private question"}],
        extra_headers={"traceparent": CLIENT_TRACEPARENT, "tracestate": CLIENT_TRACESTATE},
    )
    assert completion.choices[0].finish_reason == "stop"
    await until(lambda: len(traced.trace(CLIENT_TRACE)) >= 4, within=10)
    spans = traced.trace(CLIENT_TRACE)
    root, children = _tree(spans)
    assert root.parent == CLIENT_PARENT and root.name == "POST chat"
    assert sorted(children) == ["chat gpt-4o", "signalbox.queue", "signalbox.relay"]
    (attempt,) = children["chat gpt-4o"]
    assert attempt.kind == CLIENT and children["signalbox.relay"][0].kind == INTERNAL
    # The upstream got the attempt span's context: the same trace, the attempt as parent, the client's state.
    assert echo.last.header_all("traceparent") == [f"00-{CLIENT_TRACE}-{attempt.span_id}-01"]
    assert echo.last.header_all("tracestate") == [CLIENT_TRACESTATE]
    assert {
        "gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o", "gen_ai.provider.name": "openai",
        "gen_ai.response.model": "gpt-4o-2024-08-06", "gen_ai.response.finish_reasons": ["stop"],
        "gen_ai.usage.input_tokens": 11, "gen_ai.usage.output_tokens": 7,
        "signalbox.tenant": "alpha", "signalbox.route": "chat", "signalbox.queue": "chat",
        "signalbox.outcome": "ok", "http.response.status_code": 200, "http.request.method": "POST",
    }.items() <= root.attributes.items()
    assert isinstance(root.attributes["signalbox.class"], str)
    (queue,) = children["signalbox.queue"]
    assert queue.attributes["signalbox.queue"] == "chat"
    assert queue.attributes["signalbox.class"] == root.attributes["signalbox.class"]
    assert root.start <= queue.start <= queue.end <= attempt.start
    expected = {"signalbox.deployment": "up", "http.response.status_code": 200, "gen_ai.request.model": "gpt-4o",
                "gen_ai.response.finish_reasons": ["stop"], "server.address": "127.0.0.1"}
    assert expected.items() <= attempt.attributes.items()
    assert root.start <= attempt.start <= attempt.end <= root.end
    assert root.resource["service.name"] == "signalbox"
    _no_secrets(spans)
    (line,) = proxy.access_lines()
    assert line["trace_id"] == CLIENT_TRACE


async def test_a_stream_gets_its_model_usage_and_finish_reason_from_the_events(
    traced: Collector, echo: EchoUpstream, start_proxy: StartProxy, async_openai: OpenAIFactory
) -> None:
    usage = sse({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [],
                 "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}})
    echo.reply(Reply(headers=SSE, chunks=[
        chat_chunk({"role": "assistant", "content": "secret answer"}), chat_chunk({}, finish="length"), usage,
        b"data: [DONE]\n\n",
    ]))
    proxy = await start_proxy(_policy(echo))
    stream = await async_openai(proxy).chat.completions.create(  # no traceparent: the proxy starts the trace
        model="gpt-4o", messages=[{"role": "user", "content": "private question"}], stream=True,
    )
    chunks = [chunk async for chunk in stream]
    assert [c.choices[0].finish_reason for c in chunks if c.choices] == [None, "length"]
    (line,) = await until(proxy.access_lines)
    trace_id = line["trace_id"]
    assert trace_id is not None and len(trace_id) == 32
    await until(lambda: len(traced.trace(trace_id)) >= 4, within=10)
    root, children = _tree(traced.trace(trace_id))
    assert root.parent == ""  # a root span
    (attempt,) = children["chat gpt-4o"]
    (relay,) = children["signalbox.relay"]
    sent = echo.last.header("traceparent")
    assert sent is not None and sent[:-2] == f"00-{trace_id}-{attempt.span_id}-" and int(sent[-2:], 16) & 1  # sampled
    assert echo.last.header("tracestate") is None
    facts = {"gen_ai.response.model": "m", "gen_ai.response.finish_reasons": ["length"],
             "gen_ai.usage.input_tokens": 5, "gen_ai.usage.output_tokens": 2, "gen_ai.request.stream": True}
    assert facts.items() <= root.attributes.items() and facts.items() <= attempt.attributes.items()
    assert relay.attributes["signalbox.events"] == 4 and relay.start >= attempt.start
    _no_secrets(traced.trace(trace_id))


async def test_an_anthropic_stream_through_the_anthropic_sdk(
    traced: Collector, mock_url: str, start_proxy: StartProxy
) -> None:
    """The Messages API end to end: the span's facts are what the SDK itself got from the stream's events."""
    policy = build_policy({"claude": upstream_spec(mock_url, "anthropic")}, [route_spec("messages", "claude")])
    proxy = await start_proxy(policy)
    async with anthropic.AsyncAnthropic(base_url=proxy.url, api_key="sk-alpha", max_retries=0, timeout=15.0) as claude:
        async with claude.messages.stream(
            model="claude-a", max_tokens=64, messages=[{"role": "user", "content": "private question"}],
            extra_headers={"traceparent": CLIENT_TRACEPARENT},
        ) as stream:
            final = await stream.get_final_message()
    await until(lambda: any(s.kind == SERVER for s in traced.trace(CLIENT_TRACE)), within=10)
    root, children = _tree(traced.trace(CLIENT_TRACE))
    assert root.name == "POST messages" and sorted(children) == ["chat claude-a", "signalbox.relay"]
    (attempt,) = children["chat claude-a"]
    facts = {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "anthropic", "gen_ai.request.model": "claude-a",
        "gen_ai.response.model": final.model, "gen_ai.response.finish_reasons": [final.stop_reason],
        "gen_ai.usage.input_tokens": final.usage.input_tokens, "gen_ai.usage.output_tokens": final.usage.output_tokens,
    }
    assert facts.items() <= root.attributes.items() and facts.items() <= attempt.attributes.items()
    assert final.usage.output_tokens == 6  # the mock's, so the usage above is not a default
    _no_secrets(traced.trace(CLIENT_TRACE))


async def test_a_retried_request_has_one_client_span_per_attempt(
    traced: Collector, echo: EchoUpstream, start_proxy: StartProxy
) -> None:
    echo.reply(Reply(status=503, body=BUSY), Reply(body=COMPLETION))
    proxy = await start_proxy(_policy(echo, retry={"attempts": 2, "backoff": {"base": "1ms", "max": "1ms"}}))
    response = await _post(proxy, REQUEST, {"traceparent": CLIENT_TRACEPARENT})
    assert response.status == 200 and len(echo.received) == 2
    await until(lambda: len(traced.trace(CLIENT_TRACE)) >= 5, within=10)
    root, children = _tree(traced.trace(CLIENT_TRACE))
    first, second = sorted(children["chat gpt-4o"], key=lambda s: s.start)
    assert (first.kind, second.kind) == (CLIENT, CLIENT)
    assert (first.attributes["http.response.status_code"], second.attributes["http.response.status_code"]) == (503, 200)
    assert (first.attributes["signalbox.attempt"], second.attributes["signalbox.attempt"]) == (1, 2)
    assert first.status == STATUS_ERROR and first.attributes["error.type"] == "503"
    assert first.end <= second.start
    # Each attempt carried its own span as the parent, in the client's trace.
    assert [r.header("traceparent") for r in echo.received] == [
        f"00-{CLIENT_TRACE}-{first.span_id}-01", f"00-{CLIENT_TRACE}-{second.span_id}-01"
    ]
    assert root.attributes["signalbox.attempts"] == 2 and root.attributes["signalbox.outcome"] == "ok"


async def test_a_fallback_is_its_own_attempt_span_with_its_upstream(
    traced: Collector, echo: EchoUpstream, start_proxy: StartProxy
) -> None:
    echo.reply(Reply(status=503, body=BUSY), Reply(body=COMPLETION))
    policy = build_policy(
        {"up": upstream_spec(echo.url), "spare": upstream_spec(echo.url)},
        [route_spec("chat", "up", retry={"attempts": 1}, fallbacks=["backup"]),
         route_spec("backup", "spare", model="none-*", retry={"attempts": 1})],
    )
    proxy = await start_proxy(policy)
    response = await _post(proxy, REQUEST, {"traceparent": CLIENT_TRACEPARENT})
    assert response.status == 200 and len(echo.received) == 2
    await until(lambda: any(s.kind == SERVER for s in traced.trace(CLIENT_TRACE)), within=10)
    root, children = _tree(traced.trace(CLIENT_TRACE))
    first, second = sorted(children["chat gpt-4o"], key=lambda s: s.start)
    assert [(s.attributes["signalbox.upstream"], s.attributes["http.response.status_code"]) for s in (first, second)] \
        == [("up", 503), ("spare", 200)]
    assert [r.header("traceparent") for r in echo.received] == [
        f"00-{CLIENT_TRACE}-{first.span_id}-01", f"00-{CLIENT_TRACE}-{second.span_id}-01"
    ]
    assert root.attributes["signalbox.upstream"] == "spare"


async def test_a_failed_request_is_an_error_span_with_its_outcome(
    traced: Collector, echo: EchoUpstream, start_proxy: StartProxy
) -> None:
    echo.reply(Reply(status=500, body=b'{"error": {"message": "down", "type": "server_error"}}'))
    proxy = await start_proxy(_policy(echo))
    response = await _post(proxy, REQUEST, {"traceparent": CLIENT_TRACEPARENT})
    assert response.status == 500
    await until(lambda: any(s.kind == SERVER for s in traced.trace(CLIENT_TRACE)), within=10)
    root, _children = _tree(traced.trace(CLIENT_TRACE))
    assert root.status == STATUS_ERROR
    assert (root.attributes["signalbox.outcome"], root.attributes["error.type"]) == ("upstream_error", "upstream_500")


async def test_a_client_that_does_not_sample_gets_no_spans_but_its_trace_goes_on(
    traced: Collector, echo: EchoUpstream, start_proxy: StartProxy
) -> None:
    """The default sampler follows the client's flag: nothing recorded, yet the upstream stays in the trace."""
    echo.reply(Reply(body=COMPLETION), Reply(body=COMPLETION))
    proxy = await start_proxy(_policy(echo))
    unsampled = f"00-{CLIENT_TRACE}-{CLIENT_PARENT}-00"
    assert (await _post(proxy, REQUEST, {"traceparent": unsampled})).status == 200
    sent = echo.last.header("traceparent")
    assert sent is not None and sent.startswith(f"00-{CLIENT_TRACE}-") and sent.endswith("-00")
    assert sent != unsampled  # the attempt's own (unrecorded) span is the parent
    assert (await _post(proxy, REQUEST, {"traceparent": CLIENT_TRACEPARENT})).status == 200
    await until(lambda: any(s.kind == SERVER for s in traced.spans), within=10)  # the sampled one arrives ...
    assert {s.trace_id for s in traced.spans} == {CLIENT_TRACE}
    assert len([s for s in traced.spans if s.kind == SERVER]) == 1  # ... alone
    assert [line["trace_id"] for line in proxy.access_lines()] == [CLIENT_TRACE, CLIENT_TRACE]


async def test_tracing_off_passes_the_clients_trace_headers_and_makes_no_spans(
    collector: Collector, echo: EchoUpstream, start_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_TRACES_EXPORTER"):
        monkeypatch.delenv(name, raising=False)
    echo.reply(Reply(body=COMPLETION), Reply(body=COMPLETION))
    proxy = await start_proxy(_policy(echo))
    assert proxy.state.tracer.on is False
    sent = {"traceparent": CLIENT_TRACEPARENT, "tracestate": CLIENT_TRACESTATE}
    assert (await _post(proxy, REQUEST, sent)).status == 200
    assert echo.last.header_all("traceparent") == [CLIENT_TRACEPARENT]
    assert echo.last.header_all("tracestate") == [CLIENT_TRACESTATE]
    assert (await _post(proxy, REQUEST, {"traceparent": "00-" + "0" * 32 + "-00f067aa0ba902b7-01"})).status == 200
    first, invalid = proxy.access_lines()
    assert first["trace_id"] == CLIENT_TRACE and invalid["trace_id"] is None  # an all-zero trace id is invalid
    await proxy.app.shutdown()
    assert collector.posts == 0 and collector.spans == []


def test_tracing_off_never_imports_the_sdk(tmp_path: Path) -> None:
    """A proxy built and run without OTEL_* variables has not loaded the OpenTelemetry SDK."""
    policy = tmp_path / "p.yaml"
    policy.write_text("upstreams: {m: {provider: mock}}\nroutes: [{name: r, upstream: m}]\n")
    script = textwrap.dedent(f"""
        import sys
        from proxy.app import build_app
        from proxy.policy.compile import compile_plan
        from proxy.policy.load import load_policy
        app = build_app(compile_plan(load_policy({str(policy)!r})))
        print(sorted(m for m in sys.modules if m.startswith("opentelemetry.sdk")))
    """)
    env = {"PATH": "/usr/bin:/bin", "OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_serve_refuses_an_exporter_it_lacks_in_one_line(tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text("upstreams: {m: {provider: mock}}\nroutes: [{name: r, upstream: m}]\n")
    env = {"PATH": "/usr/bin:/bin", "OTEL_TRACES_EXPORTER": "zipkin"}
    done = subprocess.run([sys.executable, "-m", "proxy", "serve", "--policies", str(policy), "--port", "0"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "tracing: OTEL_TRACES_EXPORTER=zipkin is not supported; use otlp (OTLP over HTTP) or none"
    )
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (CLIENT_TRACEPARENT, CLIENT_TRACE),
        (f" {CLIENT_TRACEPARENT} ", CLIENT_TRACE),
        (f"01-{CLIENT_TRACE}-{CLIENT_PARENT}-01-later", CLIENT_TRACE),  # a later version may add fields
        (f"00-{CLIENT_TRACE}-{CLIENT_PARENT}-01-later", None),  # version 00 may not
        (f"ff-{CLIENT_TRACE}-{CLIENT_PARENT}-01", None),
        (f"00-{CLIENT_TRACE.upper()}-{CLIENT_PARENT}-01", None),
        (f"00-{CLIENT_TRACE}-{'0' * 16}-01", None),
        (f"00-{CLIENT_TRACE[:-1]}-{CLIENT_PARENT}-01", None),
        ("", None),
    ],
)
def test_trace_id_of_a_traceparent(value: str, expected: str | None) -> None:
    assert trace_id_of(value) == expected


@pytest.mark.parametrize(
    ("environ", "on"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, False),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, False),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, True),
    ],
)
def test_the_otel_variables_choose_tracing(environ: dict[str, str], on: bool) -> None:
    assert choose(environ) is on


@pytest.mark.parametrize(
    "environ",
    [{"OTEL_TRACES_EXPORTER": "zipkin"}, {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}],
)
def test_what_the_proxy_cannot_export_is_refused_at_start(environ: dict[str, str]) -> None:
    with pytest.raises(TracingConfigError):
        choose(environ)
