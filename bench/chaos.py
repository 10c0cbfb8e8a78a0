"""Chaos run: Signalbox in front of faulty mock upstreams, under steady concurrent load.

The faults are policy-driven (`mock.faults`, drawn per upstream request by each built-in mock): 20 %
answer 503, 5 % answer 429 with `retry-after`, and 2 % of the rest break off after a few events
(mid-stream drops; a non-stream answer is cut before its body). The route pools `--deployments` mock
upstreams (least outstanding), retries up to 3 attempts under a retry budget (`--budget`, default 20 %
as in Envoy, floor 3), and its circuit breakers and pacing run with their defaults. Half of the
requests stream.

It prints what a client sees and what it cost upstream:
- success rate: 200 with a complete body (a stream ended by `data: [DONE]` without an error event);
- amplification: upstream calls / client requests, from the proxy's own
  `signalbox_upstream_requests_total` (every attempt, whatever its outcome);
- what the extra calls can buy: first-try success s0 (requests answered well at one attempt) plus, for
  each extra call per request, s0 again (a retry meets the same faults), capped by what 3 attempts
  allow (1 - (1 - s0)^3): the success a retry budget of that size should reach;
- answers that told the client `x-should-retry: false` (stopping the SDK's own retries);
- latency percentiles of whole requests (to the last byte), and the proxy's retry/breaker counters.

  .venv/bin/python bench/chaos.py                    # 60 s at concurrency 50
  .venv/bin/python bench/chaos.py --duration 10      # a quick look
  .venv/bin/python bench/chaos.py --deployments 1 --json

Everything listens on 127.0.0.1 on free ports; the proxy is started and stopped by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import uvloop
from common import REPO, free_port, percentile, probe, signalbox, stop, tail, wait_port
from prometheus_client.parser import text_string_to_metric_families

API_KEY = "sk-chaos"
CHAT = "/v1/chat/completions"


def write_policy(directory: Path, deployments: int, retry_after: float, drop: float, budget: float) -> Path:
    faults = (
        "[{kind: status, status: 503, probability: 0.20},"
        # The mock draws faults in order and keeps the first status: 0.0625 of the remaining 80 % is 5 %.
        f" {{kind: status, status: 429, probability: 0.0625, retry_after: {retry_after}}},"
        f" {{kind: drop, probability: {drop}, after_events: 4}}]"
    )
    upstreams = "\n".join(
        f"  mock-{i}: {{provider: mock, mock: {{ttft: 20ms, token_delay: 2ms, output_tokens: 16, seed: {i},"
        f" faults: {faults}}}}}"
        for i in range(deployments)
    )
    pool = ", ".join(f"{{upstream: mock-{i}}}" for i in range(deployments))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "chaos.yaml").write_text(
        f"identify: {{mode: api_key}}\ntenants:\n  chaos: {{keys: [{API_KEY}]}}\nupstreams:\n{upstreams}\n"
        f"retry: {{attempts: 3, budget: {{percent: {budget:g}}}}}\n"
        f"routes:\n  - {{name: chat, deployments: [{pool}], balance: least_outstanding, timeouts: {{total: 30s}}}}\n"
    )
    return directory


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    attempts: Counter[str] = field(default_factory=Counter)
    first_try_ok: int = 0
    do_not_retry: int = 0
    """Failed answers carrying x-should-retry: false."""

    @property
    def requests(self) -> int:
        return sum(self.outcomes.values())


async def one(http: aiohttp.ClientSession, url: str, stream: bool, tally: Tally) -> None:
    body = {"model": "chaos", "messages": [{"role": "user", "content": "Count to ten."}], "stream": stream}
    started = time.monotonic()
    try:
        async with http.post(url, json=body, headers={"Authorization": f"Bearer {API_KEY}"}) as resp:
            data = await resp.read()
            tally.attempts[resp.headers.get("x-signalbox-attempts", "?")] += 1
            if resp.status != 200:
                outcome = f"status_{resp.status}"
            elif stream:
                ok = data.endswith(b"data: [DONE]\n\n") and b'data: {"error"' not in data
                outcome = "ok" if ok else "stream_broken"
            else:
                outcome = "ok" if data.startswith(b"{") and b'"choices"' in data else "bad_body"
            if outcome == "ok" and resp.headers.get("x-signalbox-attempts") == "1":
                tally.first_try_ok += 1
            if outcome != "ok" and resp.headers.get("x-should-retry", "").lower() == "false":
                tally.do_not_retry += 1
    except (aiohttp.ClientError, TimeoutError) as exc:
        outcome = f"client_{type(exc).__name__}"
    tally.latencies.append(time.monotonic() - started)
    tally.outcomes[outcome] += 1


async def load(url: str, concurrency: int, duration: float) -> Tally:
    tally = Tally()
    stop_at = time.monotonic() + duration
    timeout = aiohttp.ClientTimeout(total=60)
    connector = aiohttp.TCPConnector(limit=concurrency * 2)

    async def worker(index: int, http: aiohttp.ClientSession) -> None:
        await asyncio.sleep(index / concurrency * 0.5)  # spread the starts over half a second
        n = index
        while time.monotonic() < stop_at:
            await one(http, url, n % 2 == 0, tally)
            n += 1

    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
        await asyncio.gather(*(worker(i, http) for i in range(concurrency)))
    return tally


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **match: str) -> float:
    return sum(
        v for (n, labels), v in metrics.items() if n == name and all(dict(labels).get(k) == x for k, x in match.items())
    )


def by_label(metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for (n, labels), v in metrics.items():
        if n == name:
            key = dict(labels).get(label, "")
            out[key] = out.get(key, 0.0) + v
    return {k: int(v) for k, v in sorted(out.items())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    parser.add_argument("--concurrency", type=int, default=50, help="requests in flight (default 50)")
    parser.add_argument("--deployments", type=int, default=2, help="faulty mock upstreams in the pool")
    parser.add_argument("--retry-after", type=float, default=1.0, help="the 429s' retry-after, seconds")
    parser.add_argument("--drop", type=float, default=0.02, help="share of answers cut mid-way")
    parser.add_argument("--budget", type=float, default=20.0, help="retry budget percent (default 20, Envoy's)")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of text")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="signalbox-chaos-"))
    policies = write_policy(tmp / "policies", args.deployments, args.retry_after, args.drop, args.budget)
    port, admin_port = free_port(), free_port()
    log = tmp / "proxy.log"
    cmd = [*signalbox(), "serve", "--policies", str(policies), "--host", "127.0.0.1", "--port", str(port),
           "--admin-port", str(admin_port), "--shutdown-grace", "0", "--no-access-log"]
    with log.open("ab") as out:
        proc = __import__("subprocess").Popen(cmd, stdout=out, stderr=out, cwd=REPO, start_new_session=True)
    try:
        try:
            wait_port(port, proc)
        except RuntimeError as exc:
            print(f"the proxy did not start: {exc}\n{tail(log)}", file=sys.stderr)
            return 1
        url = f"http://127.0.0.1:{port}{CHAT}"
        try:
            probe(url, API_KEY, timeout_s=10)  # may take a retry or two: the upstreams are faulty
        except RuntimeError:
            pass
        before = scrape(port)
        started = time.monotonic()
        tally = uvloop.run(load(url, args.concurrency, args.duration))
        elapsed = time.monotonic() - started
        after = scrape(port)
    finally:
        stop(proc)

    def delta(name: str, **match: str) -> float:
        return total(after, name, **match) - total(before, name, **match)

    upstream_calls = delta("signalbox_upstream_requests_total")
    requests = tally.requests
    lat = tally.latencies
    amplification = upstream_calls / requests if requests else 0.0
    first_try = tally.first_try_ok / requests if requests else 0.0
    buyable = min(1 - (1 - first_try) ** 3, first_try * amplification)
    report: dict[str, Any] = {
        "duration_s": round(elapsed, 1),
        "concurrency": args.concurrency,
        "deployments": args.deployments,
        "retry_budget_percent": args.budget,
        "client_requests": requests,
        "throughput_rps": round(requests / elapsed, 1),
        "success_rate": round(tally.outcomes["ok"] / requests, 4) if requests else 0.0,
        "first_try_success": round(first_try, 4),
        "success_the_extra_calls_can_buy": round(buyable, 4),
        "should_retry_false_answers": tally.do_not_retry,
        "outcomes": dict(tally.outcomes.most_common()),
        "upstream_calls": int(upstream_calls),
        "amplification": round(amplification, 3),
        "attempts_per_request": dict(sorted(tally.attempts.items())),
        "latency_ms": {q: round(percentile(lat, p) * 1000, 1) for q, p in (("p50", 50), ("p90", 90), ("p99", 99))}
        | {"max": round(max(lat) * 1000, 1) if lat else None},
        "upstream_statuses": {
            k: int(v - by_label(before, "signalbox_upstream_requests_total", "status").get(k, 0))
            for k, v in by_label(after, "signalbox_upstream_requests_total", "status").items()
        },
        "retries_by_reason": by_label(after, "signalbox_upstream_retries_total", "reason"),
        "retry_budget_exhausted": int(delta("signalbox_retry_budget_exhausted_total")),
        "circuit_transitions": by_label(after, "signalbox_upstream_circuit_transitions_total", "state"),
    }
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"chaos: {report['duration_s']} s, concurrency {args.concurrency}, {args.deployments} deployment(s), "
          f"3 attempts, retry budget {args.budget:g} %; "
          f"faults per upstream call: 20 % 503, 5 % 429 (retry-after {args.retry_after:g}s), "
          f"{args.drop:.0%} cut mid-way")
    print(f"  client requests      {requests}  ({report['throughput_rps']} /s)")
    print(f"  success rate         {report['success_rate']:.2%}   outcomes {report['outcomes']}")
    print(f"  amplification        {report['amplification']}  ({report['upstream_calls']} upstream calls)")
    print(f"  extra calls can buy  {report['success_the_extra_calls_can_buy']:.2%}  "
          f"(first-try success {report['first_try_success']:.2%} x amplification, at most 3 tries' worth)")
    print(f"  x-should-retry:false {report['should_retry_false_answers']} failed answers")
    print(f"  latency ms           {report['latency_ms']}")
    print(f"  attempts/request     {report['attempts_per_request']}")
    print(f"  upstream statuses    {report['upstream_statuses']}")
    print(f"  retries by reason    {report['retries_by_reason']}")
    print(f"  budget exhausted     {report['retry_budget_exhausted']}")
    print(f"  circuit transitions  {report['circuit_transitions']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
