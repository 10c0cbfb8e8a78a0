"""One large non-streamed answer through `signalbox serve`: the proxy's RSS before, at its peak and after.

An in-process upstream answers SIZE MiB (64 KiB writes, with Content-Length) to a pass-through client
(streamed through past `max_buffered_response`), then to an Anthropic client on the same route (which
must be translated: 502 past the cap). Prints the proxy's VmRSS before, VmHWM (the peak) after each,
the bytes the client got and whether they were exact.
Run: .venv/bin/python bench/large_answer.py [--mib 256] [--cap 32MiB]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import free_port, signalbox, stop, vm_kib, wait_port  # noqa: E402

BLOCK = bytes(range(256)) * 256  # 64 KiB


async def upstream(size: int) -> web.AppRunner:
    async def answer(request: web.Request) -> web.StreamResponse:
        chunked = b'"chunked"' in await request.read()  # the model: no Content-Length
        headers = {"Content-Type": "application/json"} | ({} if chunked else {"Content-Length": str(size)})
        response = web.StreamResponse(headers=headers)
        await response.prepare(request)
        try:
            for _ in range(size // len(BLOCK)):
                await response.write(BLOCK)
            await response.write_eof()
        except ConnectionError:
            pass  # the proxy refused the rest (a 502)
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    return runner


async def fetch(url: str, headers: dict[str, str], body: bytes) -> tuple[int, int, str]:
    digest, received = hashlib.sha256(), 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        async with session.post(url, data=body, headers={"Content-Type": "application/json", **headers}) as resp:
            async for chunk in resp.content.iter_chunked(64 * 1024):
                digest.update(chunk)
                received += len(chunk)
            return resp.status, received, digest.hexdigest()


def serve(policy: Path, port: int, admin_port: int, log: IO[bytes]) -> subprocess.Popen[bytes]:
    command = [*signalbox(), "serve", "--policies", str(policy), "--port", str(port), "--admin-port",
               str(admin_port), "--no-access-log"]
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def peak(pid: int) -> str:
    return f"{vm_kib(pid, 'VmHWM') / 1024:.0f} MiB, now {vm_kib(pid, 'VmRSS') / 1024:.0f} MiB"


async def run(mib: int, cap: str) -> None:
    size = mib * 1024 * 1024
    expected = hashlib.sha256(BLOCK * (size // len(BLOCK))).hexdigest()
    up_port, port, admin_port = free_port(), free_port(), free_port()
    runner = await upstream(size)
    await web.TCPSite(runner, "127.0.0.1", up_port).start()
    with tempfile.TemporaryDirectory() as tmp:
        policy = Path(tmp) / "policy.yaml"
        policy.write_text(
            f"version: 1\nmax_buffered_response: {cap}\nidentify: {{mode: api_key}}\n"
            f"upstreams:\n  up: {{provider: openai, base_url: 'http://127.0.0.1:{up_port}/v1', api_key: sk-up}}\n"
            "tenants:\n  t: {keys: [sk-bench]}\nroutes:\n  - {name: all, match: {model: '*'}, upstream: up}\n"
        )
        log = (Path(tmp) / "proxy.log").open("wb")
        proc = serve(policy, port, admin_port, log)
        try:
            await asyncio.to_thread(wait_port, port, proc)
            base = f"http://127.0.0.1:{port}/v1"
            before = vm_kib(proc.pid, "VmRSS") / 1024
            print(f"{mib} MiB answer, max_buffered_response {cap}; proxy RSS before: {before:.0f} MiB")
            for model in ("length", "chunked"):
                status, got, digest = await fetch(
                    base + "/chat/completions", {"Authorization": "Bearer sk-bench"},
                    b'{"model":"%s","messages":[]}' % model.encode(),
                )
                print(f"  pass-through ({model}): {status}, {got / 2**20:.0f} MiB, exact: {digest == expected}; "
                      f"peak RSS {peak(proc.pid)}")
            for model in ("length", "chunked"):
                status, got, _ = await fetch(
                    base + "/messages", {"x-api-key": "sk-bench", "anthropic-version": "2023-06-01"},
                    b'{"model":"%s","max_tokens":8,"messages":[{"role":"user","content":"hi"}]}' % model.encode(),
                )
                print(f"  translated ({model}): {status}, {got} bytes; peak RSS {peak(proc.pid)}")
        finally:
            stop(proc)
            log.close()
            await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--cap", default="32MiB")
    args = parser.parse_args()
    asyncio.run(run(args.mib, args.cap))


if __name__ == "__main__":
    main()
