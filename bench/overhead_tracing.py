"""What tracing costs: ≈ 0 when off (the default), and what it costs when on, for contrast.

In process (run this file): the per-request work of tracing's hooks, timed function by function.
- off: `OFF.begin` (the one call a request makes: it reads the client's traceparent for the access log's
  trace id) without and with a traceparent, plus the four `call.trace is not None` tests the stages make;
- on: a whole request's spans (request, queue, one attempt with its traceparent, relay, 20 stream events,
  end) through the real SDK with a BatchSpanProcessor whose exporter discards, so the SDK's own CPU shows;
  and the same for a client whose traceparent says "not sampled" (nothing recorded, the trace propagated).
Over HTTP: `overhead.py --tracing` adds a `traced` target (the `minimal` policy with tracing on, exporting
over OTLP/HTTP to `--collector`, this file run as a discarding receiver) beside `minimal` (tracing off).

Run: .venv/bin/python bench/overhead_tracing.py [--repeat 7] [--requests 20000]
     .venv/bin/python bench/overhead.py --tracing --policy minimal --phase c64
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

if not any(Path(p, "proxy").is_dir() for p in sys.path if p):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BENCH = Path(__file__).resolve().parent


# ---- for overhead.py: the traced target and its collector -------------------------------------------


def collector_command(port: int) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--collector", "--port", str(port)]


def traced_env(collector_port: int) -> dict[str, str]:
    """The proxy's environment with tracing on, exporting to the discarding collector."""
    return {**os.environ, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://127.0.0.1:{collector_port}/v1/traces",
            "OTEL_SERVICE_NAME": "signalbox-bench"}


def serve_collector(port: int) -> None:
    """An OTLP/HTTP receiver that reads and discards every export (200 with an empty response message)."""
    from aiohttp import web

    async def discard(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application(client_max_size=64 * 1024**2)
    app.router.add_post("/{tail:.*}", discard)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


# ---- in process: the hooks' cost per request ---------------------------------------------------------


def best_ns(step: Callable[[], None], n: int, repeat: int) -> float:
    """Best-of-`repeat` time per call of `step`, in nanoseconds (the least disturbed run)."""
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter_ns()
        for _ in range(n):
            step()
        best = min(best, (time.perf_counter_ns() - started) / n)
    return best


def _call() -> object:
    from proxy.call import Call
    from proxy.policy.compile import compile_plan
    from proxy.policy.load import load_policy

    policy = BENCH / ".tracing-policy.yaml"
    policy.write_text(
        "upstreams: {fast: {provider: openai, base_url: 'http://127.0.0.1:9/v1', api_key: k}}\n"
        "queues: {q: {concurrency: 4}}\nroutes: [{name: bench, upstream: fast, queue: q}]\n"
    )
    try:
        plan = compile_plan(load_policy(str(policy)))
    finally:
        policy.unlink()

    def make() -> Call:
        call = Call("req-1", plan, "POST", "/v1/chat/completions", "openai", time.perf_counter())
        call.model, call.route, call.stream, call.outcome = "gpt-4o", plan.routes[0], True, "ok"
        return call

    return make


def measure_off(n: int, repeat: int) -> dict[str, float]:
    from multidict import CIMultiDict

    from proxy.telemetry.tracing import OFF

    make = _call()
    call = make()  # type: ignore[operator]
    plain = CIMultiDict({"content-type": "application/json", "authorization": "Bearer k"})
    parented = CIMultiDict(plain, traceparent="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")

    def checks() -> None:  # the stages' four tests, as each request makes them
        if call.trace is not None or call.trace is not None or call.trace is not None or call.trace is not None:
            raise AssertionError

    return {
        "off: begin, no traceparent": best_ns(lambda: OFF.begin(call, plain), n, repeat),
        "off: begin, with a traceparent": best_ns(lambda: OFF.begin(call, parented), n, repeat),
        "off: the stages' 4 `is not None` tests": best_ns(checks, n, repeat),
    }


def measure_on(n: int, repeat: int) -> dict[str, float]:
    from multidict import CIMultiDict
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    from proxy.call import Attempt
    from proxy.telemetry.otel import OtelTracer

    class Discard(SpanExporter):
        def export(self, spans: Sequence[object]) -> SpanExportResult:  # type: ignore[override]
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Discard()))
    tracer = OtelTracer(provider, provider.get_tracer("bench"))
    make = _call()
    sampled = CIMultiDict({"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"})
    unsampled = CIMultiDict({"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"})
    sent = {"content-type": "application/json", "authorization": "Bearer k"}
    chunk = b'{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,' \
            b'"delta":{"content":"hello"},"finish_reason":null}]}'
    last = b'{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,' \
           b'"delta":{},"finish_reason":"stop"}]}'

    def request(headers: CIMultiDict[str] = sampled) -> None:
        call = make()  # type: ignore[operator]
        trace = tracer.begin(call, headers)
        assert trace is not None
        call.marks["dispatch"] = 0.0001
        trace.attempt(call.plan.routes[0].deployments[0], "http://127.0.0.1:9/v1/chat/completions", sent)
        call.attempts.append(Attempt("fast", 200, 0.001))
        call.status = 200
        trace.relaying(None)
        for _ in range(19):
            trace.event(None, chunk)
        trace.event(None, last)
        trace.end(call, "default")

    try:
        return {"on: one streamed request's spans (20 events)": best_ns(request, n, repeat),
                "on, the client's trace unsampled (flag 00)": best_ns(lambda: request(unsampled), n, repeat)}
    finally:
        provider.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--collector", action="store_true", help="run as a discarding OTLP/HTTP receiver")
    parser.add_argument("--port", type=int, default=4318)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--requests", type=int, default=20_000)
    args = parser.parse_args()
    if args.collector:
        serve_collector(args.port)
        return
    import proxy

    print(f"tracing hooks, best of {args.repeat} x {args.requests} (proxy from {Path(proxy.__file__).parent})")
    off = measure_off(args.requests * 10, args.repeat)
    on = measure_on(args.requests, args.repeat)
    for name, ns in {**off, **on}.items():
        print(f"  {name:48} {ns / 1000:8.3f} µs per request")
    total = sum(ns for name, ns in off.items() if name != "off: begin, no traceparent")
    print(f"  {'off, in all (a request with a traceparent)':48} {total / 1000:8.3f} µs per request")


if __name__ == "__main__":
    main()
