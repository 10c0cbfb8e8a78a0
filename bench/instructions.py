"""Instructions per request of the floor and of the proxy (minimal and full policy), counted by callgrind.

Wall-clock CPU per request swings by ±10-20 % on a shared machine; an instruction count repeats within
about ±0.5 %, so it is what shows a cut of a few per cent. Each target runs under
`valgrind --tool=callgrind --instr-atstart=no` against `bench/fast_upstream.py`; after `--warmup` requests
the count is switched on (`callgrind_control -i on`), `--requests` go through one at a time on one
keep-alive connection (c1), the count is switched off and dumped. Prints instructions per request and each
proxy's ratio to the floor. Needs valgrind (Debian package `valgrind`). Slow: Python under callgrind runs
about 50 × slower, so 1,000 requests take a minute or two per target.

With `--connections 64` the requests go over 64 keep-alive connections at once (as overhead.py's c64
phase), which shows whether a cost grows with the number of requests in flight.

Run: .venv/bin/python bench/instructions.py [--requests 1000] [--warmup 300] [--only floor,minimal,full]
     [--connections 1] [--proxy-arg=--no-access-log] [--json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, free_port, signalbox, stop, tail, wait_port  # noqa: E402
from overhead_policies import API_KEY, write_policy  # noqa: E402

BODY = b'{"model":"bench-model","messages":[{"role":"user","content":"Say ok."}],"max_tokens":8}'
PATH = "/v1/chat/completions"
HERE = Path(__file__).resolve().parent
TARGETS = ("floor", "minimal", "full")


def send(port: int, count: int, connections: int = 1) -> None:
    """`count` requests over `connections` keep-alive connections, each sending one at a time as wrk does."""
    if connections > 1:
        share = [count // connections + (1 if i < count % connections else 0) for i in range(connections)]
        with ThreadPoolExecutor(max_workers=connections) as pool:
            for done in [pool.submit(send, port, n) for n in share if n]:
                done.result()
        return
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}
    try:
        for _ in range(count):
            conn.request("POST", PATH, body=BODY, headers=headers)
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                raise RuntimeError(f"status {resp.status}")
    finally:
        conn.close()


def command(target: str, port: int, upstream: int, tmp: Path, extra: list[str]) -> list[str]:
    if target == "floor":
        return [sys.executable, str(HERE / "floor.py"), "--port", str(port), "--upstream",
                f"http://127.0.0.1:{upstream}"]
    policies = write_policy(tmp / target, upstream, target)
    return [*signalbox(), "serve", "--policies", str(policies), "--host", "127.0.0.1", "--port", str(port),
            "--admin-port", str(free_port()), "--shutdown-grace", "0", *extra]


def totals(out: Path) -> int:
    """The Ir total of a callgrind dump (its 'totals:' line; 'summary:' is 0 in a dump asked for by -d)."""
    text = out.read_text()
    found = re.search(r"^totals:\s+(\d+)", text, re.MULTILINE)
    if not found:
        raise RuntimeError(f"no totals in {out}")
    return int(found.group(1))


def count(target: str, upstream: int, tmp: Path, args: argparse.Namespace) -> float:
    """Instructions per request of one target, counted over args.requests requests after a warm-up."""
    port = free_port()
    out = tmp / f"{target}.callgrind"
    log = tmp / f"{target}.log"
    cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
           *command(target, port, upstream, tmp, args.proxy_arg)]
    with log.open("ab") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=REPO, start_new_session=True)
    try:
        try:
            wait_port(port, proc, timeout_s=180)
        except RuntimeError as exc:
            raise RuntimeError(f"{target} did not start: {exc}\n{tail(log)}") from exc
        send(port, args.warmup, args.connections)
        control = ["callgrind_control", str(proc.pid)]
        subprocess.run([*control[:1], "-i", "on", *control[1:]], check=True, capture_output=True)
        started = time.monotonic()
        send(port, args.requests, args.connections)
        subprocess.run([*control[:1], "-i", "off", *control[1:]], check=True, capture_output=True)
        subprocess.run([*control[:1], "-d", *control[1:]], check=True, capture_output=True)
        print(f"  {target}: {args.requests} requests in {time.monotonic() - started:.0f} s", file=sys.stderr)
        dumps = sorted(tmp.glob(f"{target}.callgrind*"), key=lambda p: p.stat().st_mtime)
        return sum(totals(d) for d in dumps if d.stat().st_size) / args.requests
    finally:
        stop(proc, grace_s=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--only", default=",".join(TARGETS), help="comma-separated: floor, minimal, full")
    parser.add_argument("--proxy-arg", action="append", default=[], help="extra flag for `signalbox serve`")
    parser.add_argument("--connections", type=int, default=1,
                        help="concurrent keep-alive connections (64 is overhead.py's c64 phase)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not shutil.which("valgrind") or not shutil.which("callgrind_control"):
        sys.exit("needs valgrind and callgrind_control (Debian package valgrind)")
    targets = [t for t in args.only.split(",") if t]
    with tempfile.TemporaryDirectory(prefix="sb-instr-") as name:
        tmp = Path(name)
        upstream_port = free_port()
        with (tmp / "upstream.log").open("ab") as sink:
            upstream = subprocess.Popen([sys.executable, str(HERE / "fast_upstream.py"), "--port", str(upstream_port)],
                                        stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True)
        try:
            wait_port(upstream_port, upstream)
            result = {t: count(t, upstream_port, tmp, args) for t in targets}
        finally:
            stop(upstream)
    floor = result.get("floor")
    if args.json:
        print(json.dumps({"requests": args.requests, "connections": args.connections,
                          "instructions_per_request": result}))
        return
    print(f"instructions per request, c{args.connections}, {args.requests} requests after {args.warmup} of warm-up")
    for t, value in result.items():
        ratio = f"  {value / floor:.3f} × floor" if floor and t != "floor" else ""
        print(f"  {t:8s} {value / 1000:9.1f}k{ratio}")


if __name__ == "__main__":
    main()
