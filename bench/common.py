"""Shared helpers for the overhead benchmark: pinned processes, /proc readings, the load generators.

Run as a script it is the streaming load client (meant to be pinned to the load CPU):
  python bench/common.py --url URL --streams 200 --duration 10   → one JSON line on stdout
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import resource
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import uvloop

CLK_TCK = os.sysconf("SC_CLK_TCK")
STREAM_BODY = (
    b'{"model":"bench-model","messages":[{"role":"user","content":"Count."}],"stream":true,"max_tokens":64}'
)


# ---- processes -------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_pinned(cmd: Sequence[str], cpu: int, log: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """Start cmd pinned to one CPU (taskset execs, so the PID is the program's own), output to log."""
    with log.open("ab") as out:
        return subprocess.Popen(["taskset", "-c", str(cpu), *cmd], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, cwd=cwd, start_new_session=True)


def stop(proc: subprocess.Popen[bytes], grace_s: float = 5.0) -> None:
    """Terminate one process we started, by PID; kill it if it does not go within the grace period."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(grace_s)


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 15.0) -> None:
    """Wait until something listens on 127.0.0.1:port; fail early if proc died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process {proc.pid} exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listened on port {port} within {timeout_s:.0f} s")


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def ensure_wrk() -> str:
    """Find wrk; install it from Debian when running as root; otherwise say how to get it."""
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() != 0:
        sys.exit("wrk is not installed: run `make bench` (it installs wrk), or `apt-get install -y wrk`")
    print("installing wrk with apt-get ...", file=sys.stderr)
    if _apt("install", "-y", "wrk") != 0:
        _apt("update")  # the package lists may be missing or stale
        _apt("install", "-y", "wrk")
    return shutil.which("wrk") or sys.exit("could not install wrk: try `apt-get update; apt-get install wrk`")


def _apt(*args: str) -> int:
    quiet = subprocess.DEVNULL
    return subprocess.run(["apt-get", *args], stdout=quiet, stderr=quiet, check=False).returncode


def probe(url: str, api_key: str, timeout_s: float = 15.0) -> None:
    """POST one chat completion until it answers 200 (the target is ready), or fail with the reason."""
    body = b'{"model":"bench-model","messages":[{"role":"user","content":"hi"}]}'
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {api_key}"}
    deadline, last = time.monotonic() + timeout_s, ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, body, headers), timeout=5) as resp:
                if resp.status == 200:
                    return
                last = f"status {resp.status}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.2)
    raise RuntimeError(f"{url} never answered 200: {last}")


# ---- the proxy and the repository --------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent


def signalbox() -> list[str]:
    """The console script next to this Python if installed, else `python -m proxy` from the repo."""
    script = Path(sys.executable).with_name("signalbox")
    return [str(script)] if script.exists() else [sys.executable, "-m", "proxy"]


def proxy_missing() -> str | None:
    """None if `signalbox serve` looks usable, else why not."""
    try:
        out = subprocess.run([*signalbox(), "--help"], capture_output=True, timeout=30, cwd=REPO, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"signalbox did not run: {exc}"
    if out.returncode != 0 or b"serve" not in out.stdout + out.stderr:
        return "`signalbox --help` failed or lists no `serve` command"
    return None


def revision() -> str:
    """The commit being measured, `+dirty` when proxy/ has uncommitted changes (read-only git)."""
    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10,
                              check=False)

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("diff", "--quiet", "HEAD", "--", "proxy").returncode != 0
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty else "") if head.returncode == 0 else "unknown"


# ---- /proc -----------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads), in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()  # the command name may hold spaces; skip past it
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of proc(5)


def cpu_task_seconds(cpus: Sequence[int], columns: Sequence[int] = (0, 1, 2)) -> float:
    """Seconds the given CPUs spent in the given /proc/stat columns since boot: by default running
    tasks (user, nice, system); (7,) is steal, time the hypervisor gave our virtual CPU to others."""
    wanted, total = {f"cpu{c}" for c in cpus}, 0
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name in wanted:
            total += sum(int(values[i]) for i in columns)
    return total / CLK_TCK


