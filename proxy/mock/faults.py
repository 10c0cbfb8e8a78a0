"""The mock's knobs: server-wide settings, scripted faults drawn per request, and `x-mock-*` header
overrides. Pure: the fault RNG is passed in, so a seed replays the same draws."""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, slots=True)
class MockFault:
    """A scripted failure, drawn per request with `probability`."""

    kind: Literal["status", "stall", "drop"]
    probability: float = 1.0
    status: int = 503
    retry_after: float | None = None
    stall: float = 0.0
    after_events: int = 3
    times: int | None = None
    """Requests that get it before it is spent (None: never spent)."""


@dataclass(frozen=True, slots=True)
class MockSettings:
    """Server-wide defaults; `x-mock-*` request headers override them per request."""

    ttft: float = 0.0
    token_delay: float = 0.0
    output_tokens: int = 16
    embedding_dim: int = 8
    faults: tuple[MockFault, ...] = ()
    seed: int | None = None


@dataclass(frozen=True, slots=True)
class Knobs:
    """What one request gets once settings, fault draws and `x-mock-*` headers are combined."""

    ttft: float
    token_delay: float
    output_tokens: int
    status: int | None
    retry_after: float | None
    stall: float
    drop_after: int | None


class BadHeader(ValueError):
    """An `x-mock-*` header value that cannot be used."""


def _header(headers: Mapping[str, str], name: str, lo: float, hi: float, integer: bool) -> float | None:
    raw = headers.get(name)
    if raw is None:
        return None
    try:
        value = float(int(raw.strip())) if integer else float(raw.strip())
    except ValueError:
        kind = "an integer" if integer else "a number"
        raise BadHeader(f"header {name} must be {kind}, got {raw!r}") from None
    if not math.isfinite(value) or not lo <= value <= hi:
        raise BadHeader(f"header {name} must be between {lo:g} and {hi:g}, got {raw!r}")
    return value


def resolve_knobs(
    headers: Mapping[str, str], settings: MockSettings, rng: random.Random, used: list[int] | None = None
) -> Knobs:
    """Draw the configured faults (one RNG draw per fault, in order), then let headers override. `used`
    counts, per fault, the requests it was given to: faults with `times` script a sequence, each request
    taking the first of them that is not spent (one scripted fault per request)."""
    status: int | None = None
    retry_after: float | None = None
    stall = 0.0
    drop: int | None = None
    scripted = False
    for index, fault in enumerate(settings.faults):
        if rng.random() >= fault.probability:
            continue
        if fault.times is not None and used is not None:
            if scripted or used[index] >= fault.times:
                continue  # spent, or this request already has its scripted fault
            used[index] += 1
            scripted = True
        if fault.kind == "status" and status is None:
            status, retry_after = fault.status, fault.retry_after
        elif fault.kind == "stall":
            stall = max(stall, fault.stall)
        elif fault.kind == "drop":
            drop = fault.after_events if drop is None else min(drop, fault.after_events)
    ttft = _header(headers, "x-mock-ttft-ms", 0, 600_000, False)
    delay = _header(headers, "x-mock-token-delay-ms", 0, 60_000, False)
    tokens = _header(headers, "x-mock-output-tokens", 0, 100_000, True)
    h_status = _header(headers, "x-mock-status", 400, 599, True)
    h_retry = _header(headers, "x-mock-retry-after", 0, 86_400, False)
    h_stall = _header(headers, "x-mock-stall-ms", 0, 600_000, False)
    h_drop = _header(headers, "x-mock-drop-after", 0, 1_000_000, True)
    status = int(h_status) if h_status is not None else status
    retry_after = h_retry if h_retry is not None else retry_after
    stall = h_stall / 1000 if h_stall is not None else stall
    drop = int(h_drop) if h_drop is not None else drop
    return Knobs(
        ttft=ttft / 1000 if ttft is not None else settings.ttft,
        token_delay=delay / 1000 if delay is not None else settings.token_delay,
        output_tokens=int(tokens) if tokens is not None else settings.output_tokens,
        status=status,
        retry_after=retry_after,
        stall=stall,
        drop_after=drop,
    )
