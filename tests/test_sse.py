"""Unit and property tests for the incremental SSE codec (proxy.streaming.sse)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai._streaming import SSEDecoder as OpenAISSEDecoder

from proxy.streaming.sse import DONE, SSEDecoder, SSEEvent, encode_comment, encode_event

# (event, data, id, retry, comments, is_comment_only)
Parsed = tuple[str | None, str, str | None, int | None, list[str], bool]


def parsed(e: SSEEvent) -> Parsed:
    return (e.event, e.data, e.id, e.retry, e.comments, e.is_comment_only)


def decode(chunks: list[bytes]) -> tuple[list[SSEEvent], bytes]:
    dec = SSEDecoder()
    events = [e for c in chunks for e in dec.feed(c)]
    return events, dec.close()


def assert_bytes_preserved(events: list[SSEEvent], rest: bytes, stream: bytes) -> None:
    joined = b"".join(e.raw for e in events) + rest
    if joined != stream:
        # The documented losses at EOF: the LF completing a CRLF whose CR ended the last block at a chunk
        # edge, or a stream that is nothing but a BOM.
        assert rest == b""
        assert (joined + b"\n" == stream and joined.endswith(b"\r")) or (joined, stream) == (
            b"",
            b"\xef\xbb\xbf",
        )


def one_byte_chunks(stream: bytes) -> list[bytes]:
    return [stream[i : i + 1] for i in range(len(stream))]


def ev(
    data: str = "",
    event: str | None = None,
    id: str | None = None,
    retry: int | None = None,
    comments: list[str] | None = None,
    comment_only: bool = False,
) -> Parsed:
    return (event, data, id, retry, comments or [], comment_only)


CASES: list[tuple[str, bytes, list[Parsed], bytes]] = [
    ("lf", b"data: a\n\ndata: b\n\n", [ev("a"), ev("b")], b""),
    ("crlf", b"data: a\r\n\r\ndata: b\r\n\r\n", [ev("a"), ev("b")], b""),
    ("cr", b"data: a\r\rdata: b\r\r", [ev("a"), ev("b")], b""),
    (
        "mixed endings",
        b"data: a\r\ndata: b\rdata: c\n\r\nevent: x\ndata: d\r\r",
        [ev("a\nb\nc"), ev("d", "x")],
        b"",
    ),
    ("multi-line data", b"data: one\ndata: two\ndata: three\n\n", [ev("one\ntwo\nthree")], b""),
    ("comment-only block", b": ping\n\n", [ev(comments=["ping"], comment_only=True)], b""),
    ("tgi bare colon", b":\n\n", [ev(comments=[""], comment_only=True)], b""),
    ("comment joins next event", b": ping\ndata: x\n\n", [ev("x", comments=["ping"])], b""),
    ("comment no space", b":keep\n\n", [ev(comments=["keep"], comment_only=True)], b""),
    ("event id retry", b"event: e\nid: 7\nretry: 1500\ndata: d\n\n", [ev("d", "e", "7", 1500)], b""),
    (
        "invalid retry",
        b"retry: 15s\ndata: d\n\nretry: -1\ndata: d\n\nretry:\ndata: d\n\n",
        [ev("d")] * 3,
        b"",
    ),
    ("retry last valid wins", b"retry: 10\nretry: x\ndata: d\n\n", [ev("d", retry=10)], b""),
    ("id with nul ignored", b"id: a\0b\ndata: d\n\n", [ev("d")], b""),
    ("id with nul keeps earlier id", b"id: 1\nid: a\0b\ndata: d\n\n", [ev("d", id="1")], b""),
    ("empty id", b"id\ndata: d\n\n", [ev("d", id="")], b""),
    ("bom stripped", b"\xef\xbb\xbfdata: a\n\n", [ev("a")], b""),
    ("bom then comment", b"\xef\xbb\xbf: c\n\n", [ev(comments=["c"], comment_only=True)], b""),
    ("bom then blank", b"\xef\xbb\xbf\ndata: a\n\n", [ev(comment_only=True), ev("a")], b""),
    ("bom only at start", b"data: a\n\n\xef\xbb\xbfdata: b\n\n", [ev("a"), ev()], b""),
    ("field without colon", b"data\n\n", [ev("")], b""),
    ("event without colon", b"event\ndata: d\n\n", [ev("d")], b""),
    ("empty event resets name", b"event: a\nevent:\ndata: d\n\n", [ev("d")], b""),
    ("no space after colon", b"data:x\nevent:y\n\n", [ev("x", "y")], b""),
    ("only one space stripped", b"data:  two\n\n", [ev(" two")], b""),
    ("colon in value", b'data: {"a": 1}\n\n', [ev('{"a": 1}')], b""),
    ("empty data line", b"data:\n\n", [ev("")], b""),
    ("empty data lines joined", b"data\ndata\n\n", [ev("\n")], b""),
    ("unknown field is not a comment", b"foo: bar\n\n", [ev()], b""),
    ("field names are case-sensitive", b"Data: x\n\n", [ev()], b""),
    (
        "stray blank lines",
        b"\n\ndata: a\n\n\n",
        [ev(comment_only=True)] * 2 + [ev("a"), ev(comment_only=True)],
        b"",
    ),
    ("unterminated final event", b"data: a\n\ndata: b\n", [ev("a")], b"data: b\n"),
    ("unterminated without newline", b"data: a\n\ndata: b", [ev("a")], b"data: b"),
    ("cr then lf is one terminator", b"data: a\r\ndata: b\r\n\r\n", [ev("a\nb")], b""),
    ("lf then cr is blank line", b"data: a\n\rdata: b\n\n", [ev("a"), ev("b")], b""),
    ("invalid utf-8 replaced", b"data: \xff\n\n", [ev("\ufffd")], b""),
    ("done", DONE, [ev("[DONE]")], b""),
]


@pytest.mark.parametrize(
    ("stream", "expected", "leftover"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_table(stream: bytes, expected: list[Parsed], leftover: bytes) -> None:
    for chunks in ([stream], one_byte_chunks(stream)):
        events, rest = decode(chunks)
        assert [parsed(e) for e in events] == expected
        assert rest == leftover
        assert_bytes_preserved(events, rest, stream)


@pytest.mark.parametrize(
    "chunks",
    [
        [b"data: a\r", b"\n\r\n"],
        [b"data: a\r\n\r", b"\n"],
        [b"data: a\r", b"\n", b"\r", b"\n"],
        [b"data: a\r\n", b"\r\n"],
    ],
)
def test_crlf_split_across_chunks_is_one_terminator(chunks: list[bytes]) -> None:
    events, rest = decode(chunks + [b"data: b\r\n\r\n"])
    assert [parsed(e) for e in events] == [ev("a"), ev("b")]
    assert rest == b""


def test_cr_blank_line_at_chunk_end_dispatches_without_waiting() -> None:
    dec = SSEDecoder()
    assert [e.data for e in dec.feed(b"data: a\r\r")] == ["a"]
    # The LF completes that CRLF: it is not a blank line, and it stays in the next raw for pass-through.
    (second,) = dec.feed(b"\ndata: b\r\r")
    assert (second.raw, second.skip, second.data, second.is_comment_only) == (b"\ndata: b\r\r", 1, "b", False)
    assert dec.feed(b"\n") == []
    assert dec.buffered == 1
    assert dec.close() == b""  # only the LF completing the CRLF is left: the stream ended cleanly


def test_bom_split_across_chunks() -> None:
    for cut in range(1, 4):
        stream = b"\xef\xbb\xbf\ndata: a\n\n"
        events, rest = decode([stream[:cut], stream[cut:]])
        assert [parsed(e) for e in events] == [ev(comment_only=True), ev("a")]
        assert events[0].raw == b"\xef\xbb\xbf\n"
        assert rest == b""


def test_buffered_and_close() -> None:
    dec = SSEDecoder()
    assert dec.feed(b"data: par") == []
    assert dec.buffered == 9
    assert [e.data for e in dec.feed(b"tial\n\ndata: n")] == ["partial"]
    assert dec.buffered == len(b"data: n")
    assert dec.close() == b"data: n"
    assert dec.buffered == 0
    assert dec.close() == b""


def test_many_events_in_one_chunk_keep_order() -> None:
    stream = b"".join(encode_event(str(i)) for i in range(500))
    events, rest = decode([stream])
    assert [e.data for e in events] == [str(i) for i in range(500)]
    assert rest == b""


@pytest.mark.parametrize(
    "raw",
    [
        b"data: x\n\n",
        b"data:x\n\n",
        b"data: \n\n",
        b"data: a\ndata: b\n\n",
        b"data: a\r\n\r\n",
        b"event: e\ndata: z\n\n",
    ],
)
def test_data_bytes_fast_path_agrees_with_parse(raw: bytes) -> None:
    fast = SSEEvent(raw).data_bytes()
    full = SSEEvent(raw)
    _ = full.event  # force the full parse first
    assert fast == full.data_bytes() == full.data.encode()


def test_is_comment_only_ignores_comments_before_fields() -> None:
    assert SSEEvent(b": a\n: b\n\n").is_comment_only
    assert not SSEEvent(b": a\nevent: x\n\n").is_comment_only
    assert not SSEEvent(b"data: a\n\n").is_comment_only


@pytest.mark.timeout(20)
@pytest.mark.parametrize("ending", [b"\n\n", b"\r\n\r\n"])
def test_long_line_in_small_chunks_is_linear(ending: bytes) -> None:
    size = 5 * 1024 * 1024
    prefix = b": crlf stream\r\n" if b"\r" in ending else b""
    stream = prefix + b"data: " + b"x" * size + ending + b"data: after" + ending
    dec = SSEDecoder()
    events: list[SSEEvent] = []
    peak = 0
    for i in range(0, len(stream), 1024):
        events += dec.feed(stream[i : i + 1024])
        peak = max(peak, dec.buffered)
    assert [len(e.data) for e in events] == [size, len("after")]
    assert events[0].data_bytes() == b"x" * size
    assert peak >= size
    assert dec.close() == b""


# ---- property tests ----------------------------------------------------------------------------------

LINE_TEXT = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\r\n"), max_size=12)
INVALID_RETRY = st.tuples(LINE_TEXT, st.sampled_from("x-. \u0663"), LINE_TEXT).map("".join)
ENDING = st.sampled_from([b"\n", b"\r", b"\r\n"])


@dataclass
class GenEvent:
    lines: list[tuple[bytes, bytes]]  # (line content, line ending)
    blank: bytes  # ending of the terminating blank line
    event: str | None = None
    data: list[str] = field(default_factory=list)
    id: str | None = None
    retry: int | None = None
    comments: list[str] = field(default_factory=list)
    has_field: bool = False

    def expected(self) -> Parsed:
        return (self.event, "\n".join(self.data), self.id, self.retry, self.comments, not self.has_field)


@st.composite
def field_line(draw: st.DrawFn, g: GenEvent) -> bytes:
    kind = draw(st.sampled_from(["data", "data", "event", "id", "retry", "comment", "unknown"]))
    value = draw(LINE_TEXT)
    if kind == "comment":
        g.comments.append(value[1:] if value.startswith(" ") else value)
        return b":" + value.encode()
    g.has_field = True
    if kind == "retry":
        if draw(st.booleans()):
            value = str(draw(st.integers(0, 10**12)))
            g.retry = int(value)
        else:  # not only ASCII digits: ignored
            value = draw(
                st.sampled_from(["", "-1", "+7", "1.5", "1e3", "15s", "\u0663", " 5"]) | INVALID_RETRY
            )
    elif kind == "id":
        if draw(st.booleans()):
            value += "\0"
        if "\0" not in value:
            g.id = value
    elif kind == "event":
        g.event = value or None  # an empty name means the default type, as if absent
    elif kind == "data":
        g.data.append(value)
    else:
        kind = draw(st.sampled_from(["foo", "Data", "datas", "ev"]))
    if value == "" and draw(st.booleans()):
        return kind.encode()  # a field with no colon has an empty value
    # Without the space a value starting with a space would lose it to the one-space strip.
    sep = ": " if value.startswith(" ") or draw(st.booleans()) else ":"
    return (kind + sep + value).encode()


@st.composite
def gen_event(draw: st.DrawFn) -> GenEvent:
    g = GenEvent(lines=[], blank=draw(ENDING))
    for _ in range(draw(st.integers(0, 5))):
        g.lines.append((draw(field_line(g)), draw(ENDING)))
    return g


def serialise(events: list[GenEvent], bom: bool, tail: list[tuple[bytes, bytes]]) -> bytes:
    out = [b"\xef\xbb\xbf"] if bom else []
    prev = b""
    lines = [line for g in events for line in [*g.lines, (b"", g.blank)]] + tail
    for content, ending in lines:
        # An LF right after a CR terminator would merge with it into one CRLF: keep lines distinct.
        if not content and prev == b"\r" and ending == b"\n":
            ending = b"\r\n"
        out += [content, ending]
        prev = ending
    return b"".join(out)


def chunked(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(stream) + 1) for c in cuts})
    return [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]


@settings(max_examples=200, deadline=None)
@given(
    events=st.lists(gen_event(), max_size=6),
    bom=st.booleans(),
    cuts=st.lists(st.integers(0, 10**6), max_size=12),
)
def test_any_chunking_decodes_the_generated_events(
    events: list[GenEvent], bom: bool, cuts: list[int]
) -> None:
    stream = serialise(events, bom, [])
    one_shot, rest1 = decode([stream])
    pieces, rest2 = decode(chunked(stream, cuts))
    assert [parsed(e) for e in pieces] == [parsed(e) for e in one_shot] == [g.expected() for g in events]
    assert rest1 == rest2 == b""
    assert_bytes_preserved(one_shot, rest1, stream)
    assert_bytes_preserved(pieces, rest2, stream)


@settings(max_examples=150, deadline=None)
@given(
    events=st.lists(gen_event(), max_size=4),
    partial=gen_event().filter(lambda g: bool(g.lines)),
    cuts=st.lists(st.integers(0, 10**6), max_size=8),
)
def test_truncated_stream_returns_the_partial_event(
    events: list[GenEvent], partial: GenEvent, cuts: list[int]
) -> None:
    full = serialise(events, False, [])
    stream = serialise(events, False, partial.lines)
    pieces, rest = decode(chunked(stream, cuts))
    assert [parsed(e) for e in pieces] == [g.expected() for g in events]
    tail = stream[len(full) :]
    # A cut between the CR and LF of the last blank line leaves that LF in front of the partial block.
    assert rest == tail or (rest == b"\n" + tail and full.endswith(b"\r\n"))
    assert b"".join(e.raw for e in pieces) + rest == stream


@settings(max_examples=150, deadline=None)
@given(events=st.lists(gen_event(), max_size=6), cuts=st.lists(st.integers(0, 10**6), max_size=8))
def test_agrees_with_openai_sdk_decoder(events: list[GenEvent], cuts: list[int]) -> None:
    # The SDK keeps the last id across events (then even a blank line dispatches) and is laxer about retry,
    # so compare names and data on id-free streams where every field block has a data line.
    events = [g for g in events if not g.id and (g.data or not g.has_field)]
    stream = serialise(events, False, [])
    sdk = [(s.event, s.data) for s in OpenAISSEDecoder().iter_bytes(iter(chunked(stream, cuts)))]
    ours = [(e.event, e.data) for e in decode(chunked(stream, cuts))[0] if not e.is_comment_only]
    assert ours == sdk


def reference_decode(stream: bytes) -> tuple[list[Parsed], bytes]:
    """A spec-literal, one-shot reader: split lines, cut blocks at blank lines, interpret each field."""
    start = 3 if stream.startswith(b"\xef\xbb\xbf") else 0
    blocks: list[Parsed] = []
    lines: list[bytes] = []
    end = 0
    for m in re.finditer(rb"([^\r\n]*)(?:\r\n|\r|\n)", stream[start:]):
        if m.group(1):
            lines.append(m.group(1))
            continue
        event, data, ident, retry, comments, fields = None, [], None, None, [], False
        for line in (x.decode("utf-8", "replace") for x in lines):
            if line.startswith(":"):
                comments.append(line[1:].removeprefix(" "))
                continue
            fields = True
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                data.append(value)
            elif name == "event":
                event = value or None
            elif name == "id" and "\0" not in value:
                ident = value
            elif name == "retry" and value and all(c in "0123456789" for c in value):
                retry = int(value)
        blocks.append((event, "\n".join(data), ident, retry, comments, not fields))
        lines = []
        end = start + m.end()
    # A BOM with nothing after it is framing, not an unterminated event.
    return blocks, stream[end:] if len(stream) > max(end, start) else b""


TOKENS = [
    b"\r",
    b"\n",
    b"\r\n",
    b"data",
    b"event",
    b"id",
    b"retry",
    b":",
    b" ",
    b"x",
    b"7",
    b"\0",
    b"\xff",
    b"\xef\xbb\xbf",
]


@settings(max_examples=300, deadline=None)
@given(
    stream=st.lists(st.sampled_from(TOKENS), max_size=40).map(b"".join),
    cuts=st.lists(st.integers(0, 10**6), max_size=10),
)
def test_arbitrary_bytes_match_reference_reader(stream: bytes, cuts: list[int]) -> None:
    expected, leftover = reference_decode(stream)
    events, rest = decode(chunked(stream, cuts))
    assert [parsed(e) for e in events] == expected
    # The chunked decode may hold the LF of a CRLF split at a chunk edge in front of the unterminated block.
    split_lf = rest == b"\n" + leftover and stream[: len(stream) - len(rest)].endswith(b"\r")
    assert rest == leftover or (leftover and split_lf)
    assert_bytes_preserved(events, rest, stream)


NEWLINE_TEXT = st.lists(
    st.one_of(st.characters(exclude_categories=["Cs"]), st.sampled_from(["\n", "\r", "\r\n"])), max_size=40
).map("".join)


@settings(max_examples=200, deadline=None)
@given(text=NEWLINE_TEXT, name=st.none() | LINE_TEXT, as_bytes=st.booleans())
def test_encode_event_round_trip(text: str, name: str | None, as_bytes: bool) -> None:
    wire = encode_event(text.encode() if as_bytes else text, name)
    (event,), rest = decode([wire])
    # SSE has no bare CR inside data: CR and CRLF come back as LF.
    assert event.data == text.replace("\r\n", "\n").replace("\r", "\n")
    assert event.event == (name or None)
    assert rest == b""
    if "\r" not in text:
        assert event.data == text


def test_encode_event_rejects_newline_in_event_name() -> None:
    with pytest.raises(ValueError):
        encode_event("x", "a\nb")


def test_encode_event_shapes() -> None:
    assert encode_event("hi") == b"data: hi\n\n"
    assert encode_event(b'{"a":1}', "message_start") == b'event: message_start\ndata: {"a":1}\n\n'
    assert encode_event("a\nb\n") == b"data: a\ndata: b\ndata: \n\n"
    assert decode([DONE])[0][0].data == "[DONE]"


@settings(max_examples=100, deadline=None)
@given(text=NEWLINE_TEXT)
def test_encode_comment_is_comment_lines_without_a_blank_line(text: str) -> None:
    wire = encode_comment(text)
    assert b"\n\n" not in wire and wire.endswith(b"\n")
    (event,), rest = decode([wire + b"\n"])
    assert event.is_comment_only
    assert "\n".join(event.comments) == text.replace("\r\n", "\n").replace("\r", "\n")


def test_heartbeat_is_safe_for_openai_sdk_after_an_id() -> None:
    # Once `id:` was seen, the SDK dispatches an event on any blank line; a `: ping\n\n` heartbeat would then
    # reach the client as an empty-data event (json.loads fails). Our heartbeat adds no blank line.
    head = b"id: 1\ndata: {}\n\n"
    tail = b"data: [DONE]\n\n"

    def sdk_data(stream: bytes) -> list[str]:
        return [s.data for s in OpenAISSEDecoder().iter_bytes(iter([stream]))]

    assert sdk_data(head + b": ping\n\n" + tail) == ["{}", "", "[DONE]"]  # the trap
    assert sdk_data(head + encode_comment() + tail) == ["{}", "[DONE]"]
    assert encode_comment() == b": ping\n"
    # In our own decoder the heartbeat joins the next block, which still carries its data.
    events, _ = decode([head + encode_comment() + tail])
    assert [(e.data, e.comments) for e in events] == [("{}", []), ("[DONE]", ["ping"])]


@pytest.mark.parametrize(
    "chunks",
    [
        [b"data: a\n\n", b"data: b\n\n", b": ping\n\n", b"data: [DONE]\n\n"],
        [b"\xef\xbb\xbfdata: a\n\n", b"data: b\n\n"],  # a BOM start: the first chunk goes through feed
        [b"data: a\r\n\r\n", b"data: b\n\n"],  # once a CR was seen, never the fast path
        [b"data: a\n", b"\ndata: b\n\n", b"data: c\n\ndata: d\n\n"],  # split and merged blocks
    ],
)
def test_whole_agrees_with_feed(chunks: list[bytes]) -> None:
    fast, slow = SSEDecoder(), SSEDecoder()
    for chunk in chunks:
        expected = slow.feed(chunk)
        if fast.whole(chunk):
            assert expected == [SSEEvent(chunk)]
        else:
            assert fast.feed(chunk) == expected
    assert fast.close() == slow.close()
