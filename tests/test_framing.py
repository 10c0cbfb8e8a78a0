"""The stream relay's pure decisions (proxy/streaming/framing.py), over plain bytes: what the client gets for
each upstream chunk, and how a stream that reached EOF ended. No sockets: the pump around them is covered by
the functional stream tests."""

from __future__ import annotations

import time

import orjson
import pytest

from proxy.call import Call
from proxy.errors import UpstreamUnreachable
from proxy.policy.plan import IdentifySpec, Plan
from proxy.providers import exchange as exchanges
from proxy.streaming.framing import Framer, complete, cut, has_usage
from proxy.streaming.sse import SSEDecoder, SSEEvent

PLAN = Plan("d", (), IdentifySpec("api_key", "x", None), {}, {}, (), {}, 1024)


def _call(*, want_usage: bool = False, strip_usage: bool = False) -> Call:
    call = Call("rid", PLAN, "POST", "/v1/chat/completions", "openai", time.perf_counter())
    call.upstream = "u"
    call.want_usage, call.strip_usage = want_usage, strip_usage
    return call


def _chunk(content: str | None = None, finish: str | None = None, usage: dict[str, int] | None = None) -> bytes:
    choices = [] if content is None and finish is None else [
        {"index": 0, "delta": {"content": content} if content else {}, "finish_reason": finish}
    ]
    body: dict[str, object] = {"id": "c", "object": "chat.completion.chunk", "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return b"data: " + orjson.dumps(body) + b"\n\n"


def _framer(call: Call, limit: int = 1 << 20, translator: exchanges.StreamTranslator | None = None) -> Framer:
    return Framer(SSEDecoder(), call, translator, limit)


def test_a_whole_pass_through_event_goes_out_as_the_same_bytes() -> None:
    call = _call()
    framer = _framer(call)
    event = _chunk("hi")
    out = framer.frame(event)
    assert out is event  # the fast path: no event built, no copy
    assert (framer.progressed, framer.done, call.events_relayed) == (True, False, 1)
    assert framer.frame(b"data: [DONE]\n\n") == b"data: [DONE]\n\n" and framer.done  # the pump stops here


def test_done_without_the_space_ends_the_stream_too() -> None:
    framer = _framer(_call())
    assert framer.frame(b"data:[DONE]\n\n") == b"data:[DONE]\n\n" and framer.done


def test_an_upstream_keep_alive_is_dropped_and_is_not_progress() -> None:
    call = _call()
    framer = _framer(call)
    assert framer.frame(b": keep-alive\n\n") is None
    assert not framer.progressed and call.events_relayed == 0


def test_an_event_split_across_reads_goes_out_whole_once_complete() -> None:
    call = _call()
    framer = _framer(call)
    event = _chunk("split")
    assert framer.frame(event[:10]) is None and not framer.progressed
    assert framer.frame(event[10:]) == event and framer.progressed
    assert call.events_relayed == 1


def test_several_events_in_one_read_go_out_in_one_write() -> None:
    call = _call()
    framer = _framer(call)
    events = _chunk("a") + b": ping\n\n" + _chunk("b")
    assert framer.frame(events) == _chunk("a") + _chunk("b")
    assert call.events_relayed == 2


def test_a_partial_event_over_the_limit_fails_the_stream() -> None:
    framer = _framer(_call(), limit=64)
    assert framer.frame(b"data: " + b"x" * 100) is None
    assert isinstance(framer.failure, UpstreamUnreachable)


def test_usage_is_noted_and_the_usage_chunk_the_proxy_asked_for_is_dropped() -> None:
    call = _call(want_usage=True, strip_usage=True)
    framer = _framer(call)
    assert framer.frame(_chunk("x")) == _chunk("x")
    assert framer.frame(_chunk(usage={"prompt_tokens": 3, "completion_tokens": 5})) is None
    assert framer.progressed  # dropped, but the upstream was not silent
    assert call.usage == {"prompt_tokens": 3, "completion_tokens": 5}


def test_usage_the_client_asked_for_is_noted_and_relayed() -> None:
    call = _call(want_usage=True)
    framer = _framer(call)
    chunk = _chunk(usage={"prompt_tokens": 1, "completion_tokens": 2})
    assert framer.frame(chunk) == chunk
    assert call.usage == {"prompt_tokens": 1, "completion_tokens": 2}


@pytest.mark.parametrize(
    ("last", "cut_rest", "incomplete"),
    [
        (_chunk("a", finish="stop"), b"", False),  # ended on its finish chunk, no [DONE] (TGI < 2.2)
        (_chunk(usage={"prompt_tokens": 1}), b"", False),  # ended on the usage chunk
        (_chunk("a"), b"", True),  # a content chunk then EOF: truncated
        (_chunk("a", finish="stop"), b"data: {\"choi", True),  # a cut event after the finish
        (_chunk("a", finish="stop"), b": ping\n", False),  # a trailing keep-alive is not a cut event
    ],
)
def test_the_end_of_a_pass_through_stream_is_judged_on_its_last_event(
    last: bytes, cut_rest: bytes, incomplete: bool
) -> None:
    call = _call()
    framer = _framer(call)
    framer.frame(last)
    if cut_rest:
        framer.frame(cut_rest)
    assert framer.end() is None
    assert (framer.failure is not None) == incomplete


def test_a_translated_stream_that_ends_before_its_end_fails_and_one_that_finished_writes_its_tail() -> None:
    exchange = exchanges.choose("/v1/chat/completions", "anthropic")
    call = _call()
    translator = exchanges.stream_translator(exchange, {}, "claude", 0)
    framer = _framer(call, translator=translator)
    start = {"type": "message_start", "message": {"id": "msg_1", "usage": {"input_tokens": 2}}}
    frame = b"event: message_start\ndata: " + orjson.dumps(start) + b"\n\n"
    assert framer.frame(frame) is not None
    assert framer.end() is None and isinstance(framer.failure, UpstreamUnreachable)

    framer = _framer(_call(), translator=exchanges.stream_translator(exchange, {}, "claude", 0))
    stop = b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"
    out = framer.frame(frame + stop)
    assert out is not None and out.endswith(b"data: [DONE]\n\n") and framer.done
    assert framer.end() is None and framer.failure is None


def test_the_helpers() -> None:
    assert has_usage(b'{"usage":{"a":1}}') and has_usage(b'{"usage": {"a":1}}') and not has_usage(b'"usage":null')
    assert cut(b"data: x") and not cut(b": ping\n") and not cut(b"\n")
    assert complete(SSEEvent(b"event: message_stop\ndata: {}\n\n")) and not complete(None)
    assert complete(SSEEvent(b'data: {"error": {"message": "x"}}\n\n'))
