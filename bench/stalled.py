"""Stalled clients: what 1,000 streams whose clients stopped reading cost the proxy, and whether it still
serves others meanwhile.

The upstream (this file with --serve-upstream, its own process) streams 8 KiB events as fast as each
socket takes them and counts the bytes it got out. The proxy (`signalbox serve`, its own process) has one
route to it with `stream.slow_client` (default 10 s, so that a whole wave is stalled at once) and one to
its built-in mock (the idle upstream the probe requests go to). The clients are raw sockets with a 4 KiB
receive buffer that read the response headers and then nothing. Per wave: RSS before, peak (sampled every
50 ms) and per stalled stream ((peak - before) / streams); every 0.2 s meanwhile a probe request to the
idle route (its latency, max and p99). After the waves: RSS once the streams are gone (the proxy's own
request count at 0) and 5 s of quiet.
Run: .venv/bin/python bench/stalled.py [--streams 1000] [--waves 2] [--slow-client 10] [--json]
(about a minute; Linux; everything on 127.0.0.1; every process it starts is stopped by PID)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp
import uvloop
from aiohttp import web
from common import REPO, free_port, percentile, signalbox, stop, tail, vm_kib, wait_port

API_KEY = "sk-bench"
RCVBUF = 4096
STREAM_BODY = b'{"model":"bench-stalled","messages":[{"role":"user","content":"x"}],"stream":true}'
PROBE_BODY = b'{"model":"bench-probe","messages":[{"role":"user","content":"hi"}]}'


# ---- the upstream (its own process) -----------------------------------------------------------------


def build_upstream(event_bytes: int) -> web.Application:
    """Streams one `data:` event of event_bytes after another until the proxy goes; counts bytes sent."""
    event = b'data: {"choices":[{"index":0,"delta":{"content":"' + b"x" * (event_bytes - 60) + b'"}}]}\n\n'
    sent = {"bytes": 0, "streams": 0}

    async def chat(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        sent["streams"] += 1
        with contextlib.suppress(ConnectionError, aiohttp.ClientError):
            for _ in range(1_000_000):  # bounded: 8 GB at most, the slow-client limit ends it long before
                await resp.write(event)
                sent["bytes"] += len(event)
        return resp

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(sent)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/stats", stats)
    return app


# ---- the clients (this process) ----------------------------------------------------------------------


@dataclass
class Wave:
    streams: int = 0
    failed: int = 0
    rss_before_kib: int = 0
    rss_peak_kib: int = 0
    probe_ms: list[float] = field(default_factory=list)
    probe_errors: int = 0

    @property
    def kib_per_stream(self) -> float:
        return (self.rss_peak_kib - self.rss_before_kib) / max(self.streams, 1)


async def stall_one(port: int, opened: list[socket.socket]) -> bool:
    """Open a stream, read its response head, then read nothing more; the socket stays in `opened`."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)  # before connect: sets the TCP window
    sock.setblocking(False)
    opened.append(sock)
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(STREAM_BODY)}\r\n\r\n"
    ).encode() + STREAM_BODY
    try:
        async with asyncio.timeout(20):
            await loop.sock_connect(sock, ("127.0.0.1", port))
            await loop.sock_sendall(sock, request)
            head = b""
            while b"\r\n\r\n" not in head:
                data = await loop.sock_recv(sock, 256)
                if not data:
                    return False
                head += data
    except (OSError, TimeoutError):
        return False
    return head.startswith(b"HTTP/1.1 200")


async def probe_loop(url: str, stop_at: asyncio.Event, wave: Wave) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        while not stop_at.is_set():
            started = time.perf_counter()
            try:
                async with session.post(url, data=PROBE_BODY, headers=headers) as resp:
                    await resp.read()
                    ok = resp.status == 200
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            if ok:
                wave.probe_ms.append((time.perf_counter() - started) * 1000)
            else:
                wave.probe_errors += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop_at.wait(), 0.2)


