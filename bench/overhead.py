"""Overhead benchmark: the proxy against a bare aiohttp forwarder (the floor), same upstream, same load.

Starts bench/fast_upstream.py, the floor and the proxy twice (a `minimal` policy with no limits and a
`full` one with every kind of limit and a queue, bench/overhead_policies.py) pinned apart with taskset,
measures them in alternating rounds, and prints throughput, added latency, CPU per request, stream TTFC
and CPU per relayed event side by side; with --runs N, each run and the median and spread of the ratios.
Run: .venv/bin/python bench/overhead.py [--duration 10] [--runs 3] [--only floor] [--json] [--tracing]
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
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TypeVar

import overhead_tracing
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
from overhead_policies import API_KEY, POLICIES, write_policy
from overhead_report import Metrics, add_deltas, ratios, render, render_summary, sanity, summary_json

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
CHAT_PATH = "/v1/chat/completions"
PHASES = ("c64", "c1", "streams")
R = TypeVar("R")
Env = dict[str, str] | None


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
    policies: tuple[str, ...]  # one proxy target per policy (overhead_policies.py)
    phases: tuple[str, ...]  # of PHASES
    tracing: bool = False  # also the `traced` target

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


def proxy_command(policies: Path, port: int, admin_port: int, extra: tuple[str, ...]) -> list[str]:
    return [*signalbox(), "serve", "--policies", str(policies), "--host", "127.0.0.1", "--port", str(port),
            "--admin-port", str(admin_port), "--shutdown-grace", "0", *extra]


@contextmanager
def running(name: str, cmd: list[str], cpu: int, port: int, cfg: Config, env: Env = None) -> Iterator[Target]:
    """Run one pinned server for the length of the block; always stop it (by PID) afterwards."""
    log = cfg.tmp / f"{name}.log"
    proc = start_pinned(cmd, cpu, log, env=env, cwd=REPO)
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
           "load_cpu_busy_pct": mean(t.load_busy_pct), "steal_pct": max(t.steal_pct, default=math.nan)}
    out |= {f"others_{phase}_pct": max(values) for phase, values in t.others_pct.items()}
    if t.streams:  # the stream phase ran
        out |= {"events": t.events, "events_per_stream": div(t.events, t.streams)}
    if t.pid:
        out |= {"cpu_us_per_req": div(t.cpu_s, t.requests, 1e6),
                "cpu_us_per_event": div(t.stream_cpu_s, t.events, 1e6),
                "target_cpu_pct": div(t.cpu_s, t.seconds, 100), "vm_hwm_mib": vm_kib(t.pid, "VmHWM") / 1024}
    if t.pid and t.streams:  # the stream phase ran
        out |= {"rss_idle_mib": t.rss_idle_kib / 1024, "rss_peak_streams_mib": t.rss_peak_kib / 1024,
                "rss_per_stream_kib": (t.rss_peak_kib - t.rss_idle_kib) / cfg.streams}
    return out


# ---- main -------------------------------------------------------------------------------------------


def run(cfg: Config, only: str, warnings: list[str]) -> dict[str, Metrics]:
    bench = Bench(cfg, ensure_wrk(), warnings=warnings)
    if only != "floor" and (missing := proxy_missing()):
        if only == "proxy":
            raise RuntimeError(missing)
        warnings.append(f"proxy skipped: {missing}")
        only = "floor"
    up_port, floor_port = free_port(), free_port()
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
        for policy in cfg.policies if only in ("proxy", "both") else ():
            port = free_port()  # one proxy per policy, all up for the whole run, loaded one at a time
            cmd = proxy_command(write_policy(cfg.tmp / f"policies-{policy}", up_port, policy), port, free_port(),
                                cfg.proxy_args)
            targets.append(stack.enter_context(running(policy, cmd, cfg.proxy_cpu, port, cfg)))
        helpers = [upstream]
        if cfg.tracing and only in ("proxy", "both"):  # `minimal` again, tracing on, spans to a discarding collector
            col, port = free_port(), free_port()
            helpers.append(stack.enter_context(running("collector", overhead_tracing.collector_command(col),
                                                       cfg.load_cpu, col, cfg)))
            cmd = proxy_command(write_policy(cfg.tmp / "traced", up_port), port, free_port(), cfg.proxy_args)
            targets.append(stack.enter_context(running("traced", cmd, cfg.proxy_cpu, port, cfg,
                                                       overhead_tracing.traced_env(col))))
        bench.pids = [t.pid for t in (*helpers, *targets) if t.pid]
        phases = (("c64", "c64 throughput", throughput), ("c1", "c1 latency", latency),
                  ("streams", "streams", streaming))
        for key, phase, measure in phases:
            if key in cfg.phases:
                print(f"{phase}: {', '.join(t.name for t in targets)} ...", file=sys.stderr, flush=True)
                measure(targets, bench)
        results = {t.name: metrics(t, cfg) for t in targets}
    direct = results["direct"]
    results = {name: m if name == "direct" else add_deltas(m, direct) for name, m in results.items()}
    sanity(results, cfg.events, (cfg.proxy_cpu, cfg.load_cpu), warnings)
    return results


def header(cfg: Config, run_no: int, runs: int) -> str:
    which = f"run {run_no} of {runs} at" if runs > 1 else "at"
    streams = (f"; {cfg.streams} streams of {cfg.events} events {cfg.interval_ms:g} ms apart"
               if "streams" in cfg.phases else "")
    return (f"signalbox overhead {which} {cfg.revision}: {cfg.duration} s per phase in {cfg.rounds} rounds "
            f"({', '.join(cfg.phases)}); proxy/floor on CPU {cfg.proxy_cpu}, wrk + upstream + stream client "
            f"on CPU {cfg.load_cpu}{streams}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=10, help="seconds per phase and target (default 10)")
    parser.add_argument("--rounds", type=int, default=2, help="split each phase into alternating rounds")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up seconds before a phase (0: none)")
    parser.add_argument("--runs", type=int, default=1,
                        help="repeat the whole run (fresh processes); print each and the median and spread")
    parser.add_argument("--only", choices=("floor", "proxy", "both"), default="both")
    parser.add_argument("--policy", choices=(*POLICIES, "both"), default="both",
                        help="the proxy's policy: minimal (no limits), full (every limit and a queue), or both")
    parser.add_argument("--phase", action="append", choices=PHASES,
                        help="measure only this phase (repeatable; default: all three)")
    parser.add_argument("--tracing", action="store_true", help="add `traced`: minimal with OpenTelemetry on")
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
    policies = POLICIES if args.policy == "both" else (args.policy,)
    phases = tuple(p for p in PHASES if p in (args.phase or PHASES))
    runs: list[tuple[dict[str, Metrics], list[str]]] = []
    with tempfile.TemporaryDirectory(prefix="signalbox-bench-") as tmp:
        cfg = Config(args.duration, max(args.rounds, 1), args.warmup, args.proxy_cpu, args.load_cpu,
                     args.streams, args.events, args.interval_ms, tuple(args.proxy_arg), args.max_noise,
                     args.retries, revision(), Path(tmp), policies, phases, args.tracing)
        for i in range(max(args.runs, 1)):
            warnings: list[str] = []
            run_cfg = replace(cfg, tmp=cfg.tmp / f"run{i + 1}")
            run_cfg.tmp.mkdir()
            print(f"run {i + 1} of {max(args.runs, 1)}", file=sys.stderr, flush=True)
            try:
                runs.append((run(run_cfg, args.only, warnings), warnings))
            except RuntimeError as exc:
                sys.exit(f"benchmark failed: {exc}")
            if not args.json:  # each run as soon as it is done: a long series can be read as it goes
                print(render(runs[-1][0], header(cfg, i + 1, max(args.runs, 1)),
                             runs[-1][1]) + "\n", flush=True)
    all_results = [results for results, _ in runs]
    if args.json:
        config = {k: v for k, v in vars(args).items() if k != "json"} | {"revision": cfg.revision}
        print(json.dumps({"config": config,
                          "runs": [{"results": r, "ratios": ratios(r), "warnings": w} for r, w in runs],
                          "summary": summary_json(all_results)}, indent=2))
    elif len(runs) > 1:
        print(render_summary(all_results))


if __name__ == "__main__":
    main()
