"""Instructions per access-log line (`AccessLog.write`), in process, counted by callgrind.

Runs itself twice under `valgrind --tool=callgrind`: once writing no line and once `--lines` lines (a
full-policy request's shape: tenant, route, model, upstream, one attempt, dispatch and headers marks)
inside a running event loop, as the proxy writes them (PYTHONHASHSEED=0 in both: without it the same
code reads ±1k, with it ±0.8k); prints (total − baseline) ÷ lines. The Calls are made in both runs, so only the write
is counted. Needs valgrind (Debian package `valgrind`). The editable install wins over PYTHONPATH: to
compare with another version, put its `logging.py` in place for the run.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

MADE = 5_000


def _child(lines: int) -> None:
    from proxy.call import Attempt, Call
    from proxy.telemetry.logging import AccessLog

    def make() -> Call:
        call = Call(request_id="9f1c2e4b7a3d4e5f8a9b0c1d2e3f4a5b", plan=None,  # type: ignore[arg-type]
                    method="POST", path="/v1/chat/completions", protocol="openai",
                    started=time.perf_counter() - 0.0123)
        call.tenant = types.SimpleNamespace(name="team-a")  # type: ignore[assignment]
        call.route = types.SimpleNamespace(name="chat")  # type: ignore[assignment]
        call.model, call.upstream, call.status, call.outcome = "gpt-4o-mini", "openai-main", 200, "ok"
        call.bytes_out = 321
        call.marks = {"dispatch": 0.0011, "upstream_headers": 0.0093}
        call.attempts = [Attempt("openai-main", 200, 0.0081)]
        return call

    calls = [make() for _ in range(MADE)][:lines]
    log = AccessLog(io.BytesIO())

    async def run() -> None:
        for call in calls:
            log.write(call)

    asyncio.run(run())


def _total(out: Path) -> int:
    for line in out.read_text().splitlines():
        if line.startswith(("totals:", "summary:")):
            return int(line.split()[1])
    raise SystemExit(f"no total in {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=MADE, help=f"lines counted (at most {MADE})")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        _child(args.child)
        return
    lines = min(args.lines, MADE)
    totals = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (0, lines):
            out = Path(tmp) / f"cg.{n}"
            subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable,
                            __file__, "--child", str(n)], check=True, capture_output=True,
                           env={**os.environ, "PYTHONHASHSEED": "0"})  # the same dict probing in both runs
            totals.append(_total(out))
    print(f"instructions per access line: {(totals[1] - totals[0]) / lines:,.0f}")


if __name__ == "__main__":
    main()
