"""Cache benchmark: what a cache hit costs, and what the per-input embeddings cache saves.

1. CPU per request, same run, same load (wrk -t1 -c64 with bench/post.lua, the same chat request every
   time): `floor` (bench/floor.py, a bare forwarder), `proxied` (`signalbox serve`, one route, no
   cache: every request goes upstream) and `hits` (the same route with `cache:`: after the first
   request every one is a hit). Targets on CPU 0, wrk and bench/fast_upstream.py on CPU 1, rounds in
   ABBA order; CPU from /proc/<pid>/stat over each slice.
2. Embeddings at a repeat ratio: a stream of embeddings requests (16 inputs each) where a given share
   of the inputs repeats an earlier one, through a route with `cache:` to an upstream that counts the
   inputs and tokens it is sent; printed against what the same requests send without a cache.

Run: .venv/bin/python bench/cache.py [--duration 6] [--rounds 2] [--requests 300] [--json]
Everything listens on 127.0.0.1 on free ports; every process started is stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    cpu_seconds,
    ensure_wrk,
    free_port,
    probe,
    run_wrk,
    signalbox,
    start_pinned,
    stop,
    tail,
    wait_port,
)

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
KEY = "sk-bench"
CHAT = "/v1/chat/completions"
POLICY = """\
upstreams:
  fast: {{provider: openai, base_url: "http://127.0.0.1:{port}/v1", api_key: unused}}
tenants:
  bench: {{keys: ["{key}"]}}
routes:
  - name: bench
    match: {{model: "*"}}
    upstream: fast
{cache}"""
CACHE = "    cache: {ttl: 10m}\n"


@dataclass
class Target:
    name: str
    url: str
    pid: int


@contextmanager
def server(name: str, cmd: list[str], cpu: int, port: int, tmp: Path, path: str = CHAT) -> Iterator[Target]:
    log = tmp / f"{name}.log"
    proc = start_pinned(cmd, cpu, log, cwd=REPO)
    try:
        try:
            wait_port(port, proc)
            if path:
                probe(f"http://127.0.0.1:{port}{path}", KEY)
        except RuntimeError as exc:
            raise RuntimeError(f"{name} did not start: {exc}\n--- {log} ---\n{tail(log)}") from exc
        yield Target(name, f"http://127.0.0.1:{port}{path}", proc.pid)
    finally:
        stop(proc, grace_s=10)


def serve_cmd(policies: Path, port: int) -> list[str]:
    return [*signalbox(), "serve", "--policies", str(policies), "--host", "127.0.0.1", "--port", str(port),
            "--admin-port", str(free_port()), "--shutdown-grace", "0", "--no-access-log"]


def policy_dir(tmp: Path, name: str, upstream_port: int, cache: str) -> Path:
    folder = tmp / name
    folder.mkdir()
    (folder / "policy.yaml").write_text(POLICY.format(port=upstream_port, key=KEY, cache=cache))
    return folder


def cpu_per_request(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    wrk = ensure_wrk()
    py = sys.executable
    up_port, floor_port, plain_port, hit_port = (free_port() for _ in range(4))
    with ExitStack() as stack:
        stack.enter_context(server("upstream", [py, str(BENCH / "fast_upstream.py"), "--port", str(up_port)],
                                   args.load_cpu, up_port, tmp, path=""))
        targets = [
            stack.enter_context(server("floor", [py, str(BENCH / "floor.py"), "--port", str(floor_port),
                                                 "--upstream", f"http://127.0.0.1:{up_port}"],
                                       args.proxy_cpu, floor_port, tmp)),
            stack.enter_context(server("proxied", serve_cmd(policy_dir(tmp, "plain", up_port, ""), plain_port),
                                       args.proxy_cpu, plain_port, tmp)),
            stack.enter_context(server("hits", serve_cmd(policy_dir(tmp, "hits", up_port, CACHE), hit_port),
                                       args.proxy_cpu, hit_port, tmp)),
        ]
        totals = {t.name: [0.0, 0] for t in targets}
        for t in targets:  # warm-up, not counted
            run_wrk(wrk, t.url, 64, args.warmup, args.load_cpu, KEY)
        slice_s = max(1, round(args.duration / args.rounds))
        for i in range(args.rounds):
            for t in targets if i % 2 == 0 else reversed(targets):
                before = cpu_seconds(t.pid)
                result = run_wrk(wrk, t.url, 64, slice_s, args.load_cpu, KEY)
                totals[t.name][0] += cpu_seconds(t.pid) - before
                totals[t.name][1] += int(result["requests"])
        hits = hit_count(hit_port)
    out: dict[str, Any] = {}
    for name, (cpu, requests) in totals.items():
        out[name] = {"requests": requests, "cpu_us_per_request": round(cpu / requests * 1e6, 1) if requests else None}
    out["hits_counted_by_the_proxy"] = hits
    return out


def hit_count(port: int) -> float:
    """signalbox_cache_requests_total{result="hit"} from the cached proxy's /metrics."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("signalbox_cache_requests_total{") and 'result="hit"' in line)


# ---- embeddings at a repeat ratio ---------------------------------------------------------------------


