"""The access log buffers lines (no write system call per request) yet shows each line within
FLUSH_AFTER, and flushes what is left when the app stops."""

from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.call import Attempt, Call
from proxy.policy.compile import compile_plan
from proxy.policy.load import load_policy
from proxy.telemetry import logging as access_logging
from proxy.telemetry.logging import FLUSH_AFTER, AccessLog


class CountingRaw(io.RawIOBase):
    """A raw sink that counts the write calls that reach it (what would be system calls)."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.writes = 0

    def writable(self) -> bool:
        return True

    def write(self, b: bytes) -> int:  # type: ignore[override]
        self.writes += 1
        self.data += b
        return len(b)


def a_call(plan_dir: str, n: int) -> Call:
    plan = compile_plan(load_policy(plan_dir))
    return Call(request_id=f"req-{n}", plan=plan, method="POST", path="/v1/chat/completions",
                protocol="openai", started=time.perf_counter())


async def test_lines_are_batched_and_flushed_within_the_bound(tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text("upstreams: {m: {provider: mock}}\nroutes: [{name: r, upstream: m}]\n")
    raw = CountingRaw()
    log = AccessLog(stream=io.BufferedWriter(raw, buffer_size=64 * 1024))
    for n in range(50):
        log.write(a_call(str(policy), n))
    assert raw.writes == 0  # 50 requests, no write yet
    await asyncio.sleep(FLUSH_AFTER + 0.1)
    assert raw.writes == 1
    lines = [orjson.loads(line) for line in bytes(raw.data).splitlines()]
    assert [line["request_id"] for line in lines] == [f"req-{n}" for n in range(50)]
    log.write(a_call(str(policy), 50))
    log.flush()  # what the app's cleanup does at shutdown
    assert raw.writes == 2 and bytes(raw.data).endswith(b'"client_gone":null}\n')


@settings(max_examples=3000, deadline=None)
@given(st.floats(min_value=0, max_value=2**33, allow_nan=False, allow_infinity=False)
       | st.integers(min_value=0, max_value=2**42).map(lambda ms: ms / 1000 + 0.0005))
def test_ts_is_what_round_gives(wall: float) -> None:
    """The line's `ts` (seconds to 3 decimals) is exactly round(started_wall, 3), ties included."""
    stream = io.BytesIO()
    log = AccessLog(stream)
    call = Call(request_id="r", plan=None, method="GET", path="/", protocol="openai",  # type: ignore[arg-type]
                started=time.perf_counter())
    call.started_wall = wall
    log.write(call)
    log.flush()
    assert orjson.loads(stream.getvalue())["ts"] == round(wall, 3)


# --- the line against the encoding it had before the attempts were mapped in C (issue 13) ----------------------


def _ms2_then(seconds: float) -> float:
    return int(seconds * 100_000 + 0.5) / 100


def line_then(call: Call, elapsed: float) -> bytes:
    """The access line as the encoder of 2026-12-02 built it (one helper per attempt, through `_attempts`)."""
    def attempt(a: Attempt) -> dict[str, object]:
        entry: dict[str, object] = {"deployment": a.upstream, "status": a.status, "ms": _ms2_then(a.duration),
                                    "error": a.error}
        if a.wait is not None:
            entry |= {"wait_ms": _ms2_then(a.wait[0]), "after": a.wait[1]}
        return entry

    marks = call.marks
    ttfb, dispatched, first = marks.get("upstream_headers"), marks.get("dispatch"), marks.get("first_token")
    line = {
        "ts": round(call.started_wall, 3), "request_id": call.request_id, "trace_id": call.trace_id,
        "method": call.method, "path": call.path, "tenant": call.tenant.name if call.tenant is not None else None,
        "route": call.route.name if call.route is not None else None, "model": call.model or None,
        "upstream": call.upstream or None, "stream": call.stream, "status": call.status, "outcome": call.outcome,
        "reason": call.reason, "duration_ms": _ms2_then(elapsed),
        "ttfb_ms": _ms2_then(ttfb) if ttfb is not None else None,
        "queue_wait_ms": round(call.queue_wait * 1000, 1) if call.queue_wait else None,
        "processing_ms": _ms2_then(elapsed - dispatched) if dispatched is not None else None,
        "ttft_ms": _ms2_then(first - dispatched) if first is not None and dispatched is not None else None,
        "attempts": [attempt(a) for a in call.attempts], "events": call.events_relayed or None,
        "bytes": call.bytes_out, "error": call.error, "client_gone": call.client_gone or None,
    }
    return orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE)


