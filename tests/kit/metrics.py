"""Scrape a proxy's /metrics with prometheus_client's own text parser into {(name, labels): value}."""

from __future__ import annotations

from typing import Protocol, TypeAlias

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

SampleKey: TypeAlias = tuple[str, tuple[tuple[str, str], ...]]
Samples: TypeAlias = dict[SampleKey, float]


class HasUrl(Protocol):
    @property
    def url(self) -> str: ...


def sample_key(name: str, **labels: str) -> SampleKey:
    return (name, tuple(sorted(labels.items())))


def samples(text: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def scrape(proxy: HasUrl | str) -> Samples:
    """Every sample the proxy (or a URL's /metrics) exposes now."""
    url = proxy if isinstance(proxy, str) else proxy.url
    async with aiohttp.ClientSession() as http, http.get(url + "/metrics") as resp:
        assert resp.status == 200
        return samples(await resp.text())


def total(found: Samples, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels` (0 when there are none)."""
    return sum(
        value for (n, have), value in found.items()
        if n == name and all((k, v) in have for k, v in labels.items())
    )
