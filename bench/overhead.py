"""Overhead benchmark: the proxy against a bare aiohttp forwarder (the floor), same upstream, same load.

Starts bench/fast_upstream.py, the floor and the proxy pinned apart with taskset, measures them in
alternating rounds, and prints throughput, added latency, CPU per request, stream TTFC and CPU per
relayed event side by side. Run: .venv/bin/python bench/overhead.py [--duration 10] [--only floor] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TypeVar

from common import (
    cpu_seconds,
    cpu_task_seconds,
    ensure_wrk,
    free_port,
    own_cpu_seconds,
    percentile,
    probe,
    proxy_missing,
    revision,
    run_streams,
    run_wrk,
    signalbox,
    start_pinned,
    stop,
    tail,
    vm_kib,
    wait_port,
)

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
CHAT_PATH = "/v1/chat/completions"
API_KEY = "sk-bench"
Metrics = dict[str, float]
R = TypeVar("R")


@dataclass(frozen=True)
class Config:
    duration: int  # seconds per phase and target, split over the rounds
    rounds: int
    warmup: int
    proxy_cpu: int
    load_cpu: int
    streams: int
    events: int
    interval_ms: float
    proxy_args: tuple[str, ...]
    max_noise: float  # % of a CPU used by other programs above which a slice is redone
    retries: int
    revision: str  # what was measured, read once at the start
    tmp: Path

    @property
    def slice_s(self) -> int:
        return max(1, round(self.duration / self.rounds))


@dataclass
class Target:
    """One thing measured (the upstream itself, "direct"; the floor; the proxy) and what it accumulates."""

    name: str
    url: str
    pid: int | None = None  # None for direct: the upstream's CPU is not the subject
    requests: int = 0
    seconds: float = 0.0
    cpu_s: float = 0.0
    load_busy_pct: list[float] = field(default_factory=list)
    others_pct: dict[str, list[float]] = field(default_factory=dict)  # phase -> one value per slice
    steal_pct: list[float] = field(default_factory=list)
    lat_p50_us: list[float] = field(default_factory=list)
    lat_p99_us: list[float] = field(default_factory=list)
    ttfc_ms: list[float] = field(default_factory=list)
    events: int = 0
    streams: int = 0
    stream_cpu_s: float = 0.0
    rss_idle_kib: int = 0
    rss_peak_kib: int = 0

    def cpu(self) -> float:
        return cpu_seconds(self.pid) if self.pid else 0.0


@dataclass(frozen=True)
class Slice:
    """One measured slice: the target's CPU seconds, and the two CPUs' use by others and by the load side."""

    cpu_s: float
    others_pct: float  # of one CPU, summed over both
    load_pct: float
    steal_pct: float  # of one CPU, summed over both: the hypervisor ran someone else


@dataclass
class Bench:
    """One run: its settings, wrk, the long-lived processes we started, and the warnings so far."""

    cfg: Config
    wrk: str
    pids: list[int] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def _ours(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.pids) + own_cpu_seconds()

    def measure(self, t: Target, phase: str, run_slice: Callable[[], R]) -> tuple[R, Slice]:
        """Run one measured slice; redo it (up to cfg.retries times) while other programs were busy.

        Others' work on these two CPUs delays the target and the client and pollutes caches, so a
        noisy slice is repeated after a pause and the quietest attempt is kept.
        """
        best: tuple[R, Slice] | None = None
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                time.sleep(5)  # let the other program's burst pass
            got = self._slice(t, run_slice)
            if best is None or got[1].others_pct < best[1].others_pct:
                best = got
            if got[1].others_pct <= self.cfg.max_noise:
                break
        assert best is not None
        t.others_pct.setdefault(phase, []).append(best[1].others_pct)
        t.steal_pct.append(best[1].steal_pct)
        if phase == "c64":
            t.load_busy_pct.append(best[1].load_pct)
        return best

    def _slice(self, t: Target, run_slice: Callable[[], R]) -> tuple[R, Slice]:
        cpus = (self.cfg.proxy_cpu, self.cfg.load_cpu)
        wall, busy, load, steal, ours, cpu = (time.monotonic(), cpu_task_seconds(cpus),
                                              cpu_task_seconds((self.cfg.load_cpu,)),
                                              cpu_task_seconds(cpus, (7,)), self._ours(), t.cpu())
        result = run_slice()
        wall = time.monotonic() - wall
        others = (cpu_task_seconds(cpus) - busy) - (self._ours() - ours)
        load = cpu_task_seconds((self.cfg.load_cpu,)) - load
        steal = cpu_task_seconds(cpus, (7,)) - steal
        return result, Slice(t.cpu() - cpu, max(0.0, 100 * others / wall), 100 * load / wall,
                             100 * steal / wall)


# ---- starting things --------------------------------------------------------------------------------


def write_policy(directory: Path, upstream_port: int) -> Path:
    """The proxy's policy for the benchmark: one tenant, one route, the fast upstream, no limits."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "bench.yaml").write_text(f"""\
upstreams:
  fast:
    provider: openai
    base_url: http://127.0.0.1:{upstream_port}/v1
    api_key: ${{BENCH_KEY:-unused}}