def own_cpu_seconds() -> float:
    """CPU time of this process and of its children that have been waited for (wrk, the stream client)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def vm_kib(pid: int, key: str) -> int:
    """A VmRSS / VmHWM style field of /proc/<pid>/status, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/{pid}/status")


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of unsorted values; nan for none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = min(len(ordered), max(1, math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


# ---- load generators (each a separate process pinned to the load CPU) ----------------------------------


def _bench_json(text: str) -> dict[str, Any] | None:
    for line in text.splitlines():
        if line.startswith("BENCH_JSON "):
            result: dict[str, Any] = json.loads(line.removeprefix("BENCH_JSON "))
            return result
    return None


def run_wrk(wrk: str, url: str, connections: int, seconds: int, cpu: int, api_key: str) -> dict[str, Any]:
    """One wrk run (one thread) with bench/post.lua; its summary and latency percentiles in µs."""
    cmd = ["taskset", "-c", str(cpu), wrk, "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s",
           "-s", str(Path(__file__).with_name("post.lua")), url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30, check=False,
                         start_new_session=True, env={**os.environ, "BENCH_API_KEY": api_key})
    result = _bench_json(out.stdout)
    if result is None:
        raise RuntimeError(f"wrk printed no result (exit {out.returncode}): {out.stderr or out.stdout}")
    return result


def run_streams(url: str, streams: int, seconds: float, cpu: int, log: Path, api_key: str,
                on_tick: Callable[[], None]) -> dict[str, Any]:
    """This file's stream client in its own pinned process; on_tick runs every 0.2 s meanwhile."""
    cmd = [sys.executable, __file__, "--url", url, "--streams", str(streams), "--duration", str(seconds),
           "--api-key", api_key]
    log.write_bytes(b"")
    proc = start_pinned(cmd, cpu, log)
    try:
        deadline = time.monotonic() + seconds + 60
        while proc.poll() is None:
            if time.monotonic() > deadline:
                raise RuntimeError("the stream client overran its time bound")
            on_tick()
            time.sleep(0.2)
    finally:
        stop(proc)
    result = _bench_json(log.read_text())
    if result is None:
        raise RuntimeError(f"stream client printed no result:\n{tail(log)}")
    return result


# ---- the streaming load client ---------------------------------------------------------------------


@dataclass
class StreamStats:
    streams: int = 0
    events: int = 0
    errors: int = 0
    elapsed_s: float = 0.0
    ttfc_ms: list[float] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)


def count_events(buffer: bytes, chunk: bytes) -> tuple[int, bytes]:
    """Count SSE events completed by chunk (blank-line boundaries); return (count, unfinished tail)."""
    data = (buffer + chunk).replace(b"\r\n", b"\n")
    end = data.rfind(b"\n\n")
    if end < 0:
        return 0, data
    return data.count(b"\n\n", 0, end + 2), data[end + 2:]


async def _one_stream(session: aiohttp.ClientSession, url: str, headers: dict[str, str],
                      stats: StreamStats) -> None:
    started = time.perf_counter()
    async with session.post(url, data=STREAM_BODY, headers=headers) as resp:
        if resp.status != 200:
            raise RuntimeError(f"status {resp.status}: {(await resp.read())[:200]!r}")
        first, events, rest = True, 0, b""
        async for chunk in resp.content.iter_any():
            if first and b"data:" in rest[-5:] + chunk:  # first data line; a ": ping" is no token
                stats.ttfc_ms.append((time.perf_counter() - started) * 1000)
                first = False
            done, rest = count_events(rest, chunk)
            events += done
    stats.events += events
    stats.streams += 1


async def _worker(session: aiohttp.ClientSession, url: str, headers: dict[str, str], delay_s: float,
                  deadline: float, stats: StreamStats) -> None:
    await asyncio.sleep(delay_s)  # stagger starts so the streams are not in lock-step
    while time.monotonic() < deadline:
        try:
            await asyncio.wait_for(_one_stream(session, url, headers, stats), timeout=30)
        except Exception as exc:  # count and go on: one failed stream must not end the run
            stats.errors += 1
            if len(stats.error_samples) < 5:
                stats.error_samples.append(f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(0.05)


async def stream_load(url: str, streams: int, duration_s: float, ramp_s: float, api_key: str) -> StreamStats:
    """Keep `streams` streams open for duration_s: each worker starts a new one when its last ends."""
    stats = StreamStats()
    headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=0)
    started = time.monotonic()
    deadline = started + ramp_s + duration_s
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as s:
        await asyncio.gather(*(_worker(s, url, headers, ramp_s * i / streams, deadline, stats)
                               for i in range(streams)))
    stats.elapsed_s = time.monotonic() - started
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description="streaming load client for bench/overhead.py")
    parser.add_argument("--url", required=True)
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--ramp", type=float, default=1.0, help="seconds over which the streams start")
    parser.add_argument("--api-key", default="sk-bench")
    args = parser.parse_args()
    stats = uvloop.run(stream_load(args.url, args.streams, args.duration, args.ramp, args.api_key))
    sys.stdout.write("BENCH_JSON " + json.dumps(asdict(stats)) + "\n")


if __name__ == "__main__":
    main()
