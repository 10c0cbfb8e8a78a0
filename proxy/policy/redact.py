"""Redaction of the secrets the policy and the process know, in every form the proxy sent them.

A `Redactor` is compiled once per policy load from raw secret values (upstream keys, base_url
credentials, upstream header values, tenant keys, the Redis password, the admin token): each value
becomes its forms (as is, percent-encoded, JSON-escaped), and all forms one regex of escaped
literals factored by shared prefixes (longer matches win). A second, cheap pass handles the masked
fragments vendors echo of a
rejected key (OpenAI's `sk-proj-****abcd`): a masked token goes when its visible head is the start,
or its visible tail the end, of a known secret. Known values rather than key-shaped patterns: an
Azure key is 32 hex digits and a password is anything.

Hand-written rather than a library: the `re` module does the matching; what is ours is which forms
of which values to look for, and the prefix factoring (a flat alternation costs one try per secret
per byte: 230 µs on a success's headers with 500 secrets; factored, 3-5 µs from 5 to 500 secrets,
which is what an Aho-Corasick package would buy: `bench/redaction.py` measures it).
"""

from __future__ import annotations

import base64
import json
import logging
import re
import weakref
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import quote, quote_plus

REDACTED = "[redacted]"
MIN_SECRET_LENGTH = 6
"""Shorter values are not searched for: they would match ordinary words (and break JSON bodies)."""

# A token with a mask in it: `sk-proj-****abcd`, `sk-...abcd`, `****abcd`: anything between delimiters
# (quotes, spaces, brackets). The lookbehind makes only token starts try, and the bounded head only its
# first 256 bytes, so a long token costs one short scan (no key is longer).
_MASKED = re.compile(
    rb"(?<![^\s\"'`<>()\[\]{},;])([^\s\"'`<>()\[\]{},;*]{0,256}?)(?:\*{3,}|\.{3}|\xe2\x80\xa6)"
    rb"([^\s\"'`<>()\[\]{},;]{0,256})"
)
_MASK_MARKS = (b"***", b"...", "…".encode())
_VISIBLE = 2
"""Visible characters of a masked token that must match a secret's start or end for it to go."""
_TRAILING = b".:!?"
"""Sentence punctuation after a masked key (`...abcd.`) is not part of it."""
_MASK_SCAN = 64 * 1024
"""Masked fragments are looked for in a body's head only: they come in an error's message, and a long body
of `***` tokens would cost a Python call each."""


def forms(value: str) -> set[str]:
    """The spellings of one secret that may come back: as sent, percent-encoded (URL and form style),
    and JSON-escaped (with `/` escaped or not, non-ASCII as is or as \\u escapes)."""
    escaped = json.dumps(value, ensure_ascii=False)[1:-1]
    ascii_escaped = json.dumps(value)[1:-1]
    out = {value, quote(value, safe=""), quote_plus(value), escaped, ascii_escaped}
    out |= {form.replace("/", "\\/") for form in (escaped, ascii_escaped)}
    return out


class Redactor:
    """Replaces every known secret (any form) with `[redacted]`; immutable, shared by requests.

    `values` are the raw secrets; the repr never shows them."""

    __slots__ = ("values", "_literal", "_raw", "search")

    def __init__(self, values: Iterable[str] = ()) -> None:
        self.values = frozenset(v for v in values if len(v) >= MIN_SECRET_LENGTH)
        spelled = {form.encode("utf-8", "surrogatepass") for v in self.values for form in forms(v)}
        spelled = {s for s in spelled if len(s) >= MIN_SECRET_LENGTH}
        self._literal = re.compile(_trie(spelled)) if spelled else None
        self._raw = tuple(v.encode("utf-8", "surrogatepass") for v in self.values)
        self.search: Callable[[bytes], re.Match[bytes] | None] | None = (
            self._literal.search if self._literal is not None else None)
        """Whether (and where) `scrub(data, masks=False)` would replace anything; None when it never does.
        A C call, for a hot path's usual answer (nothing found) without `scrub`'s frames."""

    def __bool__(self) -> bool:
        return self._literal is not None

    def __repr__(self) -> str:
        return f"Redactor({len(self.values)} secrets)"

    def merged(self, *others: Iterable[str]) -> Redactor:
        """A redactor for these values and `others` (compiled again: once per policy load)."""
        values = set(self.values)
        for other in others:
            values.update(other)
        return Redactor(values)

    def scrub(self, data: bytes, masks: bool = True) -> bytes:
        """`data` with every secret replaced; the same object when there was none. `masks`: look for
        masked fragments too (in messages; header values do not carry them, and the look costs 2 µs)."""
        literal = self._literal
        if literal is None:
            return data
        if literal.search(data) is not None:
            data = literal.sub(REDACTED.encode(), data)
        if not masks:
            return data
        head = data[:_MASK_SCAN] if len(data) > _MASK_SCAN else data
        if any(mark in head for mark in _MASK_MARKS):
            clean = _MASKED.sub(self._masked, head)
            if clean != head:
                data = clean if head is data else clean + data[_MASK_SCAN:]
        return data

    def scrub_text(self, text: str, masks: bool = True) -> str:
        if self._literal is None:
            return text
        data = text.encode("utf-8", "surrogatepass")
        clean = self.scrub(data, masks)
        return text if clean is data else clean.decode("utf-8", "surrogatepass")

    def _masked(self, match: re.Match[bytes]) -> bytes:
        head, tail = match.group(1), match.group(2).rstrip(_TRAILING)
        if len(head) >= _VISIBLE and any(s.startswith(head) for s in self._raw):
            return REDACTED.encode()
        if len(tail) >= _VISIBLE and any(s.endswith(tail) for s in self._raw):
            return REDACTED.encode()
        return match.group(0)


