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
    """A counter family keyed by a tuple of label values. Each series is a one-item list (a cell) that
    `Metrics.record` binds once per label tuple and then increments in place."""

    __slots__ = ("name", "help", "labels", "cells")

    def __init__(self, name: str, help_text: str, labels: Sequence[str]) -> None:
        self.name = name
        self.help = help_text
        self.labels = list(labels)
        self.cells: dict[tuple[str, ...], list[float]] = {}

    def cell(self, key: tuple[str, ...]) -> list[float]:
        """The series' cell, created at 0 the first time."""
        cell = self.cells.get(key)
        if cell is None:
            cell = self.cells[key] = [0.0]
        return cell

    def inc(self, key: tuple[str, ...], amount: float = 1.0) -> None:
        self.cell(key)[0] += amount

    def get(self, *key: str) -> float:
        cell = self.cells.get(key)
        return cell[0] if cell is not None else 0.0

    @property
    def values(self) -> dict[tuple[str, ...], float]:
        """Every series' value by label tuple (a copy, read by the wall screen)."""
        return {key: cell[0] for key, cell in self.cells.items()}

    def family(self) -> Metric:
        family = CounterMetricFamily(self.name, self.help, labels=self.labels)
        for key, cell in self.cells.items():
            family.add_metric(list(key), cell[0])
        return family


class Buckets:
    """One histogram series: a count per bound, plus +Inf (not cumulative until scraped), and the sum.
    `add` is what `Metrics.record` binds once per row (telemetry/rows.py)."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def add(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # le: a value equal to a bound falls in it
        self.total += value


class HotHistogram:
    """A histogram family keyed by a tuple of label values; `observe` is a bisect and two additions."""

    __slots__ = ("name", "help", "labels", "bounds", "series")

    def __init__(self, name: str, help_text: str, labels: Sequence[str], bounds: Sequence[float]) -> None:
        self.name = name
        self.help = help_text
        self.labels = list(labels)
        self.bounds = tuple(sorted(float(b) for b in bounds))
        self.series: dict[tuple[str, ...], Buckets] = {}

    def buckets(self, key: tuple[str, ...]) -> Buckets:
        """The series of `key`, created empty the first time (so only once a value is about to be added:
        a series is exported from its first observation on)."""
        series = self.series.get(key)
        if series is None:
            series = self.series[key] = Buckets(self.bounds)
        return series

    def observe(self, key: tuple[str, ...], value: float) -> None:
        self.buckets(key).add(value)

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
