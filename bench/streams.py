"""Stream benchmark: 1,000 concurrent SSE streams through the proxy (pass-through, OpenAI<-Anthropic
translated, the unified event stream over SSE, and resumable: events kept in memory, and in Redis Streams
when redis-server is installed)
against bench/floor.py and the upstream direct, all on loopback with pinned CPUs, in one run against the
same upstream. Each kind of relay is a target (`Case`, built in `relay_cases`): a new kind of stream is one
more target there, with its proxy process in `proxy_processes`.

The upstream is `signalbox mock` in its own process: 50 events 20 ms apart per stream, after a
--hold-ms wait for the first token so that a whole wave is open at once. The floor and the proxies run
on --proxy-cpu; the mock and the load client on --load-cpu. Two phases:
  scale    --streams (1,000) per wave: CPU µs per relayed event (utime+stime from /proc ÷ events the
           client received), peak RSS (VmHWM) and RSS per open stream (fresh processes, first wave);
  latency  --latency-streams (100) per wave, a load the load CPU can sustain: time to first token,
           p50/p99, and what each target adds to the upstream direct.
At 1,000 streams x 50 events/s the mock and the client saturate their one CPU, so scale-phase TTFT
measures the load side more than the target; the latency phase is the one to read TTFT from.
Every measured wave but a target's first big one follows an unmeasured wave of the same size (warm pools).
Run: .venv/bin/python bench/streams.py [--waves 2] [--latency-waves 4] [--profile scale|latency] [--no-redis] [--json]
(about 5 minutes; needs Linux, 2+ CPUs and taskset)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import uvloop
from common import (
    count_events,
    cpu_seconds,
    free_port,
    percentile,
    start_pinned,
    stop,
    tail,
    vm_kib,
    wait_port,
)

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
API_KEY = "sk-bench"
CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"
UNIFIED = "/signalbox/v1/stream"
"""The unified event stream (docs/apps/unified-stream.md): the same chat request, wrapped, answered as
unified events (text_delta ..., usage, stream_complete), one SSE block each like the relay's chunks.
Its WebSocket form is measured by bench/stream_unified.py."""
PROMPT = [{"role": "user", "content": "Count."}]
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---- the load client (its own process, pinned next to the mock) --------------------------------------


@dataclass
class Wave:
    streams: int = 0
    events: int = 0
    errors: int = 0
    seconds: float = 0.0
    ttft_ms: list[float] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)


async def _one(session: aiohttp.ClientSession, url: str, body: bytes, wave: Wave) -> None:
    started = time.perf_counter()
    headers = {
        "Authorization": f"Bearer {API_KEY}",
        "x-api-key": API_KEY,
        "Content-Type": "application/json",
        "anthropic-version": "2023-06-01",
    }
    async with session.post(url, data=body, headers=headers) as resp:
        if resp.status != 200:
            raise RuntimeError(f"status {resp.status}: {(await resp.read())[:200]!r}")
        first, events, rest = True, 0, b""
        async for chunk in resp.content.iter_any():
            if first and b"data:" in rest[-5:] + chunk:  # the first event; a `: ping` is no token
                wave.ttft_ms.append((time.perf_counter() - started) * 1000)
                first = False
            done, rest = count_events(rest, chunk)
            events += done
    wave.events += events
    wave.streams += 1


async def client_wave(url: str, model: str, streams: int, ramp_s: float) -> Wave:
    """Open `streams` streams spread over `ramp_s` seconds; read each to the end."""
    payload: dict[str, Any] = {"model": model, "messages": PROMPT, "stream": True, "max_tokens": 64}
    if url.endswith(UNIFIED):
        payload = {"path": CHAT, "body": payload}
    body = json.dumps(payload).encode()
    wave = Wave()

    async def start(i: int, session: aiohttp.ClientSession) -> None:
        await asyncio.sleep(ramp_s * i / streams)
        try:
            await asyncio.wait_for(_one(session, url, body, wave), timeout=60)
        except Exception as exc:  # count it and go on: one failed stream must not end the wave
            wave.errors += 1
            if len(wave.error_samples) < 5:
                wave.error_samples.append(f"{type(exc).__name__}: {exc}")

    started = time.monotonic()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as s:
        await asyncio.gather(*(start(i, s) for i in range(streams)))
    wave.seconds = time.monotonic() - started
    return wave


# ---- processes ------------------------------------------------------------------------------------------


def signalbox() -> list[str]:
    script = Path(sys.executable).with_name("signalbox")
    return [str(script)] if script.exists() else [sys.executable, "-m", "proxy"]


RESUMABLE = "{resumable: {buffer: 1MiB, ttl: 60s}}"
"""The resumable route's stream option: every event stamped with an id and kept for a resume."""


