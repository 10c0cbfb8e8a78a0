"""The access log buffers lines (no write system call per request) yet shows each line within
FLUSH_AFTER, and flushes what is left when the app stops."""

from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.call import Call
from proxy.policy.compile import compile_plan
from proxy.policy.load import load_policy
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
