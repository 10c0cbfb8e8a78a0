"""Batching benchmark: single-text embedding calls through a batching route and a plain route.

The upstream is priced per call, as embedding APIs and model servers effectively are: every call costs a
fixed 20 ms however many inputs it holds, and at most 8 calls are served at once (the rest wait in its
accept queue). Both routes go to that same upstream through one `signalbox serve`; the load is 2,000
single-text calls from 200 concurrent clients (aiohttp, the body the openai SDK sends). Prints
throughput, p50/p99 latency and the upstream calls made for each route.

Run: .venv/bin/python bench/batching.py [--requests 2000] [--concurrency 200] [--cost-ms 20]
     [--upstream-concurrency 8] [--max-wait 10ms] [--max-items 256] [--dim 1536] [--json]
Everything listens on 127.0.0.1 on free ports; the proxy and the upstream are stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import uvloop
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    cpu_seconds,
    cpu_task_seconds,
    free_port,
    own_cpu_seconds,
    percentile,
    revision,
    signalbox,
    start_pinned,
    stop,
    tail,
    wait_port,
)

KEY = "sk-bench"


# ---- the upstream: 20 ms per call, 8 calls at a time --------------------------------------------------


def serve_upstream(port: int, cost: float, concurrency: int, dim: int) -> None:
    """An OpenAI-compatible /v1/embeddings whose price is per call, not per input."""
    gate = asyncio.Semaphore(concurrency)
    stats = {"calls": 0, "inputs": 0}
    blocks = -(-dim * 4 // 32)

    def vector(item: Any) -> str:
        seed = hashlib.sha256(orjson.dumps(item)).digest()
        return base64.b64encode((seed * blocks)[: dim * 4]).decode()

    async def embeddings(request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        value = body["input"]
        items = value if isinstance(value, list) and not isinstance(value[0], int) else [value]
        async with gate:
            await asyncio.sleep(cost)
        stats["calls"] += 1
        stats["inputs"] += len(items)
        data = [{"object": "embedding", "index": i, "embedding": vector(v)} for i, v in enumerate(items)]
        tokens = sum(max(1, len(str(item)) // 4) for item in items)
        answer = {"object": "list", "data": data, "model": body["model"],
                  "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
        return web.Response(body=orjson.dumps(answer), content_type="application/json")

    async def read_stats(request: web.Request) -> web.Response:
        return web.json_response(stats)

    async def reset(request: web.Request) -> web.Response:
        stats.update(calls=0, inputs=0)
        return web.json_response(stats)

    app = web.Application(client_max_size=256 * 1024**2)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/stats", read_stats)
    app.router.add_post("/stats/reset", reset)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, backlog=1024)


# ---- the load ------------------------------------------------------------------------------------------


async def load(url: str, model: str, requests: int, concurrency: int) -> dict[str, Any]:
    latencies: list[float] = []
    errors: dict[str, int] = {}
    sizes: list[int] = []
    next_id = iter(range(requests))
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=0)

    async def worker(http: aiohttp.ClientSession) -> None:
        for i in next_id:
            text = f"search query number {i}: how do I batch embeddings?"
            body = orjson.dumps({"input": text, "model": model, "encoding_format": "base64"})
            started = time.perf_counter()
            try:
                async with http.post(url, data=body, headers=headers) as response:
                    raw = await response.read()
                    if response.status != 200:
                        errors[str(response.status)] = errors.get(str(response.status), 0) + 1
                        continue
                    answer = orjson.loads(raw)
                    if len(answer["data"]) != 1 or answer["data"][0]["index"] != 0:
                        errors["bad split"] = errors.get("bad split", 0) + 1
                        continue
                    sizes.append(int(response.headers.get("x-signalbox-batch-size", "1")))
            except aiohttp.ClientError as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                continue
            latencies.append(time.perf_counter() - started)

    async with aiohttp.ClientSession(connector=connector) as http:
        started = time.perf_counter()
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {
        "seconds": elapsed,
        "ok": len(latencies),
        "throughput": len(latencies) / elapsed,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "errors": errors,
        "mean_batch_size": sum(sizes) / len(sizes) if sizes else 0.0,
    }


async def upstream_stats(root: str, reset: bool = False) -> dict[str, int]:
    async with aiohttp.ClientSession() as http:
        if reset:
            async with http.post(root + "/stats/reset") as response:
                return dict(await response.json())
        async with http.get(root + "/stats") as response:
            return dict(await response.json())


async def phase(
    proxy: str, upstream: str, model: str, args: argparse.Namespace, pids: tuple[int, int]
) -> dict[str, Any]:
    await load(proxy + "/v1/embeddings", model, min(200, args.requests), min(50, args.concurrency))  # warm-up
    await upstream_stats(upstream, reset=True)
    proxy_pid, upstream_pid = pids
    cpu, load_cpu = cpu_seconds(proxy_pid), cpu_seconds(upstream_pid) + own_cpu_seconds()
    busy = cpu_task_seconds([0, 1])
    result = await load(proxy + "/v1/embeddings", model, args.requests, args.concurrency)
    cpu = cpu_seconds(proxy_pid) - cpu
    load_cpu = cpu_seconds(upstream_pid) + own_cpu_seconds() - load_cpu
    result["proxy_cpu_us_per_call"] = cpu / max(1, result["ok"]) * 1e6
    result["proxy_cpu_pct"] = cpu / result["seconds"] * 100
    result["load_cpu_pct"] = load_cpu / result["seconds"] * 100
    result["others_cpu_pct"] = (cpu_task_seconds([0, 1]) - busy - cpu - load_cpu) / result["seconds"] * 100
    stats = await upstream_stats(upstream)
    result["upstream_calls"] = stats["calls"]
    result["upstream_inputs"] = stats["inputs"]
    return result


def policy(upstream_port: int, args: argparse.Namespace) -> str:
    return f"""