def write_policy(directory: Path, mock_port: int, redis_url: str | None = None) -> Path:
    """Three routes to the one mock: `bench-gpt` as an OpenAI upstream (pass-through), `bench-claude` as an
    Anthropic one (the client's chat request is translated to /v1/messages and the stream back), and
    `bench-gpt-resume`, the pass-through with resumable streams. With `redis_url`, the Redis state backend:
    the resumable route's events also go to Redis Streams."""
    path = directory / ("streams-redis.yaml" if redis_url else "streams.yaml")
    directory.mkdir(parents=True, exist_ok=True)
    state = f'state: {{backend: redis, url: "{redis_url}", key_prefix: bench-streams}}\n' if redis_url else ""
    path.write_text(f"""\
{state}upstreams:  # keep-alive as long as the floor's (30 s), so neither reconnects between waves
  oai: {{provider: openai, base_url: "http://127.0.0.1:{mock_port}/v1", api_key: unused,
        pool: {{keepalive: 30s}}}}
  claude: {{provider: anthropic, base_url: "http://127.0.0.1:{mock_port}/v1", api_key: unused,
           pool: {{keepalive: 30s}}}}
tenants:
  bench: {{keys: ["{API_KEY}"]}}
routes:
  - {{name: gpt, match: {{model: bench-gpt}}, upstream: oai}}
  - {{name: claude, match: {{model: bench-claude}}, upstream: claude}}
  - {{name: resume, match: {{model: bench-gpt-resume}}, upstream: oai, stream: {RESUMABLE}}}
""")
    return path


@contextmanager
def redis_running(tmp: Path, cpu: int) -> Iterator[Server | None]:
    """A throwaway redis-server (no persistence) on the load CPU, stopped by PID; None when not installed."""
    binary = shutil.which("redis-server")
    if binary is None:
        yield None
        return
    port = free_port()
    cmd = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
           "--dir", str(tmp)]
    proc = start_pinned(cmd, cpu, tmp / "redis.log")
    try:
        wait_port(port, proc)
        yield Server("redis", f"redis://127.0.0.1:{port}/0", proc.pid)
    finally:
        stop(proc)


@dataclass
class Server:
    name: str
    url: str
    pid: int | None  # None: the direct target (the mock's own CPU is not the subject)


@contextmanager
def running(name: str, cmd: list[str], cpu: int, port: int, tmp: Path) -> Iterator[Server]:
    log = tmp / f"{name}.log"
    proc = start_pinned(cmd, cpu, log, cwd=REPO)
    try:
        try:
            wait_port(port, proc)
        except RuntimeError as exc:
            raise RuntimeError(f"{name} did not start: {exc}\n--- {log} ---\n{tail(log)}") from exc
        yield Server(name, f"http://127.0.0.1:{port}", proc.pid)
    finally:
        stop(proc, grace_s=10)


