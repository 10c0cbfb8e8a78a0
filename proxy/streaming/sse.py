"""Incremental server-sent-events codec (WHATWG HTML §9.2), pure code on the relay's hot path.

The decoder only finds block boundaries (a blank line) with C-speed searches and hands out each block's exact
bytes; fields are parsed lazily on first access, so a pass-through relay never parses or re-serialises.
"""

from __future__ import annotations

import re

__all__ = ["DONE", "SSEDecoder", "SSEEvent", "encode_comment", "encode_event", "has_id_line"]

DONE: bytes = b"data: [DONE]\n\n"

_BOM = b"\xef\xbb\xbf"
_LF, _CR, _COLON = 10, 13, 58
# A line terminator followed by a second one (the blank line) ends a block. `\r(?!\n)` keeps the engine
# from reading the two halves of a CRLF as two terminators. A final `\r` may still become CRLF when the
# next chunk arrives; the decoder handles that case itself.
_BLOCK_END = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r|\n)")
_NEWLINES = re.compile(rb"\r\n|\r|\n")


def _text(value: bytes) -> str:
    # The spec decodes the stream as UTF-8 with replacement characters for invalid sequences.
    return value.decode("utf-8", "replace")


def _blank_line_end(data: bytes | bytearray, start: int) -> int:
    """Where the line terminator at `data[start]` (a CR or an LF) ends: after a CRLF, else one byte on.

    A CR that is the last byte is one byte long here; whether an LF follows in the next chunk is the
    decoder's state, not this function's.
    """
    if data[start] == _CR and data[start + 1 : start + 2] == b"\n":
        return start + 2
    return start + 1


class SSEEvent:
    """One SSE block: its exact bytes plus fields parsed on first access.

    `raw` runs up to and including the blank line that ended the block. Bytes before `skip` in `raw` belong
    to the framing, not the block: a stream-start BOM (3 bytes) or the LF that completes a CRLF whose CR
    ended the previous block at a chunk edge (1 byte). They stay in `raw` so pass-through is byte-identical.

    `event`, `id` and `retry` are None when the block has no valid such field (the last valid one wins);
    an empty `event:` is None too, since the spec then uses the default type, as if it were absent.
    `id` is this block's own `id:` value, not the spec's sticky last-event-ID. `comments` hold the comment
    lines without the ':' and one following space. `is_comment_only` is True when the block has no field
    line at all (only comments, or nothing: a stray blank line), so it must not count as stream progress.
    """

    __slots__ = ("raw", "skip", "_parsed", "_event", "_data", "_id", "_retry", "_comments", "_fields")

    def __init__(self, raw: bytes, skip: int = 0) -> None:
        self.raw = raw
        self.skip = skip
        self._parsed = False

    def __repr__(self) -> str:
        return f"SSEEvent(raw={self.raw!r}, skip={self.skip})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SSEEvent):
            return NotImplemented
        return self.raw == other.raw and self.skip == other.skip

    def __hash__(self) -> int:
        return hash((self.raw, self.skip))

    def _parse(self) -> None:
        raw = self.raw
        event: bytes | None = None
        ident: bytes | None = None
        retry: int | None = None
        data: list[bytes] = []
        comments: list[str] = []
        fields = False
        # bytes.splitlines breaks on CR, LF and CRLF only, exactly the SSE line terminators.
        for line in (raw[self.skip :] if self.skip else raw).splitlines():
            if not line:
                continue  # the blank line that ended the block
            if line[0] == _COLON:
                comments.append(_text(line[2:] if line[1:2] == b" " else line[1:]))
                continue
            fields = True
            name, _, value = line.partition(b":")
            if value[:1] == b" ":
                value = value[1:]
            if name == b"data":
                data.append(value)
            elif name == b"event":
                event = value
            elif name == b"id":
                if b"\0" not in value:
                    ident = value
            elif name == b"retry":
                if value.isdigit():  # ASCII digits only, at least one
                    retry = int(value)
        self._event = _text(event) if event else None
        self._id = None if ident is None else _text(ident)
        self._retry = retry
        self._data = data
        self._comments = comments
        self._fields = fields
        self._parsed = True

    def _single_data_line(self) -> bytes | None:
        """The value of a block that is exactly one LF-terminated `data:` line, else None (no full parse)."""
        raw = self.raw
        if self.skip or not raw.startswith(b"data:") or raw.find(b"\n") != len(raw) - 2:
            return None
        if raw[-1] != _LF or b"\r" in raw:
            return None
        return raw[6:-2] if raw[5] == 0x20 else raw[5:-2]

    def data_bytes(self) -> bytes:
        """The data lines joined with LF, undecoded; a plain `data: ...` block is sliced without parsing."""
        if not self._parsed:
            single = self._single_data_line()
            if single is not None:
                return single
            self._parse()
        return b"\n".join(self._data)

    @property
    def data(self) -> str:
        return _text(self.data_bytes())

    @property
    def event(self) -> str | None:
        if not self._parsed:
            self._parse()
        return self._event

    @property
    def id(self) -> str | None:
        if not self._parsed:
            self._parse()
        return self._id

    @property
    def retry(self) -> int | None:
        if not self._parsed:
            self._parse()
        return self._retry

    @property
    def comments(self) -> list[str]:
        if not self._parsed:
            self._parse()
        return self._comments

    @property
    def is_comment_only(self) -> bool:
        if not self._parsed:
            first = self.raw[self.skip] if self.skip < len(self.raw) else _LF
            if first not in (_COLON, _CR, _LF):
                return False  # the first line is a field line: no parse needed
            self._parse()
        return not self._fields