identify: {{mode: api_key}}
upstreams:
  slow: {{provider: openai, base_url: "http://127.0.0.1:{upstream_port}/v1", api_key: sk-up}}
tenants:
  bench: {{keys: [{KEY}]}}
routes:
  - name: batched
    match: {{path: /v1/embeddings, model: emb-batched}}
    upstream: slow
    model: text-embedding-3-small
    batch: {{max_items: {args.max_items}, max_wait: {args.max_wait}}}
  - name: plain
    match: {{path: /v1/embeddings, model: emb-plain}}
    upstream: slow
    model: text-embedding-3-small
"""


def report(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    print(f"signalbox batching at {revision()}: {args.requests} single-text embedding calls at "
          f"concurrency {args.concurrency}; upstream {args.cost_ms:g} ms per call, "
          f"{args.upstream_concurrency} at a time, {args.dim} dims base64; "
          f"batch max_items {args.max_items}, max_wait {args.max_wait}\n")
    rows: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("throughput, calls/s", lambda r: f"{r['throughput']:,.0f}"),
        ("latency p50, ms", lambda r: f"{r['p50_ms']:.1f}"),
        ("latency p99, ms", lambda r: f"{r['p99_ms']:.1f}"),
        ("upstream calls", lambda r: f"{r['upstream_calls']:,}"),
        ("inputs per upstream call", lambda r: f"{r['upstream_inputs'] / max(1, r['upstream_calls']):.1f}"),
        ("callers per batch (header)", lambda r: f"{r['mean_batch_size']:.1f}"),
        ("wall time, s", lambda r: f"{r['seconds']:.2f}"),
        ("proxy CPU µs per call", lambda r: f"{r['proxy_cpu_us_per_call']:.0f}"),
        ("proxy CPU, % of one core", lambda r: f"{r['proxy_cpu_pct']:.0f}"),
        ("client + upstream CPU, %", lambda r: f"{r['load_cpu_pct']:.0f}"),
        ("other programs' CPU, %", lambda r: f"{r['others_cpu_pct']:.0f}"),
        ("calls ok / errors", lambda r: f"{r['ok']} / {sum(r['errors'].values())}"),
    ]
    print(f"{'metric':30}{'plain':>14}{'batched':>14}")
    print("-" * 58)
    for name, fmt in rows:
        print(f"{name:30}{fmt(results['plain']):>14}{fmt(results['batched']):>14}")
    for name, result in results.items():
        if result["errors"]:
            print(f"errors on {name}: {result['errors']}")


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--cost-ms", type=float, default=20.0)
    parser.add_argument("--upstream-concurrency", type=int, default=8)
    parser.add_argument("--max-wait", default="10ms")
    parser.add_argument("--max-items", type=int, default=256)
    parser.add_argument("--dim", type=int, default=1536)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--serve-upstream", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_upstream:
        uvloop.install()
        serve_upstream(args.serve_upstream, args.cost_ms / 1000, args.upstream_concurrency, args.dim)
        return

    work = Path(tempfile.mkdtemp(prefix="signalbox-batching-"))
    upstream_port, proxy_port, admin_port = free_port(), free_port(), free_port()
    (work / "policies").mkdir()
    (work / "policies" / "bench.yaml").write_text(policy(upstream_port, args))
    pinned = shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
    cpu_proxy, cpu_load = (0, 1) if pinned else (-1, -1)

    def start(cmd: list[str], cpu: int, log: Path) -> Any:
        if cpu >= 0:
            return start_pinned(cmd, cpu, log)
        import subprocess

        with log.open("ab") as out:
            return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)

    upstream_cmd = [sys.executable, __file__, "--serve-upstream", str(upstream_port), "--cost-ms",
                    str(args.cost_ms), "--upstream-concurrency", str(args.upstream_concurrency),
                    "--dim", str(args.dim)]
    proxy_cmd = [*signalbox(), "serve", "--policies", str(work / "policies"), "--port", str(proxy_port),
                 "--admin-port", str(admin_port), "--no-access-log", "--shutdown-grace", "0"]
    upstream = start(upstream_cmd, cpu_load, work / "upstream.log")
    proxy = None
    try:
        wait_port(upstream_port, upstream)
        proxy = start(proxy_cmd, cpu_proxy, work / "proxy.log")
        wait_port(proxy_port, proxy)
        if cpu_load >= 0:
            os.sched_setaffinity(0, {cpu_load})
        uvloop.install()
        proxy_url, upstream_url = f"http://127.0.0.1:{proxy_port}", f"http://127.0.0.1:{upstream_port}"
        results = {
            name: asyncio.run(phase(proxy_url, upstream_url, model, args, (proxy.pid, upstream.pid)))
            for name, model in (("plain", "emb-plain"), ("batched", "emb-batched"))
        }
    except BaseException:
        print(tail(work / "proxy.log"), file=sys.stderr)
        raise
    finally:
        if proxy is not None:
            stop(proxy)
        stop(upstream)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        report(results, args)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