def mock_stats(mock: str, reset: bool = False) -> dict[str, Any]:
    req = urllib.request.Request(
        mock + ("/mock/stats/reset" if reset else "/mock/stats"), method="POST" if reset else "GET"
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        stats: dict[str, Any] = json.loads(resp.read())
        return stats


def cpu_busy(cpu: int) -> tuple[float, float]:
    """(busy, total) jiffies of one CPU since boot, from /proc/stat (idle and iowait are not busy)."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{cpu} "):
            values = [int(v) for v in line.split()[1:8]]
            return sum(values) - values[3] - values[4], sum(values)
    raise RuntimeError(f"cpu{cpu} not in /proc/stat")


def task_seconds() -> float:
    """Seconds all CPUs spent running tasks (user + nice + system) since boot."""
    user, nice, system = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:4]
    return (int(user) + int(nice) + int(system)) / CLK_TCK


def ours_seconds(pids: list[int]) -> float:
    """CPU time of our long-lived processes, this one, and our children already waited for."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return sum(cpu_seconds(p) for p in pids) + me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def busy_percent(before: tuple[float, float], after: tuple[float, float]) -> float:
    total = after[1] - before[1]
    return 100.0 * (after[0] - before[0]) / total if total else 0.0


# ---- measuring ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    server: Server
    path: str
    model: str
    relays: bool = True
    """False for the direct baselines: no process of ours in between to measure."""


@dataclass
class Result:
    name: str
    waves: int = 0
    streams: int = 0
    events: int = 0
    errors: int = 0
    cpu_s: float = 0.0
    ttft_ms: list[float] = field(default_factory=list)
    peak_open: int = 0
    rss_base_kib: int = 0
    rss_peak_kib: int = 0
    hwm_kib: int = 0
    load_busy_pct: list[float] = field(default_factory=list)
    others_pct: list[float] = field(default_factory=list)
    """CPU used by programs not ours during the waves, in % of one CPU: their work skews every number."""
    retried: int = 0
    """Waves measured again because other programs were busy."""
    error_samples: list[str] = field(default_factory=list)

    @property
    def us_per_event(self) -> float:
        return 1e6 * self.cpu_s / self.events if self.events else float("nan")

    @property
    def kib_per_stream(self) -> float:
        return (self.rss_peak_kib - self.rss_base_kib) / self.peak_open if self.peak_open else float("nan")


def run_wave(
    case: Case,
    streams: int,
    ramp: float,
    args: argparse.Namespace,
    tmp: Path,
    mock: str,
    res: Result,
    ours: list[int],
    profile: Path | None = None,
) -> None:
    """One wave in a pinned client process; samples the target's RSS while the wave runs."""
    log = tmp / f"client-{case.name}.log"
    log.write_bytes(b"")
    cmd = [
        sys.executable,
        __file__,
        "--client",
        "--url",
        case.server.url + case.path,
        "--model",
        case.model,
        "--streams",
        str(streams),
        "--ramp",
        str(ramp),
    ]
    pid = case.server.pid
    mock_stats(mock, reset=True)
    rss_before = vm_kib(pid, "VmRSS") if pid else 0
    cpu_before = cpu_seconds(pid) if pid else 0.0
    load_before = cpu_busy(args.load_cpu)
    wall, tasks, mine = time.monotonic(), task_seconds(), ours_seconds(ours)
    spy = None
    if profile is not None and pid:
        spy = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("py-spy")),
                "record",
                "--pid",
                str(pid),
                "--rate",
                "1000",
                "--format",
                "raw",
                "--output",
                str(profile),
                "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    proc = start_pinned(cmd, args.load_cpu, log)
    peak = rss_before
    try:
        deadline = time.monotonic() + 180
        while proc.poll() is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the {case.name} wave overran its time bound")
            if pid:
                peak = max(peak, vm_kib(pid, "VmRSS"))
            time.sleep(0.05)
    finally:
        stop(proc)
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its profile on SIGINT
            try:
                spy.wait(30)
            except subprocess.TimeoutExpired:
                stop(spy)
    cpu_used = (cpu_seconds(pid) - cpu_before) if pid else 0.0
    res.load_busy_pct.append(busy_percent(load_before, cpu_busy(args.load_cpu)))
    others = (task_seconds() - tasks) - (ours_seconds(ours) - mine)
    res.others_pct.append(max(0.0, 100 * others / (time.monotonic() - wall)))
    line = next((x for x in log.read_text().splitlines() if x.startswith("BENCH_JSON ")), None)
    if line is None:
        raise RuntimeError(f"the {case.name} client printed no result:\n{tail(log)}")
    wave = Wave(**json.loads(line.removeprefix("BENCH_JSON ")))
    open_streams = int(mock_stats(mock)["max_in_flight"])
    if res.waves == 0 and pid:  # the first big wave on a fresh process: the honest memory number
        res.rss_base_kib, res.rss_peak_kib, res.peak_open = rss_before, peak, open_streams
    res.waves += 1
    res.streams += wave.streams
    res.events += wave.events
    res.errors += wave.errors
    res.error_samples += wave.error_samples[: 5 - len(res.error_samples)]
    res.cpu_s += cpu_used
    res.ttft_ms += wave.ttft_ms
    res.hwm_kib = vm_kib(pid, "VmHWM") if pid else 0


