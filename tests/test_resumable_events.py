"""The pure parts of resumable streams: an id stamped as the last field line of a block (whatever its line
endings, and winning over an upstream's own id), runs of blocks cut apart, the id a reader names, and the
ring's bounds and backpressure decisions."""

from __future__ import annotations

import pytest

from proxy.streaming.resume.events import parse_after, split, stamp
from proxy.streaming.resume.ring import Dropped, Meta, Ring
from proxy.streaming.sse import SSEDecoder


@pytest.mark.parametrize(
    ("block", "stamped"),
    [
        (b"data: x\n\n", b"data: x\nid: 7\n\n"),
        (b"event: a\r\ndata: x\r\n\r\n", b"event: a\r\ndata: x\r\nid: 7\r\n\r\n"),
        (b"data: x\r\r", b"data: x\rid: 7\r\r"),
        (b"id: 99\ndata: x\n\n", b"id: 99\ndata: x\nid: 7\n\n"),
    ],
)
def test_an_id_is_the_last_field_of_the_block(block: bytes, stamped: bytes) -> None:
    assert stamp(block, 7) == stamped
    events = SSEDecoder().feed(stamped)
    assert len(events) == 1 and events[0].id == "7" and events[0].data == "x"


def test_runs_of_blocks_are_cut_into_events_and_keep_alives_dropped() -> None:
    assert split(b"data: a\n\n") == [b"data: a\n\n"]
    assert split(b"data: a\n\n: ping\n\nevent: b\ndata: c\n\n") == [b"data: a\n\n", b"event: b\ndata: c\n\n"]
    assert split(b"data: a\r\n\r\ndata: b\r\n\r\n") == [b"data: a\r\n\r\n", b"data: b\r\n\r\n"]
    assert split(b": ping\n\n") == []


@pytest.mark.parametrize(
    ("value", "after"),
    [(None, None), ("", -1), (" 12 ", 12), ("0", 0), ("-1", None), ("1e3", None), ("x", None), ("9" * 17, None)],
)
def test_the_id_a_reader_names(value: str | None, after: int | None) -> None:
    assert parse_after(value) == after


def ring(budget: int) -> Ring:
    return Ring(Meta("sbs_t", "alpha", "openai", "/v1/chat/completions"), budget, 60.0)


def test_the_ring_keeps_the_newest_events_within_its_budget() -> None:
    r = ring(25)
    for seq in range(5):
        r.append(b"data: %d\nid: %d\n\n" % (seq, seq))  # 15 bytes each
    assert r.first == 4 and r.size == 15 and r.next == 5  # the newest always stays
    with pytest.raises(Dropped):
        r.take(2)
    got = r.take(3)
    assert got is not None and got.first == 4 and got.events == [b"data: 4\nid: 4\n\n"]
    assert r.take(4) is None  # nothing new yet, not ended
    r.end()
    assert r.take(4) == type(got)(5, [], True)


def test_an_attached_reader_blocks_what_it_has_not_read_from_being_dropped() -> None:
    r = ring(40)
    token = r.attach(-1)
    r.append(b"x" * 30)
    assert r.blocked(30)  # the reader still needs event 0
    r.advance(token, 0)
    assert not r.blocked(30)  # written: it may go
    r.leave(token, 0.0)
    r.append(b"y" * 30)
    assert not r.blocked(30) and r.first == 1  # nobody attached: the oldest just goes
