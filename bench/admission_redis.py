"""Admission cost with the Redis limiter store beside the in-memory one.

Starts its own redis-server on a free loopback port (persistence off; stopped by PID at the end) and
runs `Scheduler.enter(call)` exactly as ingress does (decide, then settle and release on the way out)
for three limit shapes: requests/min; requests/min + tokens/min; requests/min + tokens/min +
concurrency. Limits are large, so every decision admits (the common case). Prints, per store and shape:

  - decision µs: wall time of the decision alone (`try_acquire`, one EVALSHA for Redis), mean / p50 / p99
  - request µs: wall time of the whole admission of one request (decision + settle + release), mean / p99
  - CPU µs: this process's CPU per request (redis-server's own CPU is shown apart)
  - round trips: Redis commands per request, counted by the server (INFO commandstats)
  - decisions/s with 64 requests in flight at once (one event loop)

Run: .venv/bin/python bench/admission_redis.py [--requests 5000] [--json]
Needs redis-server on PATH (scripts/install-redis.sh). Sequential runs on loopback: the Redis figures
are mostly the round trip through the kernel and redis-py, and vary with how busy the machine is.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop
from redis.asyncio import Redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import free_port, percentile, stop, wait_port  # noqa: E402
from proxy.admission.local import LocalStore  # noqa: E402
from proxy.admission.redis.store import RedisStore  # noqa: E402
from proxy.admission.store import LimiterStore  # noqa: E402
from proxy.call import Attempt, Call  # noqa: E402
from proxy.flow.admit import Admission  # noqa: E402
from proxy.flow.scheduler import Scheduler  # noqa: E402
from proxy.policy.compile import compile_plan  # noqa: E402
from proxy.policy.load import load_policy  # noqa: E402
from proxy.policy.plan import Plan, StateRule  # noqa: E402
from proxy.telemetry.metrics import Metrics  # noqa: E402

_TOP_LEVEL = ("evalsha", "eval", "script", "ping", "client")
SHAPES = {
    "rpm": "requests/min",
    "rpm_tpm": "requests/min + tokens/min",
    "rpm_tpm_conc": "requests/min + tokens/min + concurrent",
}


def build_plan() -> Plan:
    text = """
upstreams: {u: {provider: openai, base_url: "http://127.0.0.1:9/v1"}}
tenants:
  rpm: {keys: [k1], limits: {requests_per_minute: 1000000000}}
  rpm_tpm: {keys: [k2], limits: {requests_per_minute: 1000000000, tokens_per_minute: 1000000000000}}
  rpm_tpm_conc:
    keys: [k3]
    limits: {requests_per_minute: 1000000000, tokens_per_minute: 1000000000000, concurrent: 100000}
routes:
  - {name: chat, match: {path: /v1/chat/completions}, upstream: u}