def quiet_wave(
    case: Case,
    streams: int,
    args: argparse.Namespace,
    tmp: Path,
    mock: str,
    res: Result,
    ours: list[int],
    profile: Path | None = None,
    prime: bool = True,
) -> None:
    """One wave, run again (up to --retries times) while other programs used more than --max-others % of
    a CPU during it: the machine may be shared, and their work skews CPU and latency alike. Memory is
    taken from the first attempt, the only one on a fresh process.

    `prime`: an unmeasured wave of the same size first, so the target's upstream pool holds as many warm
    connections as the wave needs, whatever its keep-alive and however long ago its last wave was."""
    if prime and case.relays:
        run_wave(case, streams, args.ramp, args, tmp, mock, Result("prime"), ours)
    for attempt in range(args.retries + 1):
        scratch = Result(case.name)
        run_wave(case, streams, args.ramp, args, tmp, mock, scratch, ours, profile if attempt == 0 else None)
        if res.waves == 0 and not res.peak_open:
            res.rss_base_kib, res.rss_peak_kib, res.peak_open = (
                scratch.rss_base_kib,
                scratch.rss_peak_kib,
                scratch.peak_open,
            )
        if scratch.others_pct[-1] <= args.max_others or attempt == args.retries:
            break
        res.retried += 1
    res.waves += 1
    res.streams += scratch.streams
    res.events += scratch.events
    res.errors += scratch.errors
    res.error_samples += scratch.error_samples[: 5 - len(res.error_samples)]
    res.cpu_s += scratch.cpu_s
    res.ttft_ms += scratch.ttft_ms
    res.hwm_kib = scratch.hwm_kib
    res.load_busy_pct += scratch.load_busy_pct
    res.others_pct += scratch.others_pct


def abba(cases: list[Case], waves: int) -> Iterator[Case]:
    for i in range(waves):
        yield from (cases if i % 2 == 0 else reversed(cases))  # slow drift of the machine hits every target


def table(title: str, results: dict[str, Result], cases: list[Case], memory: bool, max_others: float) -> None:
    def p(r: Result, q: float) -> float:
        return percentile(r.ttft_ms, q)

    direct = {CHAT: results["direct-chat"], MESSAGES: results["direct-messages"]}
    floor_us = results["floor"].us_per_event
    busy = max(max(r.load_busy_pct) for r in results.values())
    others = max(max(r.others_pct) for r in results.values())
    retried = sum(r.retried for r in results.values())
    print(
        f"\n{title} (load CPU busy up to {busy:.0f}%; programs not ours used up to {others:.0f}% of a CPU; "
        f"{retried} wave(s) rerun because of them)"
    )
    if others > max_others:
        print("  WARNING: other programs were busy on these CPUs; rerun on a quiet machine for clean numbers")
    print(
        f"{'target':<17}{'streams':>8}{'err':>5}{'events':>9}{'ttft p50':>10}{'p99':>8}"
        f"{'added p50':>11}{'p99':>8}"
        f"{'cpu us/ev':>10}{'vs floor':>9}"
        + (f"{'peak RSS':>10}{'open':>6}{'KiB/strm':>9}" if memory else "")
    )
    for case in cases:
        r = results[case.name]
        d = direct[MESSAGES if case.model == "bench-claude" else CHAT]
        row = f"{case.name:<17}{r.streams:>8}{r.errors:>5}{r.events:>9}{p(r, 50):>10.1f}{p(r, 99):>8.1f}"
        if case.relays:
            row += f"{p(r, 50) - p(d, 50):>11.1f}{p(r, 99) - p(d, 99):>8.1f}"
            row += f"{r.us_per_event:>10.1f}{r.us_per_event / floor_us:>8.2f}x"
            if memory:
                row += f"{r.hwm_kib / 1024:>8.1f}Mi{r.peak_open:>6}{r.kib_per_stream:>9.1f}"
        print(row)
        for sample in r.error_samples:
            print(f"    error: {sample}")