tenants:
  bench:
    keys: ["{API_KEY}"]
routes:
  - name: bench
    match: {{model: "*"}}
    upstream: fast
""")
    return directory


def proxy_command(policies: Path, port: int, admin_port: int, extra: tuple[str, ...]) -> list[str]:
    return [*signalbox(), "serve", "--policies", str(policies), "--host", "127.0.0.1", "--port", str(port),
            "--admin-port", str(admin_port), "--shutdown-grace", "0", *extra]


@contextmanager
def running(name: str, cmd: list[str], cpu: int, port: int, cfg: Config) -> Iterator[Target]:
    """Run one pinned server for the length of the block; always stop it (by PID) afterwards."""
    log = cfg.tmp / f"{name}.log"
    proc = start_pinned(cmd, cpu, log, cwd=REPO)
    url = f"http://127.0.0.1:{port}{CHAT_PATH}"
    try:
        try:
            wait_port(port, proc)
            probe(url, API_KEY)
        except RuntimeError as exc:
            raise RuntimeError(f"{name} did not start: {exc}\n--- {log} ---\n{tail(log)}") from exc
        yield Target(name, url, proc.pid)
    finally:
        stop(proc, grace_s=10)


# ---- phases: every target in turn, in alternating order, the phase's time split over the rounds ------


def in_rounds(targets: list[Target], rounds: int) -> Iterator[Target]:
    for i in range(rounds):
        yield from (targets if i % 2 == 0 else reversed(targets))  # ABBA: cancels slow drift


def throughput(targets: list[Target], b: Bench) -> None:
    """Requests/s at concurrency 64, and each target's CPU time per request."""
    cfg = b.cfg
    for t in targets:
        if cfg.warmup:
            run_wrk(b.wrk, t.url, 64, cfg.warmup, cfg.load_cpu, API_KEY)
    for t in in_rounds(targets, cfg.rounds):
        res, used = b.measure(t, "c64", partial(run_wrk, b.wrk, t.url, 64, cfg.slice_s, cfg.load_cpu,
                                                API_KEY))
        t.cpu_s += used.cpu_s
        t.requests += res["requests"]
        t.seconds += res["duration_us"] / 1e6
        if any(res["errors"].values()):
            b.warnings.append(f"{t.name}: wrk counted errors at c64: {res['errors']}")


def latency(targets: list[Target], b: Bench) -> None:
    """Latency percentiles at concurrency 1 (one connection, back to back)."""
    for t in in_rounds(targets, b.cfg.rounds):
        res, _ = b.measure(t, "c1", partial(run_wrk, b.wrk, t.url, 1, b.cfg.slice_s, b.cfg.load_cpu, API_KEY))
        t.lat_p50_us.append(res["latency_us"]["p50"])
        t.lat_p99_us.append(res["latency_us"]["p99"])
        if any(res["errors"].values()):
            b.warnings.append(f"{t.name}: wrk counted errors at c1: {res['errors']}")