class Counting:
    """Embeddings upstream (the mock's vectors and token counts) that adds up what it is sent."""

    def __init__(self) -> None:
        self.calls = 0
        self.inputs = 0
        self.tokens = 0

    async def handle(self, request: web.Request) -> web.Response:
        from proxy.mock import embeddings as mock

        body = await request.json()
        answer = mock.embeddings_response(body, 256)
        self.calls += 1
        self.inputs += len(answer["data"])
        self.tokens += answer["usage"]["prompt_tokens"]
        return web.Response(body=orjson.dumps(answer), content_type="application/json")


def workload(requests: int, per_request: int, repeat: float, seed: int) -> list[list[str]]:
    """Requests of `per_request` texts; each text repeats an earlier one with probability `repeat`."""
    rng = random.Random(seed)
    seen: list[str] = []
    out = []
    for r in range(requests):
        texts = []
        for i in range(per_request):
            if seen and rng.random() < repeat:
                texts.append(rng.choice(seen))
            else:
                text = f"chunk {r}-{i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 160)))
                seen.append(text)
                texts.append(text)
        out.append(texts)
    return out


WORDS = ("cache", "vector", "search", "policy", "tenant", "upstream", "answer", "token", "quota", "route",
         "replica", "latency", "document", "index", "query", "model", "batch", "retry", "limit", "stream")


async def embeddings_saved(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for repeat in args.repeat:
        counting = Counting()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/embeddings", counting.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        up_port = free_port()
        await web.TCPSite(runner, "127.0.0.1", up_port).start()
        port = free_port()
        folder = policy_dir(tmp, f"emb-{repeat}", up_port, CACHE)
        try:
            with server(f"embeddings-{repeat}", serve_cmd(folder, port), args.proxy_cpu, port, tmp, path="") as t:
                sent = await drive(t.url.rstrip("/") + "/v1/embeddings", workload(args.requests, 16, repeat, 7))
        finally:
            await runner.cleanup()
        results[f"{round(repeat * 100)}% repeated"] = {
            "requests": args.requests,
            "inputs_without_cache": sent["inputs"],
            "inputs_sent_upstream": counting.inputs,
            "tokens_without_cache": sent["tokens"],
            "tokens_sent_upstream": counting.tokens,
            "upstream_calls": counting.calls,
            "tokens_saved_pct": round(100 * (1 - counting.tokens / sent["tokens"]), 1),
        }
    return results


async def drive(url: str, requests: list[list[str]]) -> dict[str, int]:
    """Send the requests in order (8 at a time) and add up what they would cost uncached."""
    from proxy.mock.content import estimate_tokens

    headers = {"Authorization": f"Bearer {KEY}"}
    queue = list(requests)
    inputs = sum(len(r) for r in requests)
    tokens = sum(estimate_tokens(t) for r in requests for t in r)

    async def worker(session: aiohttp.ClientSession) -> None:
        while queue:
            texts = queue.pop(0)
            async with session.post(url, json={"model": "emb", "input": texts}, headers=headers) as response:
                body = await response.json()
                if response.status != 200 or len(body["data"]) != len(texts):
                    raise RuntimeError(f"embeddings answered {response.status}: {str(body)[:200]}")

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(worker(session) for _ in range(8)))
    return {"inputs": inputs, "tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=6, help="seconds per target (split over rounds)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--proxy-cpu", type=int, default=0)
    parser.add_argument("--load-cpu", type=int, default=1)
    parser.add_argument("--requests", type=int, default=300, help="embeddings requests per repeat ratio")
    parser.add_argument("--repeat", type=float, nargs="+", default=[0.3, 0.7])
    parser.add_argument("--only", choices=("cpu", "embeddings", "both"), default="both")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    started = time.time()
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="signalbox-cache-bench-") as folder:
        tmp = Path(folder)
        if args.only in ("cpu", "both"):
            report["cpu"] = cpu_per_request(args, tmp)
        if args.only in ("embeddings", "both"):
            report["embeddings"] = asyncio.run(embeddings_saved(args, tmp))
    report["seconds"] = round(time.time() - started, 1)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    render(report)


def render(report: dict[str, Any]) -> None:
    cpu = report.get("cpu")
    if cpu:
        floor = cpu["floor"]["cpu_us_per_request"]
        print("CPU per request (c64, same run)        requests   CPU µs/request   × floor")
        for name in ("floor", "proxied", "hits"):
            row = cpu[name]
            ratio = row["cpu_us_per_request"] / floor if floor else float("nan")
            print(f"  {name:<36} {row['requests']:>8}   {row['cpu_us_per_request']:>14}   {ratio:7.2f}")
        print(f"  hits counted by the cached proxy: {int(cpu['hits_counted_by_the_proxy'])}")
    for name, row in (report.get("embeddings") or {}).items():
        print(f"Embeddings, {name}: {row['requests']} requests x 16 inputs")
        print(f"  inputs  upstream {row['inputs_sent_upstream']:>7} / {row['inputs_without_cache']:>7} without cache")
        print(f"  tokens  upstream {row['tokens_sent_upstream']:>7} / {row['tokens_without_cache']:>7} without cache"
              f"  ({row['tokens_saved_pct']} % saved; {row['upstream_calls']} upstream calls)")


if __name__ == "__main__":
    main()
