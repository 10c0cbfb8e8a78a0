"""Upstream batch limits, compiled: what one embeddings request may hold on each route (pure, load time).

An upstream declares `batch_limits` (or gets its vendor's published limits from a known base_url). A route
can send a call to any deployment of its pool and of its fallbacks' pools, so its limits are the strictest
of all of them: one split fits wherever dispatch sends it. A route's `batch` merging is clamped to the
same limits, so a merged batch never exceeds what a split would send.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from yarl import URL

from proxy.policy.schema_routes import BatchLimits

DEFAULT_CONCURRENCY = 2


@dataclass(frozen=True, slots=True)
class SplitLimits:
    """The most one upstream embeddings call may hold (None: no limit) and how many parts go at once."""

    max_inputs: int | None = None
    max_tokens: int | None = None
    concurrency: int = DEFAULT_CONCURRENCY


KNOWN_HOSTS: Mapping[str, SplitLimits] = {
    # OpenAI's embeddings reference: "any array must be 2048 dimensions or less", and "all embedding models
    # enforce a maximum of 300,000 tokens summed across all inputs in a single request".
    "api.openai.com": SplitLimits(max_inputs=2048, max_tokens=300_000),
}
"""Published per-request limits by base_url host, used when an upstream declares no `batch_limits`."""


def upstream_limits(base_url: str | None, declared: BatchLimits | None) -> SplitLimits | None:
    """The upstream's own declaration, else its vendor's known limits, else None (no limit)."""
    if declared is not None:
        return SplitLimits(declared.max_inputs, declared.max_tokens, declared.concurrency)
    if base_url is None:
        return None
    try:
        host = URL(base_url).host
    except ValueError:
        return None
    return KNOWN_HOSTS.get(host or "")


def strictest(limits: Iterable[SplitLimits | None]) -> SplitLimits | None:
    """Per field the smallest limit (a limit beats none); the smallest concurrency; None when none limits."""
    found = [lim for lim in limits if lim is not None]
    if not found:
        return None
    inputs = [lim.max_inputs for lim in found if lim.max_inputs is not None]
    tokens = [lim.max_tokens for lim in found if lim.max_tokens is not None]
    return SplitLimits(min(inputs) if inputs else None, min(tokens) if tokens else None,
                       min(lim.concurrency for lim in found))


def route_limits(
    own: Iterable[str], fallbacks: Iterable[Iterable[str]], by_upstream: Mapping[str, SplitLimits | None]
) -> SplitLimits | None:
    """The strictest limits of the upstreams a route may send to: its pool's and its fallbacks' pools'."""
    names = list(own)
    for pool in fallbacks:
        names.extend(pool)
    return strictest(by_upstream.get(name) for name in names)


def clamped(max_items: int, max_tokens: int, limits: SplitLimits | None) -> tuple[int, int]:
    """A route's batching bounds clamped to its split limits: merging never builds an oversized call."""
    if limits is None:
        return max_items, max_tokens
    items = min(max_items, limits.max_inputs) if limits.max_inputs is not None else max_items
    tokens = min(max_tokens, limits.max_tokens) if limits.max_tokens is not None else max_tokens
    return items, tokens