def streaming(targets: list[Target], b: Bench) -> None:
    """Concurrent streams: TTFC, each target's CPU per relayed event, and its memory while they are open."""
    cfg, log = b.cfg, b.cfg.tmp / "streams.out"
    for t in targets:
        t.rss_idle_kib = t.rss_peak_kib = vm_kib(t.pid, "VmRSS") if t.pid else 0

    def sampler(t: Target) -> Callable[[], None]:
        def sample() -> None:
            if t.pid:
                t.rss_peak_kib = max(t.rss_peak_kib, vm_kib(t.pid, "VmRSS"))
        return sample

    for t in targets:
        if cfg.warmup:
            run_streams(t.url, cfg.streams, cfg.warmup, cfg.load_cpu, log, API_KEY, sampler(t))
    for t in in_rounds(targets, cfg.rounds):
        res, used = b.measure(t, "streams", partial(run_streams, t.url, cfg.streams, cfg.slice_s,
                                                    cfg.load_cpu, log, API_KEY, sampler(t)))
        t.stream_cpu_s += used.cpu_s
        t.ttfc_ms += res["ttfc_ms"]
        t.events += res["events"]
        t.streams += res["streams"]
        if res["errors"]:
            b.warnings.append(f"{t.name}: {res['errors']} failed streams, e.g. {res['error_samples'][:2]}")


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def metrics(t: Target, cfg: Config) -> Metrics:
    """The table's numbers for one target."""
    def div(a: float, b: float, scale: float = 1.0) -> float:
        return a * scale / b if b else math.nan

    out = {"rps_c64": div(t.requests, t.seconds),
           "lat_p50_ms": mean(t.lat_p50_us) / 1000, "lat_p99_ms": mean(t.lat_p99_us) / 1000,
           "ttfc_p50_ms": percentile(t.ttfc_ms, 50), "ttfc_p99_ms": percentile(t.ttfc_ms, 99),
           "events": t.events, "events_per_stream": div(t.events, t.streams),
           "load_cpu_busy_pct": mean(t.load_busy_pct), "steal_pct": max(t.steal_pct, default=math.nan)}
    out |= {f"others_{phase}_pct": max(values) for phase, values in t.others_pct.items()}
    if t.pid:
        out |= {"cpu_us_per_req": div(t.cpu_s, t.requests, 1e6),
                "cpu_us_per_event": div(t.stream_cpu_s, t.events, 1e6),
                "target_cpu_pct": div(t.cpu_s, t.seconds, 100),
                "rss_idle_mib": t.rss_idle_kib / 1024, "rss_peak_streams_mib": t.rss_peak_kib / 1024,
                "rss_per_stream_kib": (t.rss_peak_kib - t.rss_idle_kib) / cfg.streams,
                "vm_hwm_mib": vm_kib(t.pid, "VmHWM") / 1024}
    return out


def add_deltas(result: Metrics, direct: Metrics) -> Metrics:
    """Added latency and TTFC: through the target minus straight to the upstream, same client, same load."""
    return result | {"added_p50_ms": result["lat_p50_ms"] - direct["lat_p50_ms"],
                     "added_p99_ms": result["lat_p99_ms"] - direct["lat_p99_ms"],
                     "added_ttfc_p50_ms": result["ttfc_p50_ms"] - direct["ttfc_p50_ms"],
                     "added_ttfc_p99_ms": result["ttfc_p99_ms"] - direct["ttfc_p99_ms"]}


def sanity(results: dict[str, Metrics], cfg: Config, warnings: list[str]) -> None:
    for name, m in results.items():
        noisy = {phase: m[f"others_{phase}_pct"] for phase in ("c64", "c1", "streams")
                 if m.get(f"others_{phase}_pct", 0) > 5}
        if noisy:
            worst = ", ".join(f"{phase} {pct:.0f}%" for phase, pct in noisy.items())
            warnings.append(f"{name}: other programs ran on CPUs {cfg.proxy_cpu},{cfg.load_cpu} (worst "
                            f"slice: {worst} of a CPU): the machine was not quiet, latency and TTFC suspect")
        if m["events_per_stream"] < cfg.events + 1:
            got, want = m["events_per_stream"], cfg.events + 1
            warnings.append(f"{name}: {got:.1f} events a stream, expected {want}")
        if name != "direct" and m["rps_c64"] > 0.8 * results["direct"]["rps_c64"]:
            warnings.append(f"{name}: c64 rate near the upstream's own: the load side may be the bottleneck")


# ---- report -----------------------------------------------------------------------------------------

