"""Where an answer says what it cost: the `usage` object of a whole JSON answer or of one stream event, in
every protocol the proxy relays (pure). Token limits settle with it; the batcher apportions it.

A long whole answer's `usage` is read from the end of the body when it can be (`usage_from_end`): answers
put it after the content (OpenAI, Anthropic, the Responses API), so a 100 KiB answer is not parsed whole for
a few numbers. Hand-written because no JSON library reads one member of a document without parsing the
rest; whenever the scan is not sure, the whole body is parsed as before. Below `SCAN_FROM` bytes orjson
parses the whole body faster than the scan runs (about 1.2 µs for 1 KiB against 3.5 µs; even at 8 KiB).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

_WS = b" \t\r\n"
"""JSON's whitespace (bytes.strip() would also take \\x0b and \\x0c, which JSON refuses)."""
_UNSURE = object()
SCAN_FROM = 16 * 1024
"""Bodies from this size on are scanned from the end first (measured crossover: about 8 KiB)."""
_MAX_TAIL = 4096
"""Most bytes after the usage object the scan checks (OpenAI: service_tier and system_fingerprint)."""
_MAX_NESTED = 8
"""Closing braces tried before the scan gives up (OpenAI's usage nests two `*_details` objects)."""


def usage_in(data: Mapping[str, Any]) -> dict[str, Any] | None:
    """The `usage` a parsed answer or event carries: at the top (OpenAI, an Anthropic message,
    message_delta), in Anthropic's message_start `message`, or in the Responses API's `response`."""
    usage = data.get("usage")
    if isinstance(usage, dict):
        return usage
    holder = data.get("message") or data.get("response")
    usage = holder.get("usage") if isinstance(holder, dict) else None
    return usage if isinstance(usage, dict) else None


def usage_of(body: bytes) -> dict[str, Any] | None:
    """The `usage` of a whole JSON answer, if it has one."""
    if len(body) >= SCAN_FROM:
        found = usage_from_end(body)
        if found is not _UNSURE:
            return found  # type: ignore[return-value]
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(parsed, dict):
        return None
    usage = parsed.get("usage")  # where most answers carry it (`usage_in`'s first place, without its call)
    return usage if isinstance(usage, dict) else usage_in(parsed)


def usage_from_end(body: bytes) -> dict[str, Any] | object:
    """The top-level `usage` object found from the end of the body, or `_UNSURE` (parse it whole). For a body
    that is valid JSON this is what `usage_in(orjson.loads(body))` gives, whenever it is not `_UNSURE`.

    How it knows: the last `"usage"` must open a key (after `{` or `,`) whose value is an object, found by
    counting braces and confirmed by parsing just that slice (a valid JSON object that starts at `{` ends at
    its own closing brace, never earlier); what follows must be the rest of exactly one object up to the end
    of the body (`}` alone, or `,` and members that parse as an object), so that object is the top one.
    """
    at = body.rfind(b'"usage"')
    if at < 0:
        return _UNSURE  # rare (answers carry usage); proving it absent would cost a search for \\u escapes
    before = at - 1
    while before >= 0 and body[before] in _WS:
        before -= 1
    if before < 0 or body[before] not in b"{,":
        return _UNSURE
    colon = _skip_ws(body, at + 7)
    if body[colon:colon + 1] != b":":
        return _UNSURE
    start = _skip_ws(body, colon + 1)
    if body[start:start + 1] != b"{":
        return _UNSURE  # null or another type: `usage_in` would look in `message`/`response`
    end = _object_end(body, start)
    if end < 0:
        return _UNSURE
    try:
        usage = orjson.loads(body[start:end])
    except orjson.JSONDecodeError:
        return _UNSURE
    return usage if _closes_top(body[end:]) else _UNSURE


def _skip_ws(body: bytes, pos: int) -> int:
    end = len(body)
    while pos < end and body[pos] in _WS:
        pos += 1
    return pos


def _object_end(body: bytes, start: int) -> int:
    """The index after the first `}` where braces since `start` balance (strings not considered: the parse
    of the slice confirms it), or -1."""
    pos = start + 1
    for _ in range(_MAX_NESTED):
        close = body.find(b"}", pos)
        if close < 0:
            return -1
        if body.count(b"{", start, close) == body.count(b"}", start, close + 1):
            return close + 1
        pos = close + 1
    return -1


def _closes_top(rest: bytes) -> bool:
    """`rest` (what follows the usage object) ends exactly one JSON object and then the body: `}`, or `,`
    and at least one member, then `}`. Another `usage` key spelled with escapes there would win: unsure."""
    rest = rest.strip(_WS)
    if len(rest) > _MAX_TAIL:
        return False  # usage is not near the end: checking the rest would cost what the full parse costs
    if rest == b"}":
        return True
    if not rest.startswith(b",") or b"\\u" in rest:
        return False
    try:
        members = orjson.loads(b"{" + rest[1:])
    except orjson.JSONDecodeError:
        return False
    return isinstance(members, dict) and bool(members) and "usage" not in members