EMPTY = Redactor()


def _trie(words: Iterable[bytes]) -> bytes:
    """One regex for many literals, factored by shared prefixes (`ab(?:c|d)` rather than `abc|abd`): the
    `re` engine tries alternatives one by one, so a flat list of N secrets costs N tries per byte; the
    trie costs one per distinct next byte. Longer matches win (a form that extends another)."""
    root: dict[int, Any] = {}
    for word in words:
        node = root
        for byte in word:
            node = node.setdefault(byte, {})
        node[-1] = {}  # a word ends here

    def build(node: dict[int, Any]) -> bytes:
        branches = [re.escape(bytes([b])) + build(child) for b, child in sorted(node.items()) if b >= 0]
        if not branches:
            return b""
        group = branches[0] if len(branches) == 1 else b"(?:" + b"|".join(branches) + b")"
        if -1 in node:
            return (b"(?:" + group + b")?") if len(branches) == 1 else group + b"?"
        return group

    return build(root)


def basic_values(user: str, password: str | None, raw_user: str | None, raw_password: str | None) -> list[str]:
    """What Basic credentials from a URL's `user:password@` put on the wire and in the URL: the
    password (decoded and as written), `user:password`, and the base64 token. A user without a password
    is the secret itself (a token sent as the user name)."""
    secret = password or user
    token = base64.b64encode(f"{user}:{password or ''}".encode()).decode("ascii")
    out = [secret, token, f"{user}:{password or ''}"]
    if raw_password or (raw_user and not password):
        out.append(raw_password or raw_user or "")
    return out


class SecretsRef:
    """The process's redactor, compiled again at each policy load: the serving policy's secrets, the
    previous policy's (for requests still in flight on it) and the process's own (the admin token)."""

    __slots__ = ("current", "process", "_plan", "__weakref__")

    def __init__(self) -> None:
        self.current = EMPTY
        self.process: frozenset[str] = frozenset()
        self._plan = EMPTY

    def load(self, secrets: Redactor) -> None:
        previous, self._plan = self._plan, secrets
        self.current = secrets.merged(self.process, previous.values)

    def add_process_secret(self, value: str) -> None:
        self.process = self.process | {value}
        self.current = self.current.merged(self.process)


# --- python logging ----------------------------------------------------------------------------------

_LIVE: weakref.WeakSet[SecretsRef] = weakref.WeakSet()
_installed: list[Callable[..., logging.LogRecord]] = []


def redact_logs(ref: SecretsRef) -> None:
    """Every log record of the process (ours, aiohttp's, asyncio's) is redacted with `ref`'s secrets
    from now on, message and traceback alike, before any handler sees it."""
    _LIVE.add(ref)
    if _installed:
        return
    previous = logging.getLogRecordFactory()
    _installed.append(previous)

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        refs = [ref for ref in _LIVE if ref.current]
        if refs:
            _scrub(record, refs)
        return record

    logging.setLogRecordFactory(factory)


def _scrub(record: logging.LogRecord, refs: list[SecretsRef]) -> None:
    try:
        message = record.getMessage()
    except Exception:  # a malformed record: leave it to logging's own error handling
        return
    clean = message
    for ref in refs:
        clean = ref.current.scrub_text(clean)
    if clean is not message:  # else the record keeps its template and arguments
        record.msg, record.args = clean, ()
    if record.exc_info and not record.exc_text:
        text = logging.Formatter().formatException(record.exc_info)
        for ref in refs:
            text = ref.current.scrub_text(text)
        record.exc_text = text
