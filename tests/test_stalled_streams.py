"""Clients that open a stream and stop reading: what each one costs the proxy while its stream waits for
the slow-client limit, and that the upstream is held back by TCP instead of being read into memory.

The upstream floods (8 KiB events as fast as the socket takes them) from its own process, so that the
memory traced here is the proxy's (and the few bytes of the raw-socket clients)."""

from __future__ import annotations

import asyncio
import gc
import socket
import sys
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import Proxy
from stream_helpers import wait_for

pytestmark = pytest.mark.timeout(90)

StartProxy = Callable[..., Awaitable[Proxy]]
STREAMS = 50
BUDGET = 64 * 1024
"""What one stalled stream may hold in the proxy, every buffer and copy included."""
DATA_BUDGET = 32 * 1024
"""Of which stream data (blocks of 1 KiB or more: reads, events, queued writes and any copy of them): one
socket read (the stream socket's SO_RCVBUF), the reader's 8 KiB, the client's 4 KiB write buffer and the
event being written. Before, the reader held up to 32 KiB and every write was a joined copy (41.5 KiB)."""


@pytest.fixture
async def flood() -> AsyncIterator[str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(Path(__file__).with_name("flood_upstream.py")),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        port = int(await asyncio.wait_for(proc.stdout.readline(), 20))
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stdin.close()  # the server exits when its stdin closes
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except TimeoutError:
            proc.kill()  # by PID: only the process this fixture started
            await proc.wait()


async def flood_stats(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(url + "/stats") as resp:
        stats: dict[str, Any] = await resp.json()
        return stats


async def stall(url: str) -> socket.socket:
    """Open a stream with a 4 KiB receive buffer, read the response head, then never read again."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    body = b'{"model":"m","messages":[{"role":"user","content":"x"}],"stream":true}'
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer sk-alpha\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    try:
        await loop.sock_connect(sock, (host, int(port)))
        await loop.sock_sendall(sock, request)
        head = b""
        async with asyncio.timeout(10):
            while b"\r\n\r\n" not in head:
                head += await loop.sock_recv(sock, 64)  # a byte at a time would do; the head is small
    except BaseException:
        sock.close()
        raise
    assert head.startswith(b"HTTP/1.1 200"), head
    return sock


async def settled(url: str) -> dict[str, Any]:
    """Wait until every stream's upstream write is blocked and the upstream's byte count stops moving."""
    stats: dict[str, Any] = {}

    async def probe() -> bool:
        nonlocal stats
        before = await flood_stats(url)
        await asyncio.sleep(0.5)
        stats = await flood_stats(url)
        return stats["blocked"] == STREAMS and stats["bytes"] == before["bytes"]

    for _ in range(40):  # bounded: 20 s
        if await probe():
            return stats
    raise AssertionError(f"the upstream never settled: {stats}")


async def test_a_stalled_stream_costs_at_most_64_kib_and_the_upstream_waits(
    start_proxy: StartProxy, flood: str
) -> None:
    policy = f"""
    upstreams:
      flood: {{provider: openai, base_url: "{flood}/v1", api_key: "${{TEST_UPSTREAM_KEY}}"}}
    tenants:
      alpha: {{keys: [sk-alpha]}}
    routes:
      - {{name: all, upstream: flood}}
    """
    proxy = await start_proxy(policy)  # slow-client limit: the default 60 s, far beyond this test
    clients = [await stall(proxy.url)]  # one stream first: imports and pools in place before the baseline
    gc.collect()
    tracemalloc.start(8)
    try:
        before = tracemalloc.get_traced_memory()[0]
        while len(clients) < STREAMS:  # a few at a time: tracing slows the proxy several-fold
            clients += await asyncio.gather(*(stall(proxy.url) for _ in range(min(9, STREAMS - len(clients)))))
        stats = await settled(flood)
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
        snapshot = tracemalloc.take_snapshot()
        top = snapshot.statistics("lineno")[:8]
        data = sum(t.size for t in snapshot.traces if t.size >= 1024)
    finally:
        tracemalloc.stop()
        for sock in clients:
            sock.close()
    per_stream = held / (STREAMS - 1)
    # The upstream sees its writes block on every stream, and what it got out is the kernel's buffers
    # (its send buffer, the proxy's receive buffer): it is not being read into the proxy's memory.
    assert stats["blocked"] == STREAMS
    assert proxy.state.in_flight == STREAMS
    assert per_stream <= BUDGET, f"{per_stream / 1024:.0f} KiB per stalled stream; top: " + "\n".join(map(str, top))
    assert data / STREAMS <= DATA_BUDGET, f"{data / STREAMS / 1024:.0f} KiB of stream data per stalled stream"
    await wait_for(lambda: proxy.state.in_flight == 0, 10.0)  # closing the clients ended their streams