class SSEDecoder:
    """Splits a byte stream into SSE blocks, whatever the chunking; one instance per stream.

    Invariant: the concatenated `raw` of every returned event plus `close()` equals the input bytes (see
    `close()` for the one trailing framing byte that may be dropped at EOF).
    Comment-only blocks are returned too. Scan offsets are kept across feeds, so a long line arriving in
    many small chunks costs linear time. Streams without any CR take a `bytes.find(b"\\n\\n")` fast path.
    """

    __slots__ = ("_buf", "_scan", "_start", "_at_start", "_cr", "_skip_lf")

    def __init__(self) -> None:
        self._buf = bytearray()  # bytes of the current, unterminated block
        self._scan = 0  # where the next boundary search resumes in _buf
        self._start = 0  # where the block's lines begin in _buf (after a BOM or a CRLF's split-off LF)
        self._at_start = True  # the stream-start BOM is still undecided
        self._cr = False  # a CR was seen on this stream: use the general scanner from now on
        self._skip_lf = False  # the last block ended on a CR at a chunk edge; a leading LF completes it

    @property
    def buffered(self) -> int:
        """Bytes held while waiting for an event boundary."""
        return len(self._buf)

    def whole(self, chunk: bytes) -> bool:
        """True when `chunk` is exactly one complete LF-framed block and nothing is buffered: what `feed`
        would return as one event, with no state to update, so a pass-through relay can forward the
        bytes without building an event. False: use `feed`."""
        return (
            not self._cr
            and not self._buf
            and not self._at_start
            and type(chunk) is bytes
            and len(chunk) > 2
            and chunk[0] != _LF
            and b"\r" not in chunk
            and chunk.find(b"\n\n") == len(chunk) - 2
        )

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Add a chunk; return the blocks it completed (possibly none), in order."""
        if type(chunk) is not bytes:
            chunk = bytes(chunk)
        buf = self._buf
        if not self._cr:
            if b"\r" in chunk:
                self._cr = True
            elif not buf and not self._at_start and len(chunk) > 2 and chunk[0] != _LF:
                if chunk.find(b"\n\n") == len(chunk) - 2:
                    return [SSEEvent(chunk)]  # the common case: a chunk holding exactly one LF-framed block
        if not chunk:
            return []
        data: bytes | bytearray
        if buf:
            buf += chunk
            data = buf
        else:
            data = chunk
            if self._skip_lf:
                self._skip_lf = False
                if chunk[0] == _LF:
                    self._start = self._scan = 1
        if self._at_start:
            if data[:3] == _BOM:
                self._start = self._scan = 3
            elif len(data) < 3 and _BOM.startswith(data):
                if data is chunk:
                    buf += chunk
                return []  # could still be a BOM: wait for more bytes
            self._at_start = False
        return self._split(data)

    def _split(self, data: bytes | bytearray) -> list[SSEEvent]:
        """Cut `data` (what is buffered plus the new chunk) after every block end; keep the rest buffered.

        The loop runs once per event and the tail once per feed, so both stay inline (a method call per feed
        cost 2 % on small chunks); only the rare branch, a blank line between blocks, is a function.
        """
        events: list[SSEEvent] = []
        n = len(data)
        pos = 0  # start of the current block in data
        start, scan = self._start, self._scan
        # Slicing a bytearray through a view copies once (bytes(data[a:b]) would copy twice).
        view = memoryview(data) if type(data) is bytearray else None
        try:
            while True:
                first = data[start] if start < n else 0
                if first == _LF or first == _CR:
                    end = self._stray_blank_line(data, start)
                elif not self._cr:
                    i = data.find(b"\n\n", max(scan, start))
                    if i < 0:
                        scan = max(n - 1, start)
                        break
                    end = i + 2
                else:
                    m = _BLOCK_END.search(data, max(scan, start))
                    if m is None:
                        # Only a match starting in the last two bytes can still complete.
                        scan = max(n - 2, start)
                        break
                    end = m.end()
                    if end == n and data[end - 1] == _CR:
                        self._skip_lf = True  # the block's final CR may be half of a CRLF: see _stray_blank_line
                raw = view[pos:end].tobytes() if view is not None else bytes(data[pos:end])
                events.append(SSEEvent(raw, start - pos))
                pos = start = scan = end
        finally:
            if view is not None:
                view.release()
        # Keep the unfinished block's bytes for the next feed, and rebase the offsets onto them.
        if data is self._buf:
            if pos:
                del self._buf[:pos]
        elif pos < n:
            self._buf += data[pos:] if pos else data
        self._start, self._scan = start - pos, scan - pos
        return events

    def _stray_blank_line(self, data: bytes | bytearray, start: int) -> int:
        """The end of a blank line at the block start (a stray newline between blocks); rare, so a call."""
        end = _blank_line_end(data, start)
        if end == len(data) and data[end - 1] == _CR:
            self._skip_lf = True  # a lone CR at the chunk edge: an LF at the start of the next completes it
        return end

    def close(self) -> bytes:
        """End of stream: return the bytes of an unterminated block (b"" when the stream ended cleanly).

        Per the spec that block is not dispatched; a non-empty result tells the caller the stream was cut
        (it may hold only comment lines, e.g. a trailing heartbeat: check `SSEEvent(rest).is_comment_only`).
        Framing bytes with no line after them are dropped rather than reported as a cut event: the LF that
        completes a CRLF whose CR ended the last block at a chunk edge, or a stream that is only a BOM.
        These are the only bytes that can be missing from the concatenated `raw` values.
        """
        rest = bytes(self._buf) if self._start < len(self._buf) else b""
        self._buf.clear()
        self._scan = self._start = 0
        self._skip_lf = False
        return rest


def encode_event(data: bytes | str, event: str | None = None) -> bytes:
    """Serialise one event: an optional `event:` line, one `data:` line per line of data, then a blank line.

    SSE data cannot carry a bare CR: CR, LF and CRLF inside `data` all become line breaks, so the
    receiver gets them back as LF. A trailing newline survives (it becomes an empty last `data:` line).
    """
    body = data.encode("utf-8") if isinstance(data, str) else data
    head = b""
    if event:  # an empty name is the default type: same as no `event:` line
        if "\r" in event or "\n" in event:
            raise ValueError("an SSE event name cannot contain CR or LF")
        head = b"event: " + event.encode("utf-8") + b"\n"
    if b"\n" not in body and b"\r" not in body:
        return head + b"data: " + body + b"\n\n"
    return head + b"".join([b"data: " + line + b"\n" for line in _NEWLINES.split(body)]) + b"\n"


def encode_comment(text: str = "ping", *, end_block: bool = False) -> bytes:
    """A heartbeat: comment line(s) `: text\\n`, as a block of its own (`end_block`) or glued to the next one.

    A block of its own (`: ping\\n\\n`) is what every reader handles, hand-written ones that split the body
    on blank lines and keep the blocks starting with `data:` included; write it while no `id:` has gone to
    this reader. Glued (no blank line) once one has: the openai/anthropic SDK decoders dispatch an event on
    a blank line whenever their never-reset `_last_event_id` is set (WHATWG behaviour), so a comment-only
    block would then reach the SDK as an empty-data event and fail `json.loads`; a lone comment line joins
    the next block instead (a comment never ends a block). Either way, write it only at an event boundary.
    """
    lines = _NEWLINES.split(text.encode("utf-8"))
    comment = b"".join([b": " + line + b"\n" if line else b":\n" for line in lines])
    return comment + b"\n" if end_block else comment


def has_id_line(block: bytes) -> bool:
    """Does this run of whole SSE blocks hold an `id:` field line? (Only a line can start with `id:`: the
    data of a `data:` line cannot hold a line break.)"""
    if b"id:" not in block:
        return False  # the common case, one search
    return block.startswith((b"id:", _BOM + b"id:")) or b"\nid:" in block or b"\rid:" in block