def summarise_profile(path: Path, top: int = 22) -> None:
    """Self time by function from py-spy's collapsed stacks, and time under a few frames of interest."""
    if not path.exists():
        print(f"  (no profile at {path}; py-spy missing or not permitted)")
        return
    own: dict[str, int] = {}
    under: dict[str, int] = {}
    total = 0
    marks = (
        "pump",
        "frame",
        "write",
        "feed",
        "translate",
        "_watchdog",
        "_served",  # every proxy request (the exact LLM paths skip proxy_handler)
        "handle",
        "send_once",
        "respond",
        "record",
        "client_headers",
        "upstream_headers",
        "iter_any",
        "_request",
        "data_received",
        "prepare",
    )
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        leaf = frames[-1].split(" (")[0]
        own[leaf] = own.get(leaf, 0) + n
        seen = {f.split(" (")[0] for f in frames}
        for name in marks:
            if name in seen:
                under[name] = under.get(name, 0) + n
    print(f"  {total} samples; self time, top {top}:")
    for name, n in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        print(f"    {100 * n / total:5.1f}%  {name}")
    print("  inclusive time under:")
    for name, n in sorted(under.items(), key=lambda kv: -kv[1]):
        print(f"    {100 * n / total:5.1f}%  {name}")


def proxy_processes(
    stack: ExitStack, tmp: Path, args: argparse.Namespace, mock_port: int, redis_url: str | None
) -> dict[str, Server]:
    """One `signalbox serve` per relay kind, so each memory reading starts fresh: `pass` and `tr` (plain
    relay), `unified` (the unified event stream over SSE), `resume` (resumable, events in memory),
    `resume-redis` (resumable, events in Redis Streams too)."""
    plain = write_policy(tmp, mock_port)
    policies = {"pass": plain, "tr": plain, "unified": plain, "resume": plain}
    if redis_url is not None:
        policies["resume-redis"] = write_policy(tmp, mock_port, redis_url)
    proxies = {}
    for name, policy in policies.items():
        port = free_port()
        cmd = [*signalbox(), "serve", "--policies", str(policy), "--port", str(port),
               "--admin-port", str(free_port()), "--shutdown-grace", "0", "--no-access-log"]
        proxies[name] = stack.enter_context(running("proxy-" + name, cmd, args.proxy_cpu, port, tmp))
    return proxies