async def sample_peak(pid: int, stop_at: asyncio.Event, wave: Wave) -> None:
    while not stop_at.is_set():
        wave.rss_peak_kib = max(wave.rss_peak_kib, vm_kib(pid, "VmRSS"))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop_at.wait(), 0.05)


async def run_wave(port: int, pid: int, streams: int, slow_client: float) -> Wave:
    """All streams opened at once (200 connecting at a time), held past the slow-client limit, then closed."""
    wave = Wave(rss_before_kib=vm_kib(pid, "VmRSS"))
    done = asyncio.Event()
    opened: list[socket.socket] = []
    gate = asyncio.Semaphore(200)

    async def one() -> bool:
        async with gate:
            return await stall_one(port, opened)

    async def stalls() -> None:
        try:
            results = await asyncio.gather(*(one() for _ in range(streams)))
            wave.streams, wave.failed = sum(results), streams - sum(results)
            await asyncio.sleep(slow_client + 2)  # every stream reaches the limit and is ended by the proxy
        finally:
            done.set()
            for sock in opened:
                sock.close()

    async with asyncio.TaskGroup() as group:
        group.create_task(probe_loop(f"http://127.0.0.1:{port}/v1/chat/completions", done, wave))
        group.create_task(sample_peak(pid, done, wave))
        group.create_task(stalls())
    return wave


async def open_streams(admin: str) -> float:
    """The proxy's streams still being relayed (signalbox_streams_active, or in-flight requests)."""
    async with aiohttp.ClientSession() as session, session.get(admin + "/metrics") as resp:
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith("signalbox_in_flight_requests"):
            return float(line.split()[-1])
    return 0.0


async def measure(args: argparse.Namespace, port: int, admin_port: int, pid: int) -> dict[str, object]:
    admin = f"http://127.0.0.1:{admin_port}"
    warm = Wave()
    await probe_loop_once(port, warm)  # imports, pools and caches in place before the baseline
    await run_wave(port, pid, 20, args.slow_client)
    await asyncio.sleep(1)
    baseline = vm_kib(pid, "VmRSS")
    waves = [await run_wave(port, pid, args.streams, args.slow_client) for _ in range(args.waves)]
    for _ in range(100):  # bounded: 10 s for the proxy to see the last streams end
        if await open_streams(admin) <= 0:
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(5)  # the proxy trims its heap 2 s after a burst of streams ended
    after = vm_kib(pid, "VmRSS")
    probes = [ms for w in waves for ms in w.probe_ms]
    return {
        "streams": args.streams,
        "event_bytes": args.event_bytes,
        "slow_client_s": args.slow_client,
        "rss_baseline_mib": round(baseline / 1024, 1),
        "waves": [
            {**{k: v for k, v in asdict(w).items() if k != "probe_ms"}, "kib_per_stream": round(w.kib_per_stream, 1),
             "probe_max_ms": round(max(w.probe_ms, default=float("nan")), 1), "probes": len(w.probe_ms)}
            for w in waves
        ],
        "rss_peak_mib": round(max(w.rss_peak_kib for w in waves) / 1024, 1),
        "rss_after_mib": round(after / 1024, 1),
        "rss_after_minus_baseline_mib": round((after - baseline) / 1024, 1),
        "probe_p50_ms": round(percentile(probes, 50), 1),
        "probe_p99_ms": round(percentile(probes, 99), 1),
        "probe_max_ms": round(max(probes, default=float("nan")), 1),
        "probe_errors": sum(w.probe_errors for w in waves),
    }


async def probe_loop_once(port: int, wave: Wave) -> None:
    stop_at = asyncio.Event()
    stop_at.set()
    await probe_loop(f"http://127.0.0.1:{port}/v1/chat/completions", stop_at, wave)


# ---- orchestration -----------------------------------------------------------------------------------


