"""Tool route benchmark: what a `provider: http` route costs per call, next to an LLM route and to no proxy.

One small upstream answers both a tool endpoint (`GET /api/search?q=...`, a 400-byte JSON) and an
OpenAI chat completion (`POST /v1/chat/completions`, non-streamed). One `signalbox serve` (access log
off) has a tool route `/tools/search/*` with a per-tenant request limit and a breaker, and an LLM route
with the same limit. The load, `--requests` calls from `--concurrency` clients (aiohttp), goes three
ways: straight to the upstream, through the tool route, through the LLM route. Prints throughput, p50
and p99 latency and the proxy's CPU per call for each.

Run: .venv/bin/python bench/tool_route.py [--requests 4000] [--concurrency 32] [--json]
Everything listens on 127.0.0.1 on free ports; the proxy and the upstream are stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import uvloop
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    cpu_seconds,
    free_port,
    percentile,
    revision,
    signalbox,
    start_pinned,
    stop,
    tail,
    wait_port,
)

KEY = "sk-bench"
CHAT = b'{"model":"bench-model","messages":[{"role":"user","content":"Count."}],"max_tokens":16}'
ANSWER = orjson.dumps({"results": [{"title": f"result {i}", "url": f"https://example.com/{i}"} for i in range(8)]})
COMPLETION = orjson.dumps({
    "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "bench-model",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "one two three"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
})


def serve_upstream(port: int) -> None:
    async def search(request: web.Request) -> web.Response:
        return web.Response(body=ANSWER, content_type="application/json")

    async def chat(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=COMPLETION, content_type="application/json")

    app = web.Application()
    app.router.add_get("/api/search", search)
    app.router.add_post("/v1/chat/completions", chat)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


def policy(upstream_port: int) -> str:
    base = f"http://127.0.0.1:{upstream_port}"
    return f"""
identify: {{mode: api_key}}
tenants:
  bench: {{keys: [{KEY}], limits: {{requests_per_minute: 100000000}}}}
upstreams:
  tool: {{provider: http, base_url: "{base}/api", breaker: {{consecutive_failures: 5}}}}
  llm: {{provider: openai, base_url: "{base}/v1", api_key: upstream-key}}
routes:
  - name: search
    match: {{path: /tools/search/*}}
    upstream: tool
    limits: {{per_tenant: {{requests_per_minute: 100000000}}}}
    retry: {{attempts: 2}}
  - name: chat
    upstream: llm
    limits: {{per_tenant: {{requests_per_minute: 100000000}}}}
    retry: {{attempts: 2}}
"""


async def load(url: str, method: str, body: bytes | None, requests: int, concurrency: int,
               proxy_pid: int | None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    latencies: list[float] = []
    left = iter(range(requests))

    async def worker(session: aiohttp.ClientSession) -> None:
        for _ in left:
            started = time.perf_counter()
            async with session.request(method, url, data=body, headers=headers) as resp:
                await resp.read()
                assert resp.status == 200, resp.status
            latencies.append(time.perf_counter() - started)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        async with session.request(method, url, data=body, headers=headers) as warm:
            await warm.read()
        cpu_before = cpu_seconds(proxy_pid) if proxy_pid else 0.0
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        cpu = (cpu_seconds(proxy_pid) - cpu_before) if proxy_pid else 0.0
    return {
        "requests_per_s": round(requests / elapsed),
        "p50_ms": round(percentile(latencies, 0.5) * 1000, 2),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
        "proxy_cpu_us_per_call": round(cpu / requests * 1e6) if proxy_pid else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--serve-upstream", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_upstream:
        uvloop.install()
        serve_upstream(args.serve_upstream)
        return
    work = Path(tempfile.mkdtemp(prefix="signalbox-tools-"))
    upstream_port, proxy_port, admin_port = free_port(), free_port(), free_port()
    (work / "policies").mkdir()
    (work / "policies" / "bench.yaml").write_text(policy(upstream_port))
    pinned = shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2

    def start(cmd: list[str], cpu: int, log: Path) -> subprocess.Popen[bytes]:
        if pinned:
            return start_pinned(cmd, cpu, log)
        with log.open("ab") as out:
            return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)

    upstream = start([sys.executable, __file__, "--serve-upstream", str(upstream_port)], 1, work / "upstream.log")
    proxy = None
    try:
        wait_port(upstream_port, upstream)
        proxy = start([*signalbox(), "serve", "--policies", str(work / "policies"), "--port", str(proxy_port),
                       "--admin-port", str(admin_port), "--no-access-log", "--shutdown-grace", "0"], 0,
                      work / "proxy.log")
        wait_port(proxy_port, proxy)
        if pinned:
            os.sched_setaffinity(0, {1})
        uvloop.install()
        direct, via = f"http://127.0.0.1:{upstream_port}", f"http://127.0.0.1:{proxy_port}"
        phases = (
            ("direct (no proxy)", f"{direct}/api/search?q=signal", "GET", None, None),
            ("tool route", f"{via}/tools/search/search?q=signal", "GET", None, proxy.pid),
            ("LLM route", f"{via}/v1/chat/completions", "POST", CHAT, proxy.pid),
        )
        results = {name: asyncio.run(load(url, method, body, args.requests, args.concurrency, pid))
                   for name, url, method, body, pid in phases}
    except BaseException:
        print(tail(work / "proxy.log"), file=sys.stderr)
        raise
    finally:
        if proxy is not None:
            stop(proxy)
        stop(upstream)
    if args.json:
        print(json.dumps({"revision": revision(), "results": results}, indent=2))
    else:
        print(f"revision {revision()}, {args.requests} calls, {args.concurrency} clients")
        print(f"{'target':<20} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'proxy CPU us/call':>18}")
        for name, row in results.items():
            cpu = row["proxy_cpu_us_per_call"]
            print(f"{name:<20} {row['requests_per_s']:>8} {row['p50_ms']:>8} {row['p99_ms']:>8} "
                  f"{cpu if cpu is not None else '-':>18}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