def relay_cases(direct: Server, floor: Server, proxies: dict[str, Server]) -> list[Case]:
    """Every target of one run, all against the same upstream. The plain relay, pass-through and translated,
    is what the others are read against; another kind of stream (another endpoint or event model) is one
    more Case here, with its process in `proxy_processes`."""
    cases = [
        Case("direct-chat", direct, CHAT, "bench-gpt", relays=False),
        Case("direct-messages", direct, MESSAGES, "bench-claude", relays=False),
        Case("floor", floor, CHAT, "bench-gpt"),
        Case("proxy-pass", proxies["pass"], CHAT, "bench-gpt"),
        Case("proxy-translated", proxies["tr"], CHAT, "bench-claude"),
        Case("unified-sse", proxies["unified"], UNIFIED, "bench-gpt"),
        Case("resumable-memory", proxies["resume"], CHAT, "bench-gpt-resume"),
    ]
    if "resume-redis" in proxies:
        cases.append(Case("resumable-redis", proxies["resume-redis"], CHAT, "bench-gpt-resume"))
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=1000, help="streams per wave in the scale phase")
    parser.add_argument("--latency-streams", type=int, default=100, help="streams per wave, latency phase")
    parser.add_argument("--waves", type=int, default=2, help="scale waves per target (ABBA order)")
    parser.add_argument("--latency-waves", type=int, default=4, help="latency waves per target (ABBA order)")
    parser.add_argument("--ramp", type=float, default=1.0, help="seconds over which a wave's streams start")
    parser.add_argument("--hold-ms", type=float, default=2000, help="the mock's wait before the first token")
    parser.add_argument(
        "--max-others",
        type=float,
        default=10.0,
        help="retry a wave when programs not ours used more than this %% of a CPU during it",
    )
    parser.add_argument("--retries", type=int, default=3, help="at most this many retries per wave")
    parser.add_argument("--proxy-cpu", type=int, default=0)
    parser.add_argument("--load-cpu", type=int, default=1)
    parser.add_argument(
        "--profile",
        choices=("scale", "latency"),
        help="py-spy the floor and proxies: their first wave of that phase (py-spy: pip install py-spy)",
    )
    parser.add_argument("--no-redis", action="store_true", help="leave out the resumable relay on Redis")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="bench-gpt", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        wave = uvloop.run(client_wave(args.url, args.model, args.streams, args.ramp))
        sys.stdout.write("BENCH_JSON " + json.dumps(asdict(wave)) + "\n")
        return
    ports = {name: free_port() for name in ("mock", "floor")}
    with tempfile.TemporaryDirectory(prefix="signalbox-streams-") as tmpdir, ExitStack() as stack:
        tmp = Path(tmpdir)
        mock_cmd = [
            *signalbox(),
            "mock",
            "--port",
            str(ports["mock"]),
            "--token-delay-ms",
            "20",
            "--output-tokens",
            "48",
            "--ttft-ms",
            str(args.hold_ms),
        ]
        mock = stack.enter_context(running("mock", mock_cmd, args.load_cpu, ports["mock"], tmp))
        floor_cmd = [
            sys.executable,
            str(BENCH / "floor.py"),
            "--port",
            str(ports["floor"]),
            "--upstream",
            mock.url,
        ]
        floor = stack.enter_context(running("floor", floor_cmd, args.proxy_cpu, ports["floor"], tmp))
        redis = None if args.no_redis else stack.enter_context(redis_running(tmp, args.load_cpu))
        proxies = proxy_processes(stack, tmp, args, ports["mock"], redis.url if redis is not None else None)
        helpers = (mock.pid, floor.pid, redis.pid if redis is not None else None)
        ours = [p for p in (*helpers, *(x.pid for x in proxies.values())) if p is not None]
        cases = relay_cases(Server("direct", mock.url, None), floor, proxies)
        for case in cases:  # imports, pools and caches in place before the baseline RSS
            run_wave(case, 20, 0.1, args, tmp, mock.url, Result("warmup"), ours)
        profiles: dict[str, Path] = {}

        def spy(case: Case, phase: str) -> Path | None:
            if args.profile != phase or not case.relays or case.name in profiles:
                return None
            profiles[case.name] = tmp / f"profile-{case.name}.txt"
            return profiles[case.name]

        scale = {c.name: Result(c.name) for c in cases}
        for case in abba(cases, args.waves):
            first = scale[case.name].waves == 0  # measured cold: the memory reading wants a fresh process
            quiet_wave(
                case, args.streams, args, tmp, mock.url, scale[case.name], ours, spy(case, "scale"), not first
            )
        latency = {c.name: Result(c.name) for c in cases}
        for case in abba(cases, args.latency_waves):
            quiet_wave(
                case,
                args.latency_streams,
                args,
                tmp,
                mock.url,
                latency[case.name],
                ours,
                spy(case, "latency"),
            )
        if args.json:
            print(
                json.dumps(
                    {
                        phase: {
                            n: {
                                **asdict(r),
                                "ttft_ms": None,
                                "ttft_p50_ms": percentile(r.ttft_ms, 50),
                                "ttft_p99_ms": percentile(r.ttft_ms, 99),
                                "us_per_event": r.us_per_event,
                                "kib_per_stream": r.kib_per_stream,
                            }
                            for n, r in res.items()
                        }
                        for phase, res in (("scale", scale), ("latency", latency))
                    },
                    indent=2,
                )
            )
            return
        table(
            f"scale: {args.streams} concurrent streams x {args.waves} waves",
            scale,
            cases,
            memory=True,
            max_others=args.max_others,
        )
        table(
            f"latency: {args.latency_streams} concurrent streams x {args.latency_waves} waves",
            latency,
            cases,
            memory=False,
            max_others=args.max_others,
        )
        print(
            f"ttft includes the mock's {args.hold_ms:g} ms hold; added = target - direct to the same "
            "upstream "
            "endpoint (ms).\ncpu = the target process's utime+stime / events the client received; KiB/strm = "
            "(peak RSS - RSS before the first big wave) / peak open streams (the mock's max in flight).\n"
            "resumable-redis: the proxy's CPU only (redis-server runs on the load CPU; its own work is not counted)."
        )
        for name, path in profiles.items():
            print(f"\nprofile of {name} (first {args.profile} wave):")
            summarise_profile(path)


if __name__ == "__main__":
    main()
