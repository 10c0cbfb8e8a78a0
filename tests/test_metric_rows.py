"""`Metrics.record` binds each request's series once per label tuple (proxy/telemetry/rows.py). Over generated
requests it must export exactly what prometheus_client's own Counter and Histogram give when each request is fed
to them one by one by the documented labels: the same series, the same counts, the same sums to the last bit."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from proxy.call import Attempt, Call
from proxy.errors import InvalidRequest, QueueFull
from proxy.ops import live
from proxy.policy.plan import Plan
from proxy.telemetry import rows
from proxy.telemetry.metrics import Metrics
from proxy.telemetry.outcome import judge

LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
HOT = ("signalbox_requests", "signalbox_request_duration_seconds", "signalbox_processing_seconds",
       "signalbox_upstream_ttfb_seconds", "signalbox_proxy_errors", "signalbox_client_disconnects",
       "signalbox_stream_events_relayed", "signalbox_upstream_requests", "signalbox_upstream_latency_seconds",
       "signalbox_time_to_first_token_seconds")
NOW = 5000.0
HALF = 1024


class Reference:
    """prometheus_client's Counter and Histogram, fed one request at a time by the labels the metric help
    texts and docs/operations describe."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("signalbox_requests", "", ["route", "tenant", "upstream", "status", "outcome"],
                                registry=r)
        self.duration = Histogram("signalbox_request_duration_seconds", "", ["route"], buckets=LATENCY, registry=r)
        self.processing = Histogram("signalbox_processing_seconds", "", ["route"], buckets=LATENCY, registry=r)
        self.ttfb = Histogram("signalbox_upstream_ttfb_seconds", "", ["upstream"], buckets=LATENCY, registry=r)
        self.errors = Counter("signalbox_proxy_errors", "", ["reason"], registry=r)
        self.gone = Counter("signalbox_client_disconnects", "", ["route"], registry=r)
        self.events = Counter("signalbox_stream_events_relayed", "", ["route"], registry=r)
        self.attempts = Counter("signalbox_upstream_requests", "", ["deployment", "status"], registry=r)
        self.latency = Histogram("signalbox_upstream_latency_seconds", "", ["deployment"], buckets=LATENCY,
                                 registry=r)
        self.ttft = Histogram("signalbox_time_to_first_token_seconds", "", ["route"], buckets=LATENCY, registry=r)

    def feed(self, call: Call, elapsed: float) -> None:
        route = call.route.name if call.route is not None else ""
        tenant = call.tenant.name if call.tenant is not None else ""
        self.requests.labels(route, tenant, call.upstream, str(call.status), call.outcome).inc()
        self.duration.labels(route).observe(elapsed)
        dispatched = call.marks.get("dispatch")
        if dispatched is not None:
            self.processing.labels(route).observe(elapsed - dispatched)
            if (first := call.marks.get("first_token")) is not None:
                self.ttft.labels(route).observe(first - dispatched)
        ttfb = call.marks.get("upstream_headers")
        if ttfb is not None and call.upstream and not (call.attempts and call.attempts[-1].shared):
            self.ttfb.labels(call.upstream).observe(ttfb)
        if call.error is not None:
            self.errors.labels(call.error).inc()
        if call.client_gone:
            self.gone.labels(route).inc()
        if call.events_relayed:
            self.events.labels(route).inc(call.events_relayed)
        for a in call.attempts:
            if not a.shared:
                self.attempts.labels(a.upstream, str(a.status) if a.status else a.error or "error").inc()
                self.latency.labels(a.upstream).observe(a.duration)


def exported(registry: CollectorRegistry) -> set[tuple[str, tuple[tuple[str, str], ...], float]]:
    """The hot families' samples as a scrape sees them (exact values, no `_created`)."""
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items())), s.value)
        for family in text_string_to_metric_families(text) if family.name in HOT
        for s in family.samples if not s.name.endswith("_created")
    }


@pytest.fixture
def plan(make_plan: Callable[[str], Plan]) -> Plan:
    return make_plan("""
        identify: {mode: api_key}
        upstreams:
          up: {provider: openai, base_url: "http://127.0.0.1:9/v1", api_key: sk-up}
          other: {provider: openai, base_url: "http://127.0.0.1:9/v1", api_key: sk-up}
        tenants:
          alpha: {keys: [sk-alpha]}
          beta: {keys: [sk-beta]}
        routes:
          - {name: chat, upstream: up}
          - {name: embed, upstream: other}
    """)


seconds = st.one_of(st.sampled_from([0.0, *LATENCY]), st.floats(min_value=0, max_value=400, allow_nan=False))
attempts = st.builds(
    Attempt, upstream=st.sampled_from(["up-0", "up-1", "other-0"]), status=st.sampled_from([0, 200, 429, 503]),
    duration=seconds, error=st.sampled_from([None, "upstream_timeout", "upstream_unreachable"]),
    shared=st.booleans(),
)
requests = st.fixed_dictionaries({
    "route": st.sampled_from([None, 0, 1]), "tenant": st.sampled_from([None, "alpha", "beta"]),
    "upstream": st.sampled_from(["", "up", "other"]), "status": st.sampled_from([0, 200, 404, 429, 499, 502, 777]),
    "failure": st.sampled_from([None, "queue_full", "bad_request"]),
    "elapsed": seconds, "dispatch": st.none() | seconds, "first": st.none() | seconds, "headers": st.none() | seconds,
    "error": st.sampled_from([None, "rate_limit", "upstream_cut"]), "gone": st.booleans(),
    "events": st.integers(0, 40), "attempts": st.lists(attempts, max_size=3),
})


