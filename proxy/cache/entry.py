"""One stored answer and its bytes: what a hit replays (status, kept headers, body byte for byte) and when
it was stored (for `Age`). The same bytes go to memory and to Redis, so both stores behave alike."""

from __future__ import annotations

from dataclasses import dataclass

import orjson

_SEP = b"\n"


@dataclass(frozen=True, slots=True)
class Entry:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    stored: float
    """Wall-clock time it was stored (the replicas' clocks agree within NTP's error)."""


def encode(entry: Entry) -> bytes:
    """A JSON head line, then the body as is (never re-serialised)."""
    head = orjson.dumps([entry.status, entry.stored, entry.headers])
    return head + _SEP + entry.body


def decode(data: bytes) -> Entry | None:
    """The entry, or None for bytes this version cannot read (a foreign or damaged value: a miss)."""
    head, sep, body = data.partition(_SEP)
    if not sep:
        return None
    try:
        status, stored, headers = orjson.loads(head)
        return Entry(int(status), [(str(k), str(v)) for k, v in headers], body, float(stored))
    except (orjson.JSONDecodeError, TypeError, ValueError):
        return None
