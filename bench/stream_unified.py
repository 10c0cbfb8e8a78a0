"""Unified-stream benchmark: proxy CPU per event of the unified stream, over SSE and over a multiplexing
WebSocket, beside the plain SSE relay (pass-through chat completions), in the same run against the same mock.

The mock (`signalbox mock`, its own process) streams --tokens chat chunks per request; `signalbox serve`
runs pinned to --proxy-cpu, the mock to --load-cpu, the load client is this process. Per mode, --waves
waves of --streams concurrent requests (after one unmeasured warm-up wave); CPU is the proxy process's
utime+stime from /proc, divided by the events the client received (`data:` blocks for the relay; unified
events for the others: text deltas plus usage and stream_complete). Modes:
  relay        POST /v1/chat/completions, stream: true (events pass through byte for byte)
  unified-sse  POST /signalbox/v1/stream (each chunk parsed and re-encoded as unified events)
  unified-ws   GET /signalbox/v1/stream, --streams requests over --sockets sockets (multiplexed)
Run: .venv/bin/python bench/stream_unified.py [--streams 200] [--waves 3] [--tokens 64] [--json]
(about a minute; needs Linux and taskset)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from common import REPO, cpu_seconds, free_port, signalbox, start_pinned, stop, tail, wait_port

API_KEY = "sk-bench-unified"
BODY = {"model": "bench-gpt", "messages": [{"role": "user", "content": "Count the levers."}], "max_tokens": 64}
STREAM = "/signalbox/v1/stream"


def write_policy(directory: Path, mock_port: int) -> Path:
    path = directory / "unified.yaml"
    path.write_text(f"""\
upstreams:
  oai: {{provider: openai, base_url: "http://127.0.0.1:{mock_port}/v1", api_key: unused, pool: {{keepalive: 30s}}}}
tenants:
  bench: {{keys: ["{API_KEY}"]}}
stream_socket: {{max_in_flight: 1024}}
routes:
  - {{name: gpt, match: {{model: bench-gpt}}, upstream: oai}}
""")
    return path


@contextmanager
def running(name: str, cmd: list[str], cpu: int, port: int, tmp: Path) -> Iterator[int]:
    log = tmp / f"{name}.log"
    proc = start_pinned(cmd, cpu, log, cwd=REPO)
    try:
        try:
            wait_port(port, proc)
        except RuntimeError as exc:
            raise RuntimeError(f"{name} did not start: {exc}\n--- {log} ---\n{tail(log)}") from exc
        yield proc.pid
    finally:
        stop(proc, grace_s=10)


async def relay_one(http: aiohttp.ClientSession, url: str) -> int:
    async with http.post(url + "/v1/chat/completions", json={**BODY, "stream": True},
                         headers={"Authorization": f"Bearer {API_KEY}"}) as resp:
        raw = await resp.read()
    return raw.count(b"\n\ndata:") + (1 if raw.startswith(b"data:") else 0)


async def sse_one(http: aiohttp.ClientSession, url: str) -> int:
    async with http.post(url + STREAM, json={"body": BODY}, headers={"Authorization": f"Bearer {API_KEY}"}) as resp:
        raw = await resp.read()
    return raw.count(b"\nevent: ")


async def relay_wave(url: str, streams: int, _sockets: int, one: Callable[..., Awaitable[int]]) -> int:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        counts = await asyncio.gather(*(one(http, url) for _ in range(streams)))
    return sum(counts)


async def ws_wave(url: str, streams: int, sockets: int) -> int:
    async with aiohttp.ClientSession() as http:
        async def socket_load(requests: int, tag: int) -> int:
            events = 0
            async with http.ws_connect(url + STREAM, headers={"Authorization": f"Bearer {API_KEY}"},
                                       max_msg_size=0) as ws:
                for i in range(requests):
                    await ws.send_str(orjson.dumps({"type": "request", "id": f"{tag}-{i}", "body": BODY}).decode())
                left = requests
                while left:
                    message = await ws.receive()
                    if message.type != aiohttp.WSMsgType.TEXT:
                        raise RuntimeError(f"socket ended early: {message}")
                    events += 1
                    if b'"stream_complete"' in message.data.encode():
                        left -= 1
            return events

        share = [streams // sockets + (1 if i < streams % sockets else 0) for i in range(sockets)]
        return sum(await asyncio.gather(*(socket_load(n, i) for i, n in enumerate(share) if n)))


MODES: dict[str, Callable[[str, int, int], Awaitable[int]]] = {
    "relay": lambda url, n, s: relay_wave(url, n, s, relay_one),
    "unified-sse": lambda url, n, s: relay_wave(url, n, s, sse_one),
    "unified-ws": ws_wave,
}


def measure(url: str, pid: int, args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for mode, wave in MODES.items():
        print(f"{mode}: warm-up", file=sys.stderr, flush=True)
        asyncio.run(wave(url, args.streams, args.sockets))  # warm-up: pools, code paths
        before = cpu_seconds(pid)
        events = sum(asyncio.run(wave(url, args.streams, args.sockets)) for _ in range(args.waves))
        spent = cpu_seconds(pid) - before
        results[mode] = {"events": events, "cpu_s": round(spent, 3), "cpu_us_per_event": round(spent / events * 1e6, 2)}
    base = results["relay"]["cpu_us_per_event"]
    for mode in ("unified-sse", "unified-ws"):
        results[mode]["vs_relay"] = round(results[mode]["cpu_us_per_event"] / base, 2) if base else None
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=200, help="concurrent requests per wave")
    parser.add_argument("--sockets", type=int, default=10, help="WebSockets the unified-ws mode spreads them over")
    parser.add_argument("--waves", type=int, default=3, help="measured waves per mode")
    parser.add_argument("--tokens", type=int, default=64, help="chunks per streamed answer")
    parser.add_argument("--proxy-cpu", type=int, default=0)
    parser.add_argument("--load-cpu", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-unified-") as tmp_name:
        tmp = Path(tmp_name)
        mock_port, proxy_port, admin_port = free_port(), free_port(), free_port()
        mock_cmd = [*signalbox(), "mock", "--port", str(mock_port), "--output-tokens", str(args.tokens)]
        policy = write_policy(tmp, mock_port)
        proxy_cmd = [*signalbox(), "serve", "--policies", str(policy), "--port", str(proxy_port),
                     "--admin-port", str(admin_port), "--admin-no-auth", "--no-access-log"]
        with running("mock", mock_cmd, args.load_cpu, mock_port, tmp), \
                running("proxy", proxy_cmd, args.proxy_cpu, proxy_port, tmp) as pid:
            results = measure(f"http://127.0.0.1:{proxy_port}", pid, args)
    if args.json:
        json.dump({"streams": args.streams, "waves": args.waves, "tokens": args.tokens, "modes": results},
                  sys.stdout, indent=2)
        print()
        return
    print(f"{args.waves} waves x {args.streams} streams x {args.tokens} tokens (ws: over {args.sockets} sockets)")
    print(f"{'mode':<12} {'events':>9} {'cpu s':>8} {'µs/event':>9} {'x relay':>8}")
    for mode, row in results.items():
        ratio = row.get("vs_relay")
        print(f"{mode:<12} {row['events']:>9} {row['cpu_s']:>8.3f} {row['cpu_us_per_event']:>9.2f} "
              f"{'' if ratio is None else f'{ratio:.2f}':>8}")


if __name__ == "__main__":
    main()