def a_call(plan: Plan, r: dict[str, object]) -> Call:
    call = Call(request_id="r", plan=plan, method="POST", path="/v1/chat/completions", protocol="openai",
                started=NOW - float(r["elapsed"]))  # type: ignore[arg-type]
    call.route = plan.routes[r["route"]] if isinstance(r["route"], int) else None
    call.tenant = plan.tenants[r["tenant"]] if isinstance(r["tenant"], str) else None
    call.upstream, call.status = r["upstream"], r["status"]  # type: ignore[assignment]
    call.error, call.client_gone, call.events_relayed = r["error"], r["gone"], r["events"]  # type: ignore[assignment]
    if r["failure"] is not None:  # as ingress sets a refusal on the call
        queue_full = r["failure"] == "queue_full"
        failure = QueueFull("full", retry_after=1.0) if queue_full else InvalidRequest("no", param="x")
        call.failure, call.error, call.status = failure, failure.reason, failure.status
    call.attempts = list(r["attempts"])  # type: ignore[call-overload]
    for mark, key in (("dispatch", "dispatch"), ("first_token", "first"), ("upstream_headers", "headers")):
        if r[key] is not None:
            call.marks[mark] = float(r[key])  # type: ignore[arg-type]
    judge(call)  # the outcome, as every caller of `record` judges it first
    return call


@contextmanager
def clock_at_now() -> Iterator[None]:
    """The recorder reads the clock once per request: fixed here, so elapsed is NOW - started exactly."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(rows, "perf_counter", lambda: NOW)
        yield


def record_both(plan: Plan, generated: list[dict[str, object]]) -> tuple[Metrics, Reference]:
    metrics, reference = Metrics(), Reference()
    with clock_at_now():
        for r in generated:
            call = a_call(plan, r)
            metrics.record(call)
            reference.feed(call, NOW - call.started)
    return metrics, reference


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(requests, max_size=40))
def test_record_exports_what_prometheus_client_would(plan: Plan, generated: list[dict[str, object]]) -> None:
    metrics, reference = record_both(plan, generated)
    assert exported(metrics.registry) == exported(reference.registry)


def test_sums_and_counts_stay_exact_over_many_requests(plan: Plan) -> None:
    """Thousands of requests through the same few rows; the wall screen's reading midway sees every value so
    far, and the rows bound before the reading keep feeding the same series after it."""
    rng = random.Random(13)
    generated = [{
        "route": rng.choice([0, 1]), "tenant": "alpha", "upstream": "up", "status": 200, "failure": None,
        "elapsed": rng.expovariate(2.0), "dispatch": rng.random() / 100, "first": rng.choice([None, 0.2, 0.3]),
        "headers": rng.random(), "error": None, "gone": False, "events": 0,
        "attempts": [Attempt("up-0", 200, rng.expovariate(5.0))],
    } for _ in range(HALF * 2 + 77)]
    metrics, reference = record_both(plan, generated[:HALF + 5])
    reading = live.read_counters(metrics, 0.0)  # the wall screen's
    firsts = [r["first"] - r["dispatch"] for r in generated[:HALF + 5]  # type: ignore[operator]
              if r["route"] == 0 and r["first"] is not None]
    total = 0.0
    for value in firsts:
        total += value
    assert reading.ttft["chat"][1] == total and sum(reading.ttft["chat"][0]) == len(firsts)
    with clock_at_now():
        for r in generated[HALF + 5:]:
            call = a_call(plan, r)
            metrics.record(call)
            reference.feed(call, NOW - call.started)
    assert exported(metrics.registry) == exported(reference.registry)
    assert metrics.requests.get("chat", "alpha", "up", "200", "ok") == sum(r["route"] == 0 for r in generated)


def test_a_series_is_exported_from_its_first_value_only(plan: Plan) -> None:
    """A route whose requests were never dispatched has no processing or TTFT series (as before the rows)."""
    base = {"route": 1, "tenant": None, "upstream": "", "status": 429, "failure": "queue_full", "elapsed": 0.01,
            "dispatch": None, "first": None, "headers": None, "error": "rate_limit", "gone": False, "events": 0,
            "attempts": []}
    metrics, _ = record_both(plan, [base])
    names = {name for name, labels, _ in exported(metrics.registry) if ("route", "embed") in labels}
    assert "signalbox_request_duration_seconds_count" in names
    assert not any(n.startswith(("signalbox_processing", "signalbox_time_to_first")) for n in names)


def in_order(registry: CollectorRegistry) -> list[tuple[str, tuple[tuple[str, str], ...], float]]:
    """The hot families' samples in the order a scrape lists them (series in the order they were created)."""
    text = generate_latest(registry).decode()
    return [
        (s.name, tuple(sorted(s.labels.items())), s.value)
        for family in text_string_to_metric_families(text) if family.name in HOT
        for s in family.samples if not s.name.endswith("_created")
    ]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(requests, st.booleans()), max_size=40), st.integers(1, 4))
def test_values_folded_at_any_read_or_bound_export_what_prometheus_client_would(
        plan: Plan, generated: list[tuple[dict[str, object], bool]], every: int) -> None:
    """Histogram values and attempts wait to be folded in until a read or every `every` requests: a scrape
    anywhere in between lists the same series, in the same order, with the same values, and what waits stays
    within the bound."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(rows, "FOLD_EVERY", every)
        metrics, reference = Metrics(), Reference()
        recorder = metrics.record.__self__  # type: ignore[attr-defined]
        with clock_at_now():
            for r, scrape in generated:
                call = a_call(plan, r)
                metrics.record(call)
                reference.feed(call, NOW - call.started)
                assert len(recorder.attempts) < every * 3  # at most three attempts a request here
                if scrape:
                    assert in_order(metrics.registry) == in_order(reference.registry)
    assert in_order(metrics.registry) == in_order(reference.registry)
