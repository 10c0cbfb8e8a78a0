"""Operations, end to end on a real `signalbox serve` process on loopback: the SIGTERM life cycle
(readiness first, accepting through the grace, refusing after it, streams drained, exit 0), probes
that ignore upstream outages, and the published JSON Schema. `Serve` is shared with the reload tests."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import closed_port
from kit import sample_key, samples

from proxy.policy.schema_docs import json_schema
from proxy.tasks import spawn

ROOT = Path(__file__).resolve().parent.parent
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
PYTHON = str(VENV_PYTHON) if VENV_PYTHON.exists() else sys.executable
KEY = "sk-ops-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
ADMIN_TOKEN = "ops-admin-token"

POLICY = """
upstreams:
  mock:
    provider: mock
    mock: {{output_tokens: {tokens}, token_delay: {delay}}}
tenants:
  ops: {{keys: [{key}]}}
routes:
  - name: chat
    match: {{path: /v1/chat/completions, model: [{models}]}}
    upstream: mock
"""


def _policy(models: str = "m1", tokens: int = 4, delay: str = "0s") -> str:
    return POLICY.format(models=models, tokens=tokens, delay=delay, key=KEY)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Serve:
    """`python -m proxy serve` as a child process on loopback, with an admin token; ended by its PID."""

    def __init__(self, policies: Path, *extra: str) -> None:
        self.port, self.admin_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin_url = f"http://127.0.0.1:{self.admin_port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SIGNALBOX_", "OPENAI_"))}
        env.update(SIGNALBOX_ADMIN_TOKEN=ADMIN_TOKEN, PYTHONUNBUFFERED="1")
        self.stderr = open(policies.parent / f"serve-{self.port}.log", "w+b")  # closed in stop()
        self.process = subprocess.Popen(
            [PYTHON, "-m", "proxy", "serve", "--policies", str(policies), "--port", str(self.port),
             "--admin-port", str(self.admin_port), "--no-access-log", *extra],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=self.stderr,
        )

    async def wait_ready(self) -> float:
        """Seconds from now until /readyz answered 200 (at most 15)."""
        started = time.monotonic()
        async with aiohttp.ClientSession() as session:
            while time.monotonic() - started < 15:
                assert self.process.poll() is None, self.log()
                try:
                    async with session.get(self.url + "/readyz") as resp:
                        if resp.status == 200:
                            return time.monotonic() - started
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.02)
        raise AssertionError("proxy did not become ready\n" + self.log())

    async def admin(self, session: aiohttp.ClientSession, method: str, path: str) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        async with session.request(method, self.admin_url + path, headers=headers) as resp:
            return resp.status, await resp.json()

    async def metric(self, session: aiohttp.ClientSession, name: str, **labels: str) -> float | None:
        """A sample's value from /metrics, or None when there is no such series."""
        async with session.get(self.url + "/metrics") as resp:
            return samples(await resp.text()).get(sample_key(name, **labels))

    def log(self) -> str:
        self.stderr.flush()
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)
        self.stderr.close()


def _chat(model: str, stream: bool = False) -> dict[str, object]:
    return {"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}


def connection_refused(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(2.0)
        try:
            sock.connect(("127.0.0.1", port))
        except ConnectionRefusedError:
            return True
    return False


async def _read_stream(url: str, session: aiohttp.ClientSession) -> tuple[bytes, float]:
    request = _chat("m1", stream=True)
    async with session.post(url + "/v1/chat/completions", json=request, headers=AUTH) as resp:
        assert resp.status == 200
        body = await resp.read()
    return body, time.monotonic()


@pytest.mark.timeout(60)
async def test_sigterm_drains_twenty_open_streams(tmp_path: Path) -> None:
    grace, drain = 1.5, 20.0
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "p.yaml").write_text(_policy(tokens=20, delay="150ms"))  # each stream lasts about 3 s
    proxy = Serve(tmp_path / "p", "--shutdown-grace", f"{grace}s", "--drain-timeout", f"{drain}s")
    try:
        await proxy.wait_ready()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            streams = [spawn(_read_stream(proxy.url, session), name=f"stream-{i}") for i in range(20)]
            await asyncio.sleep(0.6)
            assert not any(s.done() for s in streams), "the streams must still be open at SIGTERM"
            sigterm = time.monotonic()
            os.kill(proxy.process.pid, signal.SIGTERM)
            await asyncio.sleep(0.1)
            async with aiohttp.ClientSession() as fresh:
                async with fresh.get(proxy.url + "/readyz") as resp:
                    assert resp.status == 503  # readiness fails first ...
                    assert (await resp.json())["draining"] is True
                async with fresh.get(proxy.url + "/healthz") as resp:
                    assert resp.status == 200  # ... liveness does not, and new connections are still taken
            await asyncio.sleep(max(0.0, sigterm + grace + 0.5 - time.monotonic()))
            assert connection_refused(proxy.port), "new connections must be refused after the grace"
            assert not all(s.done() for s in streams), "streams are still draining after the grace"
            results = await asyncio.gather(*streams)
        for body, _ in results:
            events = [e for e in body.split(b"\n\n") if e.startswith(b"data: {")]
            assert body.rstrip().endswith(b"data: [DONE]") and b'"error"' not in body
            assert sum(b'"content"' in e for e in events) >= 20  # every token arrived
        assert proxy.process.wait(timeout=15) == 0, proxy.log()
        assert "drain timeout" not in proxy.log()  # it exited once drained, not at the drain timeout
    finally:
        proxy.stop()


@pytest.mark.timeout(60)
async def test_drain_timeout_ends_remaining_streams_with_an_error_event(tmp_path: Path) -> None:
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "p.yaml").write_text(_policy(tokens=200, delay="100ms"))  # 20 s streams
    proxy = Serve(tmp_path / "p", "--shutdown-grace", "0s", "--drain-timeout", "1s")
    try:
        await proxy.wait_ready()
        async with aiohttp.ClientSession() as session:
            stream = spawn(_read_stream(proxy.url, session), name="stream")
            await asyncio.sleep(0.5)
            os.kill(proxy.process.pid, signal.SIGTERM)
            body, _ = await asyncio.wait_for(stream, 10)
        last = [line for line in body.split(b"\n\n") if line.strip()][-1]
        assert last.startswith(b"data: {\"error\"")
        assert b"shutting down" in last
        assert proxy.process.wait(timeout=10) == 0
    finally:
        proxy.stop()


