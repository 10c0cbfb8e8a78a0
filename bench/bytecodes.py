"""Python bytecodes executed per request, by function, in the floor and in `signalbox serve` (c1).

Instructions (`instructions.py`) say how much a request costs; this says where, in Python terms, and in
seconds rather than minutes. The server runs with a `sys.settrace` hook that counts `opcode` events per
code object, switched on by SIGUSR1 after `--warmup` requests and dumped by SIGUSR2 after `--requests`
more, one at a time on one keep-alive connection. The count is exact and repeats run to run (a few
bytecodes of jitter from the event loop's timers), and it is what the proxy's own Python code costs: at
this size of request one bytecode of ours is about 70-90 instructions end to end (C calls included).
It does not see C code (orjson, multidict, uvloop, the HTTP parser), so keep `instructions.py` for the
total. The access log is off unless `--access-log`: its line is mostly C (orjson) and its flush a
syscall.

Run: .venv/bin/python bench/bytecodes.py [--only floor,minimal,full] [--requests 1000] [--warmup 300]
     [--top 40] [--match proxy/] [--json FILE] [--access-log] [--proxy-arg=--flag]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, free_port, stop, tail, wait_port  # noqa: E402
from instructions import send  # noqa: E402
from overhead_policies import write_policy  # noqa: E402

HERE = Path(__file__).resolve().parent
TARGETS = ("floor", "minimal", "full")

# Runs inside the server process: counts bytecodes per (file, function) between SIGUSR1 and SIGUSR2.
_HOOK = """
import collections, json, signal, sys, threading
_counts = collections.Counter()
def _global(frame, event, arg):
    frame.f_trace_opcodes = True
    frame.f_trace_lines = False
    code = frame.f_code
    name = code.co_name
    if code.co_filename == "<string>" and "self" in frame.f_locals:  # dataclass-made: name the class
        name = type(frame.f_locals["self"]).__qualname__ + "." + name
    key = (code.co_filename, name)
    def _local(frame, event, arg):
        if event == "opcode":
            _counts[key] += 1
        return _local
    return _local
def _on(sig, frame):
    sys.settrace(_global)
    threading.settrace(_global)
def _off(sig, frame):
    sys.settrace(None)
    with open({out!r}, "w") as sink:
        json.dump([[f, n, c] for (f, n), c in _counts.items()], sink)
signal.signal(signal.SIGUSR1, _on)
signal.signal(signal.SIGUSR2, _off)
sys.argv = {argv!r}
{entry}
"""


def command(target: str, port: int, upstream: int, tmp: Path, extra: list[str]) -> tuple[list[str], str]:
    """The argv the server sees and the statement that starts it."""
    if target == "floor":
        argv = ["floor.py", "--port", str(port), "--upstream", f"http://127.0.0.1:{upstream}"]
        return argv, f"import runpy; runpy.run_path({str(HERE / 'floor.py')!r}, run_name='__main__')"
    policies = write_policy(tmp / target, upstream, target)
    argv = ["signalbox", "serve", "--policies", str(policies), "--host", "127.0.0.1", "--port", str(port),
            "--admin-port", str(free_port()), "--shutdown-grace", "0", *extra]
    return argv, "from proxy.cli import main; main()"


def count(target: str, upstream: int, tmp: Path, args: argparse.Namespace) -> dict[tuple[str, str], float]:
    """Bytecodes per request by (file, function) for one target."""
    port = free_port()
    out = tmp / f"{target}.json"
    argv, entry = command(target, port, upstream, tmp, args.proxy_arg)
    script = tmp / f"{target}_hook.py"
    script.write_text(_HOOK.format(out=str(out), argv=argv, entry=entry))
    log = tmp / f"{target}.log"
    with log.open("ab") as sink:
        proc = subprocess.Popen([sys.executable, str(script)], stdout=sink, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=REPO, start_new_session=True)
    try:
        try:
            wait_port(port, proc, timeout_s=60)
        except RuntimeError as exc:
            raise RuntimeError(f"{target} did not start: {exc}\n{tail(log)}") from exc
        send(port, args.warmup)
        os.kill(proc.pid, signal.SIGUSR1)
        time.sleep(0.3)  # the hook is installed by the loop's signal handler, between two requests
        send(port, args.requests)
        os.kill(proc.pid, signal.SIGUSR2)
        deadline = time.monotonic() + 30
        while not out.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.3)
        rows = json.loads(out.read_text())
    finally:
        stop(proc, grace_s=10)
    return {(f, n): c / args.requests for f, n, c in rows}


def short(filename: str) -> str:
    for marker in ("site-packages/", str(REPO) + "/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename.rsplit("/", 1)[-1]


def area(filename: str) -> str:
    name = short(filename)
    if name.startswith("proxy/"):
        return "proxy"
    return name.split("/", 1)[0] if "/" in name else "other"


def report(result: dict[str, dict[tuple[str, str], float]], args: argparse.Namespace) -> None:
    print(f"Python bytecodes per request, c1, {args.requests} requests after {args.warmup} of warm-up")
    for target, counts in result.items():
        areas: collections.Counter[str] = collections.Counter()
        for (f, _), c in counts.items():
            areas[area(f)] += c
        parts = ", ".join(f"{a} {c:.0f}" for a, c in areas.most_common(4))
        print(f"  {target:8s} {sum(counts.values()):8.0f}   ({parts})")
    for target, counts in result.items():
        rows = sorted(((c, short(f), n) for (f, n), c in counts.items() if args.match in short(f)), reverse=True)
        if not rows or not args.top:
            continue
        print(f"\n{target}: top {args.top} functions matching {args.match!r}")
        for c, f, n in rows[: args.top]:
            print(f"  {c:8.1f}  {f}:{n}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--only", default=",".join(TARGETS), help="comma-separated: floor, minimal, full")
    parser.add_argument("--top", type=int, default=0, help="list the N costliest functions per target")
    parser.add_argument("--match", default="proxy/", help="only functions whose file contains this")
    parser.add_argument("--proxy-arg", action="append", default=[], help="extra flag for `signalbox serve`")
    parser.add_argument("--access-log", action="store_true", help="keep the proxy's access log on")
    parser.add_argument("--json", type=Path, help="also write {target: {file:function: count}} here")
    args = parser.parse_args()
    if not args.access_log:
        args.proxy_arg.append("--no-access-log")
    with tempfile.TemporaryDirectory(prefix="sb-bytecodes-") as name:
        tmp = Path(name)
        upstream_port = free_port()
        with (tmp / "upstream.log").open("ab") as sink:
            upstream = subprocess.Popen([sys.executable, str(HERE / "fast_upstream.py"), "--port", str(upstream_port)],
                                        stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True)
        try:
            wait_port(upstream_port, upstream)
            result = {t: count(t, upstream_port, tmp, args) for t in args.only.split(",") if t}
        finally:
            stop(upstream)
    report(result, args)
    if args.json:
        args.json.write_text(json.dumps({t: {f"{short(f)}:{n}": c for (f, n), c in counts.items()}
                                         for t, counts in result.items()}, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