"""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.yaml"
        path.write_text(text)
        return compile_plan(load_policy(path))


def make_call(plan: Plan, tenant: str) -> Call:
    call = Call("r", plan, "POST", "/v1/chat/completions", "openai", time.perf_counter())
    call.tenant = plan.tenants[tenant]
    call.route = plan.routes[0]
    call.model = "m"
    call.body = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 16}
    call.raw_body = b'{"model":"m","messages":[{"role":"user","content":"Hi"}],"max_tokens":16}'
    call.attempts = [Attempt("u", 200, 0.001)]  # dispatched: settles like a real request
    call.usage = {"prompt_tokens": 20, "completion_tokens": 10, "total_tokens": 30}
    return call


async def redis_counters(client: Redis) -> tuple[int, float]:
    """(round trips served, redis-server CPU seconds). Commands run inside scripts also show in
    commandstats, so only what a client sends at top level is counted (nothing here pipelines)."""
    stats = await client.info("commandstats")
    calls = sum(stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in _TOP_LEVEL)
    cpu = await client.info("cpu")
    return calls, float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


async def measure(store: LimiterStore, plan: Plan, tenant: str, n: int, probe: Redis | None) -> dict[str, Any]:
    admission = Scheduler(Metrics(), admission=Admission(store, Metrics()))
    call = make_call(plan, tenant)
    limits = plan.routes[0].limit_sets[tenant].limits
    for _ in range(200):  # warm up: connections, scripts, caches
        async with admission.enter(call):
            pass
    before = await redis_counters(probe) if probe is not None else (0, 0.0)
    decisions: list[float] = []
    requests: list[float] = []
    cpu_start = time.process_time()
    clock = time.perf_counter
    for _ in range(n):
        started = clock()
        async with admission.enter(call):
            decided = clock()
        ended = clock()
        decisions.append(decided - started)
        requests.append(ended - started)
    cpu = time.process_time() - cpu_start
    after = await redis_counters(probe) if probe is not None else (0, 0.0)
    # The decision alone, as a store call (no settle or release in between to interleave).
    alone: list[float] = []
    for _ in range(n):
        started = clock()
        result = await store.try_acquire(limits, 30)
        alone.append(clock() - started)
        await store.release(result)  # type: ignore[arg-type]
    concurrent = await throughput(admission, call, n)
    us = 1e6
    return {
        "decision_mean_us": sum(alone) / n * us,
        "decision_p50_us": percentile(alone, 50) * us,
        "decision_p99_us": percentile(alone, 99) * us,
        "request_mean_us": sum(requests) / n * us,
        "request_p99_us": percentile(requests, 99) * us,
        "cpu_us_per_request": cpu / n * us,
        "redis_cpu_us_per_request": (after[1] - before[1]) / n * us,
        "round_trips_per_request": (after[0] - before[0]) / n,
        "decisions_per_s_c64": concurrent,
    }


async def throughput(admission: Scheduler, call: Call, n: int, width: int = 64) -> float:
    left = n

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            async with admission.enter(call):
                pass

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(width)))
    return n / (time.perf_counter() - started)


async def main_async(args: argparse.Namespace, url: str) -> dict[str, Any]:
    plan = build_plan()
    rule = StateRule(backend="redis", url=url, key_prefix="bench", timeout=1.0, max_connections=128)
    store = RedisStore.open(rule)
    await store.start()
    probe = Redis.from_url(url)
    try:
        result: dict[str, Any] = {"requests": args.requests}
        for tenant in SHAPES:
            result[tenant] = {
                "memory": await measure(LocalStore(), plan, tenant, args.requests, None),
                "redis": await measure(store, plan, tenant, args.requests, probe),
            }
        result["degraded_during_run"] = store.health.degraded
        return result
    finally:
        await probe.aclose()
        await store.close()


def start_redis(directory: Path) -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is not on PATH: run scripts/install-redis.sh")
    port = free_port()
    log = (directory / "redis.log").open("ab")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(directory)],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    log.close()
    wait_port(port, proc)
    return proc, f"redis://127.0.0.1:{port}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_redis(Path(tmp))
        try:
            result = uvloop.run(main_async(args, url))
        finally:
            stop(proc)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"admission per request, {args.requests} sequential requests per row, Redis on loopback")
    header = (f"{'limits':<40}{'store':<8}{'decide µs':>10}{'p50':>8}{'p99':>8}{'request µs':>11}{'p99':>8}"
              f"{'CPU µs':>8}{'redis CPU':>10}{'trips':>7}{'dec/s c64':>11}")
    print(header)
    print("-" * len(header))
    for tenant, label in SHAPES.items():
        for kind in ("memory", "redis"):
            r = result[tenant][kind]
            print(f"{label:<40}{kind:<8}{r['decision_mean_us']:>10.1f}{r['decision_p50_us']:>8.1f}"
                  f"{r['decision_p99_us']:>8.1f}{r['request_mean_us']:>11.1f}{r['request_p99_us']:>8.1f}"
                  f"{r['cpu_us_per_request']:>8.1f}{r['redis_cpu_us_per_request']:>10.1f}"
                  f"{r['round_trips_per_request']:>7.2f}{r['decisions_per_s_c64']:>11,.0f}")
    if result["degraded_during_run"]:
        print("warning: the Redis store degraded to local limits during the run; the figures are mixed")


if __name__ == "__main__":
    main()
