"""The per-request metrics, counted in plain dicts and turned into Prometheus samples only when scraped.

Why not prometheus_client's Counter and Histogram here: each `inc()`/`observe()` takes a lock and walks
the buckets in Python, about 20 µs per request for the handful of series every request feeds (measured
with py-spy against bench/floor.py). One event loop thread owns these dicts, so no lock is needed; a
scrape reads them from the same thread. prometheus_client still does the exposition (a custom
collector), so names, help texts and the text format are the library's.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector


class HotCounter:
    """A counter family keyed by a tuple of label values."""

    __slots__ = ("name", "help", "labels", "values")

    def __init__(self, name: str, help_text: str, labels: Sequence[str]) -> None:
        self.name = name
        self.help = help_text
        self.labels = list(labels)
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, key: tuple[str, ...], amount: float = 1.0) -> None:
        values = self.values
        values[key] = values.get(key, 0.0) + amount

    def get(self, *key: str) -> float:
        return self.values.get(key, 0.0)

    def family(self) -> Metric:
        family = CounterMetricFamily(self.name, self.help, labels=self.labels)
        for key, value in self.values.items():
            family.add_metric(list(key), value)
        return family


class _Buckets:
    __slots__ = ("counts", "total")

    def __init__(self, size: int) -> None:
        self.counts = [0] * size  # one per bound, plus +Inf; not cumulative until scraped
        self.total = 0.0


class HotHistogram:
    """A histogram family keyed by a tuple of label values; `observe` is a bisect and two additions."""

    __slots__ = ("name", "help", "labels", "bounds", "series")

    def __init__(self, name: str, help_text: str, labels: Sequence[str], bounds: Sequence[float]) -> None:
        self.name = name
        self.help = help_text
        self.labels = list(labels)
        self.bounds = tuple(sorted(float(b) for b in bounds))
        self.series: dict[tuple[str, ...], _Buckets] = {}

    def observe(self, key: tuple[str, ...], value: float) -> None:
        series = self.series.get(key)
        if series is None:
            series = self.series[key] = _Buckets(len(self.bounds) + 1)
        series.counts[bisect_left(self.bounds, value)] += 1  # le: a value equal to a bound falls in it
        series.total += value

    def family(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.help, labels=self.labels)
        for key, series in self.series.items():
            running = 0
            buckets: list[tuple[str, float]] = []
            for bound, count in zip((*self.bounds, float("inf")), series.counts, strict=True):
                running += count
                buckets.append(("+Inf" if bound == float("inf") else _float(bound), running))
            family.add_metric(list(key), buckets, series.total)
        return family


def _float(value: float) -> str:
    return repr(float(value))


class HotMetrics(Collector):
    """The collector registered in the app's registry; it owns the hot families."""

    def __init__(self, families: Sequence[HotCounter | HotHistogram]) -> None:
        self.families = tuple(families)

    def collect(self) -> Iterator[Metric]:
        for family in self.families:
            yield family.family()

    def describe(self) -> Iterator[Metric]:
        return iter(())  # no duplicate-name check against samples we would have to build now
