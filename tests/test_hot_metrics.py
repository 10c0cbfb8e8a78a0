"""The per-request metric families (plain dicts, exported at scrape) expose exactly what
prometheus_client's own Counter and Histogram would for the same observations."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from proxy.telemetry.hot import HotCounter, HotHistogram, HotMetrics

BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


def samples(registry: CollectorRegistry) -> set[tuple[str, tuple[tuple[str, str], ...], float]]:
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items())), round(s.value, 9))
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.name.endswith("_created")
    }


def test_same_samples_as_prometheus_client() -> None:
    rng = random.Random(7)
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    counter = HotCounter("demo_requests", "Requests.", ["route", "status"])
    histogram = HotHistogram("demo_seconds", "Latency.", ["route"], BOUNDS)
    ours.register(HotMetrics([counter, histogram]))
    ref_counter = Counter("demo_requests", "Requests.", ["route", "status"], registry=theirs)
    ref_histogram = Histogram("demo_seconds", "Latency.", ["route"], buckets=BOUNDS, registry=theirs)
    values = [*BOUNDS, 0.0, 11.0, 1e-9] + [rng.expovariate(4.0) for _ in range(500)]  # bounds are inclusive
    for i, value in enumerate(values):
        route, status = ("chat", "embed")[i % 2], ("200", "429", "502")[i % 3]
        counter.inc((route, status))
        ref_counter.labels(route, status).inc()
        histogram.observe((route,), value)
        ref_histogram.labels(route).observe(value)
    counter.inc(("chat", "200"), 5)
    ref_counter.labels("chat", "200").inc(5)
    assert samples(ours) == samples(theirs)
    assert counter.get("chat", "200") == ref_counter.labels("chat", "200")._value.get()
