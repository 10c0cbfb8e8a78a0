"""How SSEDecoder cuts a byte stream into blocks, pinned exactly (raw bytes and framing offset of every block),
at every chunk edge: the pure `_blank_line_end`, and the decoder's split loop and buffering around it.

Chunking must be invisible: whatever two-chunk split of a stream is fed, the blocks (raw, skip) are the ones
the whole stream gives, except where a chunk edge falls right after a CR (that CR may be half of a CRLF the
decoder cannot see yet, so it ends the block and the LF becomes the next block's framing byte).
"""

from __future__ import annotations

import pytest

from proxy.streaming.sse import SSEDecoder, _blank_line_end

BOM = b"\xef\xbb\xbf"

STREAMS: list[tuple[str, bytes]] = [
    ("lf", b"data: a\n\ndata: bb\n\n"),
    ("crlf", b"data: a\r\n\r\ndata: bb\r\n\r\n"),
    ("cr", b"data: a\r\rdata: bb\r\r"),
    ("cr lf crlf mixed", b"data: a\r\ndata: b\rdata: c\n\r\nevent: x\ndata: d\r\r: c\n\n"),
    ("comment lines", b": ping\n\n: keep\ndata: x\n\n:\n\n"),
    ("field without a colon", b"data\n\nevent\ndata: d\n\n"),
    ("bom at start", BOM + b"data: a\n\ndata: b\n\n"),
    ("bom then crlf blank line", BOM + b"\r\ndata: a\r\n\r\n"),
    ("stray lf blank lines", b"\n\ndata: a\n\n\n"),
    ("stray crlf blank lines", b"\r\n\r\ndata: a\r\n\r\n\r\n\ndata: b\n\n"),
    ("stray cr blank lines", b"\r\rdata: a\r\r\r\ndata: b\r\n\r\n"),
    ("openai chunk", b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\ndata: [DONE]\n\n'),
    ("unterminated tail", b"data: a\r\n\r\ndata: b\r\n"),
]


def blocks(chunks: list[bytes]) -> tuple[list[tuple[bytes, int]], bytes, list[int]]:
    """(raw, skip) of every block, what close() gives back, and `buffered` after each feed."""
    dec = SSEDecoder()
    out: list[tuple[bytes, int]] = []
    held: list[int] = []
    for chunk in chunks:
        out += [(e.raw, e.skip) for e in dec.feed(chunk)]
        held.append(dec.buffered)
    return out, dec.close(), held


@pytest.mark.parametrize("stream", [s for _, s in STREAMS], ids=[n for n, _ in STREAMS])
def test_every_two_chunk_split_gives_the_blocks_of_the_whole_stream(stream: bytes) -> None:
    whole, rest, _ = blocks([stream])
    assert b"".join(raw for raw, _ in whole) + rest == stream
    for k in range(1, len(stream)):
        got, got_rest, held = blocks([stream[:k], stream[k:]])
        if stream[k - 1] == 0x0D:  # a CR at the edge: the LF after it may move to the next block's framing
            assert b"".join(raw for raw, _ in got) + got_rest in (stream, stream[:-1]), k
            assert content(got) == content(whole), k
            continue
        assert (got, got_rest) == (whole, rest), k
        # What is held after the first chunk is exactly the part of it that no block ended in.
        consumed = 0
        for raw, _ in whole:
            if consumed + len(raw) > k:
                break
            consumed += len(raw)
        assert held[0] == k - consumed, k


def content(found: list[tuple[bytes, int]]) -> list[bytes]:
    """The blocks that hold a line, without their framing byte and final line terminators."""
    lines = [raw[skip:].rstrip(b"\r\n") for raw, skip in found]
    return [line for line in lines if line]


@pytest.mark.parametrize("stream", [s for _, s in STREAMS], ids=[n for n, _ in STREAMS])
def test_three_chunk_splits_around_every_byte(stream: bytes) -> None:
    """A block cut into three pieces (one byte in the middle) still comes out whole and once."""
    whole, rest, _ = blocks([stream])
    for k in range(1, len(stream) - 1):
        if 0x0D in stream[k - 1 : k + 1]:
            continue  # CR at an edge: covered by the two-chunk test
        assert blocks([stream[:k], stream[k : k + 1], stream[k + 1 :]])[:2] == (whole, rest), k


def test_exact_blocks_of_a_mixed_stream() -> None:
    stream = BOM + b": hi\r\n\r\n\r\ndata: a\rdata: b\n\n\ndata\r\r"
    got, rest, _ = blocks([stream])
    assert got == [
        (BOM + b": hi\r\n\r\n", 3),
        (b"\r\n", 0),  # a stray CRLF blank line is one block, not two
        (b"data: a\rdata: b\n\n", 0),
        (b"\n", 0),
        (b"data\r\r", 0),
    ]
    assert rest == b""


def test_a_crlf_blank_line_ending_a_chunk_does_not_swallow_the_next_lf() -> None:
    # The stray "\r\n" ends chunk one: it is complete, so the LF that starts chunk two is a blank line of its
    # own, not the second half of a CRLF.
    got, rest, _ = blocks([b"data: a\r\n\r\n\r\n", b"\ndata: b\n\n"])
    assert got == [(b"data: a\r\n\r\n", 0), (b"\r\n", 0), (b"\n", 0), (b"data: b\n\n", 0)]
    assert rest == b""


def test_a_lone_cr_ending_a_chunk_takes_the_next_lf_as_framing() -> None:
    got, rest, _ = blocks([b"data: a\r\n\r", b"\ndata: b\r\n\r\n"])
    assert got == [(b"data: a\r\n\r", 0), (b"\ndata: b\r\n\r\n", 1)]
    got, rest, _ = blocks([b"data: a\r\n\r\n\r", b"\ndata: b\n\n"])  # the same for a stray blank CR
    assert got == [(b"data: a\r\n\r\n", 0), (b"\r", 0), (b"\ndata: b\n\n", 1)]
    got, rest, _ = blocks([b"data: a\r\r", b"data: b\r\r"])  # no LF follows: nothing is skipped
    assert got == [(b"data: a\r\r", 0), (b"data: b\r\r", 0)]
    # A lone LF after such a CR waits for what follows it, and close() drops it (a framing byte, no line).
    assert blocks([b"data: a\n\n\r", b"\n"]) == ([(b"data: a\n\n", 0), (b"\r", 0)], b"", [0, 1])


def test_buffered_bytes_are_rebased_across_feeds() -> None:
    dec = SSEDecoder()
    assert [e.raw for e in dec.feed(b"data: a\n\ndata: b")] == [b"data: a\n\n"]
    assert dec.buffered == len(b"data: b")
    assert dec.feed(b"\n") == [] and dec.buffered == len(b"data: b\n")
    assert [(e.raw, e.skip) for e in dec.feed(b"\ndata: c\n\nda")] == [(b"data: b\n\n", 0), (b"data: c\n\n", 0)]
    assert dec.buffered == 2
    assert dec.close() == b"da"


@pytest.mark.parametrize(
    ("data", "start", "end"),
    [
        (b"\n", 0, 1),
        (b"\r", 0, 1),  # a CR at the end of what is there: one byte (the decoder decides about a later LF)
        (b"\r\n", 0, 2),
        (b"\r\r", 0, 1),
        (b"\n\r", 0, 1),
        (b"\n\n", 0, 1),
        (b"x\r\ny", 1, 3),
        (b"x\r", 1, 2),
        (b"x\rdata", 1, 2),
    ],
)
def test_blank_line_end(data: bytes, start: int, end: int) -> None:
    assert _blank_line_end(data, start) == end
    assert _blank_line_end(bytearray(data), start) == end  # the decoder's buffer is a bytearray
