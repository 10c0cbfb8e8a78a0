"""The per-request metrics, counted in plain dicts and turned into Prometheus samples only when scraped.

Why not prometheus_client's Counter and Histogram here: each `inc()`/`observe()` takes a lock and walks
the buckets in Python, about 20 µs per request for the handful of series every request feeds (measured
with py-spy against bench/floor.py). One event loop thread owns these dicts, so no lock is needed; a
scrape reads them from the same thread. prometheus_client still does the exposition (a custom
collector), so names, help texts and the text format are the library's.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Iterator, Sequence
from functools import reduce
from operator import add

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

FOLD_EVERY = 4096
"""Pending values (per series, and requests for the recorder) after which they are folded in without a read:
what bounds their memory between scrapes."""


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

    Values are folded in when read, not when added: per request `Metrics.record` appends to `pending` (its
    rows bind `pending.append`, a C call; telemetry/rows.py bounds every series' pending values by folding
    all of them every `FOLD_EVERY` requests), and `counts`/`total` fold the pending values first. The fold
    sorts the values and bisects each bound into them, and adds the values left to right (`reduce`), so the
    sum is the same float as adding each value as it came, and the counts what `bisect_left` per value gives
    (le: a value equal to a bound falls in its bucket)."""

    __slots__ = ("bounds", "_counts", "_total", "pending")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self._counts = [0] * (len(bounds) + 1)
        self._total = 0.0
        self.pending: list[float] = []
        """Values added since the last fold, in the order they came."""

    def add(self, value: float) -> None:
        """One value (the generic path; the recorder appends to `pending` itself)."""
        pending = self.pending
        pending.append(value)
        if len(pending) >= FOLD_EVERY:
            self.fold()

    def fold(self) -> None:
        """Count the pending values into the buckets and the sum. Sorted once, a bucket's count is the number
        of values up to its bound less those up to the previous one (`bisect_right`: a value equal to a bound
        falls in it, as `bisect_left` per value puts it); Python runs per bound, C per value."""
        pending = self.pending
        if pending:
            ordered = sorted(pending)
            counts = self._counts
            below = 0
            for index, bound in enumerate(self.bounds):
                upto = bisect_right(ordered, bound, below)
                counts[index] += upto - below
                below = upto
            counts[-1] += len(ordered) - below
            self._total = reduce(add, pending, self._total)  # in the order they came: the same float
            pending.clear()

    @property
    def counts(self) -> list[int]:
        """Per bucket (not cumulative), every value so far included."""
        self.fold()
        return self._counts

    @property
    def total(self) -> float:
        self.fold()
        return self._total


class HotHistogram:
    """A histogram family keyed by a tuple of label values; `observe` appends to the series' pending values."""

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

    def fold(self) -> None:
        for series in self.series.values():
            series.fold()

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

    def __init__(self, families: Sequence[HotCounter | HotHistogram], fold: Callable[[], None] = lambda: None) -> None:
        self.families = tuple(families)
        self.fold = fold
        """Counts what the recorder keeps pending (telemetry/rows.py) into the families: called first."""

    def collect(self) -> Iterator[Metric]:
        self.fold()
        for family in self.families:
            yield family.family()

    def describe(self) -> Iterator[Metric]:
        return iter(())  # no duplicate-name check against samples we would have to build now