# Durations in seconds: the usual range, 0, values at a rounding tie (x.xxxx5 ms) and far beyond any request.
_ms = (st.floats(min_value=0, max_value=600, allow_nan=False) | st.just(0.0)
       | st.integers(0, 10**9).map(lambda n: n / 100_000 + 0.000_005) | st.floats(min_value=600, max_value=1e12))
_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)  # unicode, quotes, control chars
_attempt = st.builds(
    Attempt, upstream=st.sampled_from(["up-0", "up-1"]) | _text, status=st.sampled_from([0, 200, 503]),
    duration=_ms, error=st.sampled_from([None, "upstream_timeout"]) | _text,
    wait=st.none() | st.tuples(_ms, st.sampled_from(["exponential", "hint"])),
)


@settings(max_examples=300, deadline=None)
@given(attempts=st.lists(_attempt, max_size=3), elapsed=_ms, queue_wait=_ms | st.just(0.0),
       marks=st.dictionaries(st.sampled_from(["dispatch", "upstream_headers", "first_token"]), _ms),
       status=st.sampled_from([0, 200, 429, 499]), gone=st.booleans(), events=st.integers(0, 9),
       texts=st.tuples(_text, _text, _text, _text, st.none() | _text, st.none() | _text, st.none() | _text))
def test_the_line_is_byte_for_byte_what_it_was(attempts: list[Attempt], elapsed: float, queue_wait: float,
                                                marks: dict[str, float], status: int, gone: bool,
                                                events: int, texts: tuple[str | None, ...]) -> None:
    request_id, path, model, upstream, error, reason, trace_id = texts
    call = Call(request_id=request_id, plan=None, method="POST", path=path,  # type: ignore[arg-type]
                protocol="openai", started=1000.0)
    call.attempts, call.marks, call.queue_wait, call.status = attempts, marks, queue_wait, status
    call.client_gone, call.events_relayed, call.upstream, call.model = gone, events, upstream, model  # type: ignore[assignment]
    call.error, call.reason, call.trace_id = error, reason, trace_id
    stream = io.BytesIO()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(access_logging, "perf_counter", lambda: 1000.0 + elapsed)
        AccessLog(stream).write(call)
    assert stream.getvalue() == line_then(call, (1000.0 + elapsed) - 1000.0)


@settings(max_examples=3000, deadline=None)
@given(st.floats(min_value=0, max_value=2**60, allow_nan=False) | st.just(0.0)
       | st.integers(0, 2**40).map(lambda n: n / 100_000 + 0.000_005))
def test_a_duration_rounds_as_with_int(seconds: float) -> None:
    """The access line's inlined rounding of a non-negative duration (`// 1`) is _ms2's int() one, in the
    line: the attempt's `ms` and `duration_ms` (the elapsed time), ties and huge values included."""
    call = Call(request_id="r", plan=None, method="GET", path="/", protocol="openai",  # type: ignore[arg-type]
                started=0.0)
    call.attempts = [Attempt("up", 200, seconds)]
    stream = io.BytesIO()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(access_logging, "perf_counter", lambda: seconds)
        AccessLog(stream).write(call)
    line = orjson.loads(stream.getvalue())
    assert line["duration_ms"] == line["attempts"][0]["ms"] == int(seconds * 100_000 + 0.5) / 100
