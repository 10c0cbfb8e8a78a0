"""Pure helpers over a resumable stream's events: numbering them with an SSE `id:`, cutting a run of whole
events into single ones, and reading where a reader wants to start (`Last-Event-ID`, `starting_after`).

Ids are the events' positions in the stream, counted from 0: the OpenAI Responses API numbers its events
the same way (`sequence_number` from 0), so for a Responses stream relayed one event per event the `id:` of
an event is its `sequence_number`, and `starting_after=N` and `Last-Event-ID: N` mean the same thing.
"""

from __future__ import annotations

from proxy.streaming.sse import SSEDecoder

MAX_ID = 2**53
"""Largest id a reader may name (a JSON-safe integer; a stream never gets near it)."""


def stamp(event: bytes, seq: int) -> bytes:
    """`event` (one whole SSE block) with `id: seq` as its last field line, so that it wins over any `id:`
    the upstream sent (the last one in a block counts)."""
    line = b"id: %d" % seq
    if event.endswith(b"\n\n"):
        return event[:-1] + line + b"\n\n"
    if event.endswith(b"\r\n\r\n"):
        return event[:-2] + line + b"\r\n\r\n"
    if event.endswith(b"\r\r"):
        return event[:-1] + line + b"\r\r"
    return line + b"\n" + event  # not a block the decoder cut (never expected): the id goes first


def split(data: bytes) -> list[bytes]:
    """One or more whole SSE blocks, as the relay writes them, cut into single blocks (comment-only blocks
    dropped: they are keep-alives, not events). One LF-framed block, the common case, costs one search."""
    end = data.find(b"\n\n")
    if end == len(data) - 2 and b"\r" not in data:
        return [data] if data[:1] != b":" else []
    return [event.raw[event.skip :] for event in SSEDecoder().feed(data) if not event.is_comment_only]


def parse_after(value: str | None) -> int | None:
    """The id a reader last saw (`Last-Event-ID` or `starting_after`): None when absent or not a
    non-negative integer the proxy could have sent, -1 for an empty value (start from the first event)."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return -1
    if not value.isdigit() or len(value) > 16:
        return None
    number = int(value)
    return number if number <= MAX_ID else None