@pytest.mark.timeout(60)
async def test_drain_timeout_fails_queued_requests_instead_of_sending_them(tmp_path: Path) -> None:
    """At the drain timeout the stream holding the queue's one slot ends; the stream waiting for that slot
    (its 200 already out, on heartbeats) must get the shutdown error too, not the freed slot and a new
    upstream call that shutdown would then cut without a word."""
    (tmp_path / "p").mkdir()
    queued = _policy(tokens=200, delay="100ms").replace("    upstream: mock\n", "    upstream: mock\n    queue: q\n")
    queued += "queues:\n  q: {concurrency: 1, max_wait: 60s, heartbeat_while_queued: true}\n"
    (tmp_path / "p" / "p.yaml").write_text(queued)
    proxy = Serve(tmp_path / "p", "--shutdown-grace", "0s", "--drain-timeout", "1s")
    try:
        await proxy.wait_ready()
        async with aiohttp.ClientSession() as session:
            holder = spawn(_read_stream(proxy.url, session), name="holder")
            await asyncio.sleep(0.5)
            waiter = spawn(_read_stream(proxy.url, session), name="waiter")
            await asyncio.sleep(0.5)
            os.kill(proxy.process.pid, signal.SIGTERM)
            (held, _), (waited, _) = await asyncio.wait_for(asyncio.gather(holder, waiter), 10)
        for body in (held, waited):
            last = [line for line in body.split(b"\n") if line.strip()][-1]
            assert last.startswith(b'data: {"error"') and b"shutting down" in last, body[-300:]
        assert b"queued position=1" in waited and b'"choices"' not in waited  # never sent upstream
        assert proxy.process.wait(timeout=10) == 0
    finally:
        proxy.stop()


def test_published_schema_is_current_and_strict() -> None:
    published = json.loads((ROOT / "policy.schema.json").read_text())
    current = json_schema()
    assert published == current, "run: signalbox schema > policy.schema.json"
    assert published["$defs"]["Route"]["additionalProperties"] is False
    out = subprocess.run(
        [PYTHON, "-m", "proxy", "schema"], cwd=ROOT, capture_output=True, text=True, timeout=30, check=True
    ).stdout
    assert json.loads(out) == published


def test_env_is_clean_of_test_keys() -> None:
    assert KEY not in os.environ.get("SIGNALBOX_DEV_KEY", "")


async def test_health_and_readiness_ignore_an_upstream_outage(start_proxy: Any) -> None:
    proxy = await start_proxy(f"""
    upstreams: {{down: {{provider: openai, base_url: "http://127.0.0.1:{closed_port()}/v1"}}}}
    tenants: {{ops: {{keys: [{KEY}]}}}}
    routes: [{{name: chat, upstream: down}}]
    """)
    async with aiohttp.ClientSession() as session:
        async with session.post(proxy.url + "/v1/chat/completions", json=_chat("m1"), headers=AUTH) as resp:
            assert resp.status == 502  # the upstream is down ...
        for path in ("/healthz", "/readyz"):
            async with session.get(proxy.url + path) as resp:
                assert resp.status == 200, path  # ... which must neither restart nor unready the proxy
