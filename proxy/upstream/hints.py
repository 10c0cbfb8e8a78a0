"""Upstream wait hints, parsed defensively (pure; the wall clock is passed in).

Formats (PROTOCOLS.md §1.4, §1.5, §2.3):
- `retry-after-ms`: milliseconds, float allowed (OpenAI, and the SDKs read it first);
- `retry-after`: seconds (float allowed) or an HTTP date (RFC 9110 §10.2.3);
- `x-ratelimit-reset-requests` / `-tokens`: Go durations such as `20ms`, `1s`, `6m0s`, `1h2m3.5s`;
- `anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-reset`: RFC 3339 timestamps.
Garbage (negative, NaN, unparseable, absurdly far) gives None, never an exception: one vendor's odd
header must not fail a request. Hand-written because the stdlib parses dates but not Go durations, and
no maintained library covers these vendor headers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from datetime import datetime
from email.utils import parsedate_to_datetime

MAX_HINT = 86_400.0
"""Anything longer than a day is treated as garbage."""

_GO_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_OPENAI_RESETS = (
    ("x-ratelimit-remaining-requests", "x-ratelimit-reset-requests"),
    ("x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"),
)
_ANTHROPIC_RESETS = tuple(
    (f"anthropic-ratelimit-{kind}-remaining", f"anthropic-ratelimit-{kind}-reset")
    for kind in ("requests", "tokens", "input-tokens", "output-tokens")
)


def _sane(seconds: float) -> float | None:
    if not math.isfinite(seconds) or seconds < 0 or seconds > MAX_HINT:
        return None
    return seconds


def _number(value: str) -> float | None:
    try:
        number = float(value.strip())
    except ValueError:
        return None
    return number


def retry_after_ms(value: str) -> float | None:
    number = _number(value)
    return None if number is None else _sane(number / 1000.0)


def retry_after(value: str, now_wall: float) -> float | None:
    """Seconds, or an HTTP date (a date in the past means: now)."""
    number = _number(value)
    if number is not None:
        return _sane(number)
    try:
        when = parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return _sane(max(0.0, when.timestamp() - now_wall))


def go_duration(value: str) -> float | None:
    """`1s`, `6m0s`, `20ms`, `1h2m3.5s`; a bare number is read as seconds (seen from some servers)."""
    text = value.strip()
    if not text:
        return None
    number = _number(text)
    if number is not None:
        return _sane(number)
    total = 0.0
    pos = 0
    for match in _GO_PART.finditer(text):
        if match.start() != pos:
            return None
        total += float(match.group(1)) * _GO_UNITS[match.group(2)]
        pos = match.end()
    if pos != len(text) or pos == 0:
        return None
    return _sane(total)


def rfc3339(value: str, now_wall: float) -> float | None:
    """Seconds from now until an RFC 3339 timestamp (past: 0)."""
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    if when.tzinfo is None:
        return None
    return _sane(max(0.0, when.timestamp() - now_wall))


def _resets(headers: Mapping[str, str], now_wall: float, only_exhausted: bool) -> float | None:
    """The latest reset among the limits that are exhausted (remaining 0); with only_exhausted off and
    none reported exhausted, the latest reset given at all (a 429 names no limit otherwise)."""
    exhausted: list[float] = []
    given: list[float] = []
    for pairs, parse in ((_OPENAI_RESETS, go_duration), (_ANTHROPIC_RESETS, None)):
        for remaining_name, reset_name in pairs:
            raw = headers.get(reset_name)
            if raw is None:
                continue
            seconds = parse(raw) if parse is not None else rfc3339(raw, now_wall)
            if seconds is None:
                continue
            remaining = headers.get(remaining_name)
            if remaining is not None and remaining.strip() == "0":
                exhausted.append(seconds)
            given.append(seconds)
    if exhausted:
        return max(exhausted)
    if only_exhausted or not given:
        return None
    return max(given)


def retry_hint(headers: Mapping[str, str], now_wall: float) -> float | None:
    """How long the upstream asked us to wait before trying again, or None if it did not say.

    Order as the SDKs read them: retry-after-ms, retry-after, then the rate-limit reset headers."""
    raw = headers.get("retry-after-ms")
    if raw is not None:
        found = retry_after_ms(raw)
        if found is not None:
            return found
    raw = headers.get("retry-after")
    if raw is not None:
        found = retry_after(raw, now_wall)
        if found is not None:
            return found
    return _resets(headers, now_wall, only_exhausted=False)


_REMAINING = tuple(name for name, _ in (*_OPENAI_RESETS, *_ANTHROPIC_RESETS))


def exhausted_for(headers: Mapping[str, str], now_wall: float) -> float | None:
    """On a successful response: seconds until the reset of a limit reported at 0 remaining, else None.

    Called for every response: the common case is six header lookups (in C, through `map`) and no parsing."""
    if "0" in map(headers.get, _REMAINING):
        return _resets(headers, now_wall, only_exhausted=True)
    return None
