"""What the wall screen's live feed costs the event loop: one snapshot build (read the counters, the queue listing,
the upstreams and health, shape them, serialise) for growing metric cardinality. The feed builds one a second
however many screens watch (proxy/ops/wall.py), so this is the loop time a second of watching costs.

    .venv/bin/python bench/live_snapshot.py

In process, no sockets: the proxy app is built from a policy with one queue and limits in four places, and its
request counters are filled with routes x tenants x 3 outcomes series and 50 recent refusals.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import orjson

from proxy.app import build_app
from proxy.ops import live
from proxy.policy.compile import compile_plan
from proxy.policy.load import load_policy
from proxy.runtime import STATE, Settings

POLICY = """
identify: {mode: api_key}
priorities: [interactive, batch]
upstreams:
  up: {provider: openai, base_url: "http://127.0.0.1:9/v1", api_key: sk-bench-up,
       limits: {requests_per_minute: 2000}}
tenants:
  alpha: {keys: [sk-alpha], priority: interactive, limits: {requests_per_minute: 600, concurrent: 20}}
  beta: {keys: [sk-beta], priority: batch}
queues:
  chat: {concurrency: 2, max_waiting: 50, max_wait: 120s}
routes:
  - name: chat
    match: {path: /v1/chat/completions}
    upstream: up
    queue: chat
    limits: {requests_per_minute: 1200, tokens_per_minute: 400000, per_tenant: {requests_per_minute: 100}}
"""
ROUNDS = 500


async def measure(routes: int, tenants: int) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "policy.yaml"
        path.write_text(POLICY)
        app = build_app(compile_plan(load_policy(path)), Settings())
    runtime = app[STATE]
    metrics = runtime.metrics
    for r in range(routes):
        for t in range(tenants):
            for outcome in ("ok", "rejected", "upstream_error"):
                metrics.requests.inc((f"route-{r}", f"tenant-{t}", "up", "200", outcome), 5)
        metrics.ttft.observe((f"route-{r}",), 0.3)
    for i in range(50):
        metrics.refusals.ring.append((time.time(), f"req-{i}", "alpha", "chat", "gpt-4o", 429, "rate_limit", 0.0))
    window = live.Window()
    bounds = metrics.ttft.bounds
    body = b""
    started = time.perf_counter()
    for _ in range(ROUNDS):
        inputs = await live.gather(runtime, time.time())
        body = orjson.dumps(live.snapshot(inputs, window.base(inputs.counters), bounds))
    return (time.perf_counter() - started) / ROUNDS, len(body)


async def main() -> None:
    print(f"{'routes x tenants':>18} {'series':>7} {'µs per snapshot':>16} {'bytes':>7}")
    for routes, tenants in ((1, 3), (5, 10), (20, 20), (50, 50)):
        seconds, size = await measure(routes, tenants)
        print(f"{routes:>8} x {tenants:<7} {routes * tenants * 3:>7} {seconds * 1e6:>16.0f} {size:>7}")


if __name__ == "__main__":
    asyncio.run(main())