# (key, label, decimals, take the ratio proxy ÷ floor)
ROWS = [
    ("rps_c64", "requests/s at c64", 0, True),
    ("cpu_us_per_req", "CPU µs per request (c64)", 1, True),
    ("lat_p50_ms", "latency p50 at c1, ms", 3, False),
    ("lat_p99_ms", "latency p99 at c1, ms", 3, False),
    ("added_p50_ms", "added latency p50 at c1, ms", 3, True),
    ("added_p99_ms", "added latency p99 at c1, ms", 3, True),
    ("ttfc_p50_ms", "stream TTFC p50, ms", 2, False),
    ("ttfc_p99_ms", "stream TTFC p99, ms", 2, False),
    ("added_ttfc_p50_ms", "added TTFC p50, ms", 2, True),
    ("added_ttfc_p99_ms", "added TTFC p99, ms", 2, True),
    ("cpu_us_per_event", "CPU µs per relayed event", 1, True),
    ("events", "events relayed", 0, False),
    ("events_per_stream", "events per stream", 1, False),
    ("rss_idle_mib", "RSS before streams, MiB", 1, False),
    ("rss_peak_streams_mib", "RSS peak with streams, MiB", 1, False),
    ("rss_per_stream_kib", "≈ RSS per open stream, KiB", 1, False),
    ("vm_hwm_mib", "peak RSS (VmHWM), MiB", 1, True),
    ("target_cpu_pct", "its own CPU % (c64)", 0, False),
    ("load_cpu_busy_pct", "load CPU busy % (c64)", 0, False),
    ("others_c64_pct", "not ours on the CPUs %, c64", 0, False),
    ("others_c1_pct", "not ours on the CPUs %, c1", 0, False),
    ("others_streams_pct", "not ours on the CPUs %, streams", 0, False),
    ("steal_pct", "hypervisor steal %, worst", 1, False),
]

# (what, value from (results, ratios), limit): the targets
TARGETS: list[tuple[str, Callable[[dict[str, Metrics], Metrics], float], float]] = [
    ("CPU per request, proxy ÷ floor ≤ 1.5", lambda _, ratio: ratio["cpu_us_per_req"], 1.5),
    ("added latency p50 at c1 ≤ 0.4 ms", lambda results, _: results["proxy"]["added_p50_ms"], 0.4),
    ("CPU per relayed event, proxy ÷ floor ≤ 1.3", lambda _, ratio: ratio["cpu_us_per_event"], 1.3),
]


def ratios(results: dict[str, Metrics]) -> Metrics:
    if "proxy" not in results or "floor" not in results:
        return {}
    p, f = results["proxy"], results["floor"]
    # a ratio to a floor value that is zero or negative (noise in a difference) would mean nothing
    return {key: p[key] / f[key] for key, _, _, ratio in ROWS if ratio and key in p and f.get(key, 0) > 0}


def cell(value: float | None, decimals: int) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:,.{decimals}f}"


def render(results: dict[str, Metrics], cfg: Config, warnings: list[str]) -> str:
    cols = [name for name in ("direct", "floor", "proxy") if name in results]
    ratio = ratios(results)
    head = f"{'metric':<30}" + "".join(f"{c:>12}" for c in cols) + (f"{'proxy÷floor':>13}" if ratio else "")
    lines = [f"signalbox overhead at {cfg.revision}: {cfg.duration} s per phase in {cfg.rounds} rounds; "
             f"proxy/floor on CPU {cfg.proxy_cpu}, wrk + upstream + stream client on CPU {cfg.load_cpu}; "
             f"{cfg.streams} streams of {cfg.events} events {cfg.interval_ms:g} ms apart",
             "", head, "-" * len(head)]
    for key, label, decimals, _ in ROWS:
        if any(key in results[c] for c in cols):
            row = f"{label:<30}" + "".join(f"{cell(results[c].get(key), decimals):>12}" for c in cols)
            lines.append(row + (f"{cell(ratio.get(key), 2):>13}" if ratio else ""))
    if ratio:
        lines.append("")
        for what, check, limit in TARGETS:
            value = check(results, ratio)
            lines.append(f"target: {what:<44} {value:6.2f}  {'ok' if value <= limit else 'MISSED'}")
    lines += [""] + [f"warning: {w}" for w in warnings]
    return "\n".join(lines).rstrip()


# ---- main -------------------------------------------------------------------------------------------


