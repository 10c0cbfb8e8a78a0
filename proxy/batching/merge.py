"""Merge callers' inputs into one embeddings request and split the answer back (pure).

- Each caller's inputs stay contiguous, in arrival order; caller j owns items [offset_j, offset_j + n_j).
- The answer is split by offset; `index` is renumbered from 0 per caller; every other top-level
  field (`object`, `model`, vendor extras) is copied; embeddings are copied untouched, so base64
  strings come back byte for byte and floats as the same doubles.
- `usage`: every integer is apportioned by each caller's share of the estimated tokens (exact for
  token arrays), largest remainder first, so the parts sum to the upstream's totals exactly.
- A 400-class answer to a merged call is bisected: the caller whose item the error names goes on its
  own, or else the callers are halved, until the error reaches a call holding one caller's inputs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from proxy.batching.keys import Inputs

BISECT_STATUSES = frozenset({400, 413, 422})
"""Answers one bad input can cause (invalid or too long an input, too large a request). Others
(401, 403, 404, 429, 5xx) are the same for every caller and go to all of them unchanged."""
_NAMED_ITEM = re.compile(r"\binput\[(\d+)\]|\binput\.(\d+)\b|\bindex (\d+)\b")


class SplitError(ValueError):
    """The upstream's answer does not hold one embedding per input."""


def merged_body(template: Mapping[str, Any], parts: Sequence[Inputs]) -> dict[str, Any]:
    """The first caller's body (all share every field but `input`) with everyone's inputs in order."""
    merged: list[Any] = []
    for part in parts:
        merged.extend(part.items)
    return {k: (merged if k == "input" else v) for k, v in template.items()}


def fits(items: int, tokens: int, add: Inputs, max_items: int, max_tokens: int) -> bool:
    """May `add` join a group holding `items` inputs and `tokens` estimated tokens?"""
    return items + add.count <= max_items and tokens + add.tokens <= max_tokens


def full(items: int, tokens: int, max_items: int, max_tokens: int) -> bool:
    return items >= max_items or tokens >= max_tokens


def too_big(inputs: Inputs, max_items: int, max_tokens: int) -> bool:
    """A caller that alone exceeds the batch limits is sent on its own (never split across calls)."""
    return inputs.count > max_items or inputs.tokens > max_tokens


def apportion(total: int, weights: Sequence[int]) -> list[int]:
    """Split `total` by `weights` (largest remainder; ties to the earlier caller); sums to `total`."""
    if not weights:
        return []
    if sum(weights) <= 0:
        weights = [1] * len(weights)
    whole = sum(weights)
    shares = [total * w // whole for w in weights]
    left = total - sum(shares)
    order = sorted(range(len(weights)), key=lambda i: (-(total * weights[i] % whole), i))
    for i in order[:left]:
        shares[i] += 1
    return shares


def apportion_usage(usage: Mapping[str, Any], weights: Sequence[int]) -> list[dict[str, Any]]:
    """Every integer of `usage` (nested objects too) split by `weights`; other values copied."""
    parts: list[dict[str, Any]] = [{} for _ in weights]
    for key, value in usage.items():
        if isinstance(value, int) and not isinstance(value, bool):
            for part, share in zip(parts, apportion(value, weights), strict=True):
                part[key] = share
        elif isinstance(value, Mapping):
            for part, inner in zip(parts, apportion_usage(value, weights), strict=True):
                part[key] = inner
        else:
            for part in parts:
                part[key] = value
    return parts


def split(answer: Any, counts: Sequence[int], weights: Sequence[int]) -> list[dict[str, Any]]:
    """One response body per caller, from the merged call's parsed answer."""
    if not isinstance(answer, dict):
        raise SplitError("the answer is not a JSON object")
    data = answer.get("data")
    total = sum(counts)
    if not isinstance(data, list) or len(data) != total:
        got = len(data) if isinstance(data, list) else "no"
        raise SplitError(f"the answer holds {got} embeddings for {total} inputs")
    if not all(isinstance(d, dict) and isinstance(d.get("index"), int) for d in data):
        raise SplitError("an embedding in the answer has no integer index")
    ordered = sorted(data, key=lambda d: d["index"])  # OpenAI answers in order; sorting costs little
    if any(d["index"] != i for i, d in enumerate(ordered)):
        raise SplitError(f"the answer's indexes are not 0..{total - 1}")
    usage = answer.get("usage")
    usages = apportion_usage(usage, weights) if isinstance(usage, Mapping) else None
    bodies: list[dict[str, Any]] = []
    offset = 0
    for j, count in enumerate(counts):
        mine = [{**d, "index": i} for i, d in enumerate(ordered[offset : offset + count])]
        offset += count
        body: dict[str, Any] = {}
        for key, value in answer.items():
            if key == "data":
                body[key] = mine
            elif key == "usage" and usages is not None:
                body[key] = usages[j]
            else:
                body[key] = value
        bodies.append(body)
    return bodies


def should_bisect(status: int, callers: int) -> bool:
    return callers > 1 and status in BISECT_STATUSES


def named_item(error_body: bytes) -> int | None:
    """The input an upstream error names (`input[3]`, `input.3`, `index 3`), if it names one."""
    try:
        parsed = orjson.loads(error_body)
    except orjson.JSONDecodeError:
        return None
    error = parsed.get("error", parsed) if isinstance(parsed, dict) else None
    if not isinstance(error, dict):
        return None
    for field in ("param", "message"):
        value = error.get(field)
        if isinstance(value, str) and (found := _NAMED_ITEM.search(value)):
            return int(next(g for g in found.groups() if g is not None))
    return None


def halves(counts: Sequence[int], hint: int | None) -> tuple[list[int], list[int]]:
    """Split callers (by position) for a retry: the one holding item `hint` alone against the rest,
    or, with no usable hint, the first half against the second. Both sides are never empty."""
    size = len(counts)
    if size < 2:
        raise ValueError("only a call with two or more callers can be split")
    if hint is not None and 0 <= hint < sum(counts):
        offset = 0
        for j, count in enumerate(counts):
            if offset <= hint < offset + count:
                return [j], [i for i in range(size) if i != j]
            offset += count
    middle = size // 2
    return list(range(middle)), list(range(middle, size))
