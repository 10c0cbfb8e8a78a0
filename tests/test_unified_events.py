"""The unified stream's pure parts: event framing, the queued status, the translator's mappings (without
sockets), and the Realtime session counter."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from proxy.ingress.realtime.sessions import Sessions
from proxy.policy.schema_sockets import Realtime
from proxy.providers.exchange import Exchange
from proxy.streaming.unified.events import Encoder, queued_payload
from proxy.streaming.unified.translate import UnifiedTranslator, source_of


def test_sse_and_websocket_framing_of_one_event() -> None:
    sse, ws = Encoder("sse"), Encoder("ws", 'r"1')
    assert sse.encode("text_delta", {"text": "a\nb"}) == (
        b'id: 0\nevent: text_delta\ndata: {"type":"text_delta","seq":0,"text":"a\\nb"}\n\n'
    )
    assert sse.encode("heartbeat") == b'id: 1\nevent: heartbeat\ndata: {"type":"heartbeat","seq":1}\n\n'
    line = ws.encode("text_delta", {"text": "a\nb"})
    assert line.count(b"\n") == 1
    assert orjson.loads(line) == {"type": "text_delta", "seq": 0, "id": 'r"1', "text": "a\nb"}


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ("queued position=3 eta=12s", {"position": 3, "eta_s": 12, "waiting_for": "queue"}),
        ("queued position=1", {"position": 1, "eta_s": None, "waiting_for": "queue"}),
        ("waiting for upstream capacity (token rate)", {"position": None, "eta_s": None, "waiting_for": "upstream"}),
    ],
)
def test_queued_status_becomes_fields(status: str, expected: dict[str, Any]) -> None:
    assert queued_payload(status) == {**expected, "detail": status}


def events(frames: list[bytes]) -> list[dict[str, Any]]:
    return [orjson.loads(f) for f in frames]


def test_chat_chunks_with_tool_calls_that_omit_their_index() -> None:
    tr = UnifiedTranslator(Encoder("ws", "x"), "chat")
    first = {"id": "c1", "function": {"name": "f", "arguments": "{"}}
    out = tr.feed(None, {"choices": [{"delta": {"tool_calls": [first]}}]})
    out += tr.feed(None, {"choices": [{"delta": {"tool_calls": [{"function": {"arguments": "}"}}]}}]})
    out += tr.feed(None, {"choices": [{"delta": {}, "finish_reason": "tool_calls"}]})
    assert tr.eof() != [] and tr.finished  # a server without [DONE] that sent its finish chunk ended cleanly
    got = events(out)
    assert [(e["index"], e["call_id"], e["name"], e["arguments_delta"]) for e in got if e["type"] == "tool_call"] == [
        (0, "c1", "f", "{"), (0, "c1", "f", "}")]


def test_an_error_chunk_ends_with_error_then_complete() -> None:
    tr = UnifiedTranslator(Encoder("ws", "x"), "chat")
    got = events(tr.feed(None, {"error": {"message": "overloaded", "type": "server_error"}}))
    assert [e["type"] for e in got] == ["error", "stream_complete"] and got[1]["finish_reason"] == "error"
    assert got[0]["error"]["message"] == "overloaded" and tr.finished and tr.feed(None, {"choices": []}) == []


def test_a_responses_stream_cut_by_max_output_tokens_ends_with_length() -> None:
    tr = UnifiedTranslator(Encoder("ws", "x"), "responses")
    tr.feed("response.output_text.delta", {"type": "response.output_text.delta", "delta": "hi"})
    final = {"status": "incomplete", "incomplete_details": {"reason": "max_output_tokens"},
             "usage": {"input_tokens": 3, "output_tokens": 1, "total_tokens": 4}}
    got = events(tr.feed("response.incomplete", {"type": "response.incomplete", "response": final}))
    assert got == [{"type": "usage", "seq": 1, "id": "x", "input_tokens": 3, "output_tokens": 1, "total_tokens": 4},
                   {"type": "stream_complete", "seq": 2, "id": "x", "finish_reason": "length"}]


@pytest.mark.parametrize(
    ("kind", "front", "provider", "path", "source"),
    [
        ("pass", "openai", "openai", "/v1/chat/completions", "chat"),
        ("pass", "openai", "mock", "/v1/responses", "responses"),
        ("pass", "anthropic", "mock", "/v1/messages", "anthropic"),
        ("openai_to_anthropic", "openai", "anthropic", "/v1/chat/completions", "anthropic"),
        ("anthropic_to_openai", "anthropic", "openai", "/v1/messages", "chat"),
    ],
)
def test_the_upstream_format_decides_the_mapping(kind: Any, front: Any, provider: str, path: str, source: str) -> None:
    assert source_of(Exchange(kind, "/x", front, provider), path) == source


def test_realtime_sessions_per_proxy_and_per_tenant() -> None:
    sessions, limits = Sessions(), Realtime(max_sessions=2, max_sessions_per_tenant=1)
    assert sessions.refusal("a", limits) is None
    assert "max_sessions_per_tenant" in (sessions.refusal("a", limits) or "")
    assert sessions.refusal("b", limits) is None
    assert "realtime.max_sessions)" in (sessions.refusal("c", limits) or "")
    sessions.give("a")
    assert sessions.refusal("c", limits) is None and sessions.by_tenant == {"b": 1, "c": 1}
