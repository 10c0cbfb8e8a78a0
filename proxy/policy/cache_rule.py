"""A route's compiled response cache settings (`cache:` in the policy; proxy/cache/ applies them)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from proxy.policy.schema_routes import Cache


@dataclass(frozen=True, slots=True)
class CacheRule:
    ttl: float
    """Seconds an entry is served; an upstream max-age below it wins."""
    max_entry: int
    """Bytes; a larger answer is relayed but not stored."""
    scope: Literal["tenant", "shared"]
    salt: bytes = field(repr=False)
    """Hashed into every key of the route: its name and its pool (upstream and model of each deployment),
    so a reload that points the route elsewhere never serves the old upstream's answers."""


def cache_rule(cache: Cache | None, route: str, pool: Iterable[tuple[str, str | None]]) -> CacheRule | None:
    if cache is None:
        return None
    signature = "\n".join([route, *sorted(f"{upstream}/{model or ''}" for upstream, model in pool)])
    salt = hashlib.sha256(signature.encode()).digest()[:16]
    return CacheRule(cache.ttl, cache.max_entry, cache.scope, salt)