def write_policy(directory: Path, upstream_port: int, slow_client: float) -> Path:
    path = directory / "stalled.yaml"
    path.write_text(f"""\
upstreams:
  fast: {{provider: openai, base_url: "http://127.0.0.1:{upstream_port}/v1", api_key: unused}}
  idle: {{provider: mock}}
tenants:
  bench: {{keys: ["{API_KEY}"]}}
routes:
  - {{name: stalled, match: {{model: bench-stalled}}, upstream: fast, stream: {{slow_client: {slow_client:g}s}}}}
  - {{name: probe, match: {{model: bench-probe}}, upstream: idle}}
""")
    return path


@contextmanager
def running(name: str, cmd: list[str], port: int, tmp: Path) -> Iterator[int]:
    log = tmp / f"{name}.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO,
                                start_new_session=True)
    try:
        try:
            wait_port(port, proc)
        except RuntimeError as exc:
            raise RuntimeError(f"{name} did not start: {exc}\n--- {log} ---\n{tail(log)}") from exc
        yield proc.pid
    finally:
        stop(proc, grace_s=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--waves", type=int, default=2)
    parser.add_argument("--slow-client", type=float, default=10.0, help="the route's stream.slow_client, s")
    parser.add_argument("--event-bytes", type=int, default=8192)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--serve-upstream", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_upstream:
        web.run_app(build_upstream(args.event_bytes), host="127.0.0.1", port=args.serve_upstream, access_log=None,
                    print=None, backlog=2048, loop=uvloop.new_event_loop())
        return
    ports = {name: free_port() for name in ("upstream", "proxy", "admin")}
    with tempfile.TemporaryDirectory(prefix="signalbox-stalled-") as tmpdir, ExitStack() as stack:
        tmp = Path(tmpdir)
        upstream_cmd = [sys.executable, __file__, "--serve-upstream", str(ports["upstream"]),
                        "--event-bytes", str(args.event_bytes)]
        stack.enter_context(running("upstream", upstream_cmd, ports["upstream"], tmp))
        policy = write_policy(tmp, ports["upstream"], args.slow_client)
        proxy_cmd = [*signalbox(), "serve", "--policies", str(policy), "--port", str(ports["proxy"]),
                     "--admin-port", str(ports["admin"]), "--shutdown-grace", "0", "--no-access-log",
                     "--admin-no-auth"]
        pid = stack.enter_context(running("proxy", proxy_cmd, ports["proxy"], tmp))
        result = uvloop.run(measure(args, ports["proxy"], ports["admin"], pid))
        with urllib_stats(ports["upstream"]) as upstream:
            result["upstream_bytes_sent_mib"] = round(upstream["bytes"] / 2**20, 1)
            result["upstream_streams"] = upstream["streams"]
    if args.json:
        print(json.dumps(result))
        return
    for i, wave in enumerate(result["waves"], 1):  # type: ignore[arg-type]
        print(f"wave {i}: {wave['streams']} stalled ({wave['failed']} failed), RSS {wave['rss_before_kib'] / 1024:.0f} "
              f"-> peak {wave['rss_peak_kib'] / 1024:.0f} MiB, {wave['kib_per_stream']:.1f} KiB per stalled stream, "
              f"probe max {wave['probe_max_ms']:.0f} ms over {wave['probes']} probes")
    print(f"RSS baseline {result['rss_baseline_mib']} MiB, peak {result['rss_peak_mib']} MiB, after "
          f"{result['rss_after_mib']} MiB ({result['rss_after_minus_baseline_mib']:+} MiB)")
    print(f"probe latency p50 {result['probe_p50_ms']} ms, p99 {result['probe_p99_ms']} ms, max "
          f"{result['probe_max_ms']} ms, {result['probe_errors']} failed")
    print(f"upstream: {result['upstream_streams']} streams, {result['upstream_bytes_sent_mib']} MiB sent")


@contextmanager
def urllib_stats(port: int) -> Iterator[dict[str, int]]:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=10) as resp:
        yield json.loads(resp.read())


if __name__ == "__main__":
    main()