def run(cfg: Config, only: str, warnings: list[str]) -> dict[str, Metrics]:
    bench = Bench(cfg, ensure_wrk(), warnings=warnings)
    if only != "floor" and (missing := proxy_missing()):
        if only == "proxy":
            raise RuntimeError(missing)
        warnings.append(f"proxy skipped: {missing}")
        only = "floor"
    up_port, floor_port, proxy_port = free_port(), free_port(), free_port()
    py = sys.executable
    with ExitStack() as stack:
        upstream = stack.enter_context(running(
            "upstream", [py, str(BENCH / "fast_upstream.py"), "--port", str(up_port), "--events",
                         str(cfg.events), "--interval-ms", str(cfg.interval_ms)], cfg.load_cpu, up_port, cfg))
        targets = [Target("direct", upstream.url)]
        if only in ("floor", "both"):
            cmd = [py, str(BENCH / "floor.py"), "--port", str(floor_port), "--upstream",
                   f"http://127.0.0.1:{up_port}"]
            targets.append(stack.enter_context(running("floor", cmd, cfg.proxy_cpu, floor_port, cfg)))
        if only in ("proxy", "both"):
            cmd = proxy_command(write_policy(cfg.tmp / "policies", up_port), proxy_port, free_port(),
                                cfg.proxy_args)
            targets.append(stack.enter_context(running("proxy", cmd, cfg.proxy_cpu, proxy_port, cfg)))
        bench.pids = [t.pid for t in (upstream, *targets) if t.pid]
        phases = (("c64 throughput", throughput), ("c1 latency", latency), ("streams", streaming))
        for phase, measure in phases:
            print(f"{phase}: {', '.join(t.name for t in targets)} ...", file=sys.stderr, flush=True)
            measure(targets, bench)
        results = {t.name: metrics(t, cfg) for t in targets}
    direct = results["direct"]
    results = {name: m if name == "direct" else add_deltas(m, direct) for name, m in results.items()}
    sanity(results, cfg, warnings)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=10, help="seconds per phase and target (default 10)")
    parser.add_argument("--rounds", type=int, default=2, help="split each phase into alternating rounds")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up seconds before a phase (0: none)")
    parser.add_argument("--only", choices=("floor", "proxy", "both"), default="both")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    parser.add_argument("--proxy-cpu", type=int, default=0, help="CPU for the proxy and the floor")
    parser.add_argument("--load-cpu", type=int, default=1, help="CPU for wrk, upstream, stream client")
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--events", type=int, default=50)
    parser.add_argument("--interval-ms", type=float, default=20.0)
    parser.add_argument("--max-noise", type=float, default=10.0,
                        help="redo a slice when other programs used more than this %% of a CPU (default 10)")
    parser.add_argument("--retries", type=int, default=2, help="redos of a noisy slice (default 2)")
    parser.add_argument("--proxy-arg", action="append", default=[],
                        help="extra flag for `signalbox serve`, e.g. --proxy-arg=--no-access-log")
    args = parser.parse_args()
    if shutil.which("taskset") is None:
        sys.exit("taskset is missing (util-linux)")
    if (os.cpu_count() or 1) < 2 or args.proxy_cpu == args.load_cpu:
        print("warning: proxy and load share a CPU; the numbers mix both", file=sys.stderr)
    os.sched_setaffinity(0, {args.load_cpu})  # keep this process off the proxy's CPU
    # Ctrl-C and SIGTERM unwind through the finally blocks that stop every process we started
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    warnings: list[str] = []
    with tempfile.TemporaryDirectory(prefix="signalbox-bench-") as tmp:
        cfg = Config(args.duration, max(args.rounds, 1), args.warmup, args.proxy_cpu, args.load_cpu,
                     args.streams, args.events, args.interval_ms, tuple(args.proxy_arg), args.max_noise,
                     args.retries, revision(), Path(tmp))
        try:
            results = run(cfg, args.only, warnings)
        except RuntimeError as exc:
            sys.exit(f"benchmark failed: {exc}")
    if args.json:
        config = {k: v for k, v in vars(args).items() if k != "json"} | {"revision": cfg.revision}
        print(json.dumps({"config": config, "results": results,
                          "ratios": ratios(results), "warnings": warnings}, indent=2))
    else:
        print(render(results, cfg, warnings))


if __name__ == "__main__":
    main()
