"""Who may share an upstream embeddings call (pure): the input forms, and the grouping key.

Two calls get the same key only when everything that can change the answer is equal: the route (so
the upstream, its deployments and any model rewrite) in the same policy version, the path, every body
field other than `input` compared as canonical JSON (`model`, `encoding_format`, `dimensions`,
`user`), the kind of input (strings and token arrays cannot share one request), the query string,
every upstream-bound header that is not per-request noise, and the tenant unless the route allows
cross-tenant batching. A body with any other field, or an input in none of the four forms, gets no
key: it is sent alone rather than risk mixing answers.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import orjson

KNOWN_FIELDS = frozenset({"model", "input", "encoding_format", "dimensions", "user"})
"""OpenAI's embeddings request fields; anything else (vendor extensions, `stream`) is sent alone."""
BYTES_PER_TOKEN = 4
"""The token estimate of a string, used for max_tokens and to apportion usage (token arrays are exact)."""

# Headers that differ per request without changing the answer: framing, SDK telemetry, tracing, ids.
# Every other upstream-bound header (OpenAI-Organization, OpenAI-Project, x-mock-*) is part of the key.
INERT_HEADERS = frozenset(
    {
        "host", "content-length", "content-type", "accept", "accept-encoding", "accept-language",
        "user-agent", "connection", "keep-alive", "te", "transfer-encoding", "x-request-id", "traceparent",
        "tracestate", "idempotency-key", "x-signalbox-priority",
    }
)
INERT_PREFIXES = ("x-stainless-",)
CREDENTIAL_HEADERS = frozenset({"authorization", "x-api-key", "api-key"})

Kind = Literal["text", "tokens"]


@dataclass(frozen=True, slots=True)
class Inputs:
    """One caller's inputs, one item per embedding it will get back."""

    kind: Kind
    items: tuple[Any, ...]
    """Strings (text) or lists of ints (tokens): what goes into the merged `input` array."""
    tokens: int
    """Estimated tokens (exact for token arrays): counted against max_tokens, and its usage share."""

    @property
    def count(self) -> int:
        return len(self.items)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def text_tokens(text: str) -> int:
    return max(1, math.ceil(len(text.encode()) / BYTES_PER_TOKEN))


def inputs_of(value: object) -> Inputs | None:
    """A string, a list of strings, one token array or a list of token arrays; None for anything else."""
    if isinstance(value, str):
        return Inputs("text", (value,), text_tokens(value))
    if not isinstance(value, list) or not value:
        return None
    first = value[0]
    if isinstance(first, str):
        if all(isinstance(v, str) for v in value):
            return Inputs("text", tuple(value), sum(text_tokens(v) for v in value))
        return None
    if _is_int(first):
        if all(_is_int(v) for v in value):
            return Inputs("tokens", (value,), max(1, len(value)))
        return None
    if isinstance(first, list) and all(isinstance(v, list) and all(_is_int(t) for t in v) for v in value):
        return Inputs("tokens", tuple(value), sum(max(1, len(v)) for v in value))
    return None


def header_signature(
    headers: Iterable[tuple[str, str]], *, credentials: bool, drop: frozenset[str] = frozenset()
) -> str:
    """A digest of the headers that reach the upstream and may change its answer ("" when none do).

    `credentials`: pass-through mode, where the caller's own key goes upstream, so callers with
    different keys must never share a call. `drop`: headers the proxy consumes (the tenant header).
    """
    kept: list[tuple[str, str]] = []
    for name, value in headers:
        lower = name.lower()
        if lower in CREDENTIAL_HEADERS:
            if credentials:
                kept.append((lower, value))
            continue
        if lower in INERT_HEADERS or lower in drop or lower.startswith(INERT_PREFIXES):
            continue
        kept.append((lower, value))
    if not kept:
        return ""
    kept.sort()
    return hashlib.sha256(orjson.dumps(kept)).hexdigest()


def group_key(
    body: Mapping[str, Any],
    inputs: Inputs | None,
    *,
    route: str,
    plan: str,
    path: str,
    tenant: str | None,
    query: str,
    headers: str,
) -> Hashable | None:
    """The key callers must share to be merged, or None: send this call alone.

    `tenant` is None when the route allows cross-tenant batching.
    """
    if inputs is None or not KNOWN_FIELDS.issuperset(body):
        return None
    rest = orjson.dumps({k: v for k, v in body.items() if k != "input"}, option=orjson.OPT_SORT_KEYS)
    return (route, plan, path, inputs.kind, tenant, query, headers, rest)
