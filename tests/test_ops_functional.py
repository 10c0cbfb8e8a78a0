"""Operations, end to end on a real `signalbox serve` process: hot reload under load, SIGTERM drain,
explain and the published JSON Schema."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from proxy.policy.compile import compile_plan
from proxy.policy.explain import explain
from proxy.policy.load import load_policy
from proxy.policy.schema import Policy

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-ops-test"
AUTH = {"Authorization": f"Bearer {KEY}"}

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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Proxy:
    def __init__(self, policies: Path, *extra: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--policies", str(policies), "--port", str(self.port),
             "--admin-port", str(_free_port()), "--no-access-log", *extra],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )

    async def wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                try:
                    async with session.get(self.url + "/readyz") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        raise AssertionError("proxy did not become ready")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)
        if self.process.stderr is not None:
            self.process.stderr.close()


@pytest.fixture
def policy_dir(tmp_path: Path) -> Iterator[Path]:
    (tmp_path / "policy.yaml").write_text(_policy())
    yield tmp_path


def _chat(model: str, stream: bool = False) -> dict[str, object]:
    return {"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}


async def _metric(session: aiohttp.ClientSession, url: str, name: str) -> list[str]:
    async with session.get(url + "/metrics") as resp:
        text = await resp.text()
    return [line for line in text.splitlines() if line.startswith(name)]


@pytest.mark.timeout(60)
async def test_reload_under_load_swaps_good_policies_and_never_serves_a_broken_one(policy_dir: Path) -> None:
    proxy = Proxy(policy_dir, "--reload-interval", "0.2")
    try:
        await proxy.wait_ready()
        failures: list[int] = []
        done = asyncio.Event()

        async def load(session: aiohttp.ClientSession) -> int:
            sent = 0
            while not done.is_set():
                async with session.post(proxy.url + "/v1/chat/completions", json=_chat("m1"), headers=AUTH) as r:
                    await r.read()
                    if r.status != 200:
                        failures.append(r.status)
                sent += 1
            return sent

        async with aiohttp.ClientSession() as session:
            workers = [asyncio.ensure_future(load(session)) for _ in range(4)]  # noqa: TID251 (test code)
            async with session.post(proxy.url + "/v1/chat/completions", json=_chat("m2"), headers=AUTH) as r:
                assert r.status == 404  # m2 is not routed yet

            (policy_dir / "policy.yaml").write_text(_policy(models="m1, m2"))
            assert await _eventually(session, proxy.url, "m2", 200)

            (policy_dir / "policy.yaml").write_text("routes:\n  - name: chat\n    upstreem: mock\n")
            assert await _eventually_metric(session, proxy.url, "signalbox_policy_reload_failures_total", "1.0")
            async with session.post(proxy.url + "/v1/chat/completions", json=_chat("m2"), headers=AUTH) as r:
                assert r.status == 200  # the broken file was never served
            assert (await _metric(session, proxy.url, "signalbox_policy_last_reload_success"))[-1].endswith(" 0.0")

            (policy_dir / "policy.yaml").write_text(_policy(models="m1, m3"))
            assert await _eventually(session, proxy.url, "m3", 200)
            assert await _eventually(session, proxy.url, "m2", 404)
            assert (await _metric(session, proxy.url, "signalbox_policy_last_reload_success"))[-1].endswith(" 1.0")
            done.set()
            sent = sum(await asyncio.gather(*workers))
        assert sent > 20
        assert failures == []
    finally:
        proxy.stop()


async def _eventually(session: aiohttp.ClientSession, url: str, model: str, status: int) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        async with session.post(url + "/v1/chat/completions", json=_chat(model), headers=AUTH) as resp:
            await resp.read()
            if resp.status == status:
                return True
        await asyncio.sleep(0.1)
    return False


async def _eventually_metric(session: aiohttp.ClientSession, url: str, name: str, value: str) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = await _metric(session, url, name)
        if lines and lines[-1].endswith(" " + value):
            return True
        await asyncio.sleep(0.1)
    return False


async def _read_stream(url: str, session: aiohttp.ClientSession) -> bytes:
    async with session.post(url + "/v1/chat/completions", json=_chat("m1", stream=True), headers=AUTH) as resp:
        assert resp.status == 200
        return await resp.read()


@pytest.mark.timeout(60)
async def test_sigterm_drains_twenty_open_streams(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(_policy(tokens=20, delay="100ms"))  # each stream lasts about 2 s
    proxy = Proxy(tmp_path, "--shutdown-grace", "0.5s", "--drain-timeout", "20s")
    try:
        await proxy.wait_ready()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            streams = [asyncio.ensure_future(_read_stream(proxy.url, session)) for _ in range(20)]  # noqa: TID251
            await asyncio.sleep(0.5)
            proxy.process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.1)
            async with session.get(proxy.url + "/readyz") as resp:
                assert resp.status == 503  # readiness fails at once
            await asyncio.sleep(1.0)  # past the grace: the listener is closed
            with pytest.raises(aiohttp.ClientConnectionError):
                async with aiohttp.ClientSession() as fresh, fresh.get(proxy.url + "/healthz") as resp:
                    await resp.read()
            bodies = await asyncio.gather(*streams)
        assert all(body.rstrip().endswith(b"data: [DONE]") for body in bodies)
        assert proxy.process.wait(timeout=15) == 0, proxy.process.stderr.read().decode() if proxy.process.stderr else ""
    finally:
        proxy.stop()


@pytest.mark.timeout(60)
async def test_drain_timeout_ends_remaining_streams_with_an_error_event(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(_policy(tokens=200, delay="100ms"))  # 20 s streams
    proxy = Proxy(tmp_path, "--shutdown-grace", "0s", "--drain-timeout", "1s")
    try:
        await proxy.wait_ready()
        async with aiohttp.ClientSession() as session:
            stream = asyncio.ensure_future(_read_stream(proxy.url, session))  # noqa: TID251
            await asyncio.sleep(0.5)
            started = time.monotonic()
            proxy.process.send_signal(signal.SIGTERM)
            body = await asyncio.wait_for(stream, 10)
        assert time.monotonic() - started < 6
        last = [line for line in body.split(b"\n\n") if line.strip()][-1]
        assert last.startswith(b"data: {\"error\"")
        assert b"shutting down" in last
        assert proxy.process.wait(timeout=10) == 0
    finally:
        proxy.stop()


EXPLAIN_POLICY = """
identify: {mode: api_key}
upstreams:
  mock: {provider: mock}
  big: {provider: openai, base_url: "http://127.0.0.1:9/v1", timeouts: {first_token: 90s}}
tenants:
  alpha: {keys: [ka]}
  beta: {keys: [kb], models: ["small-*"]}
timeouts: {connect: 3s}
routes:
  - name: embed
    match: {path: /v1/embeddings, model: "emb-*"}
    upstream: mock
  - name: vip
    match: {model: "big-*", tenants: [alpha]}
    upstream: big
    model: big-model-v2
    timeouts: {idle: 20s}
  - name: small
    match: {model: "small-*"}
    upstream: mock
"""


@pytest.mark.parametrize(
    ("tenant", "model", "path", "route", "skipped"),
    [
        ("alpha", "emb-1", "/v1/embeddings", "embed", []),
        ("alpha", "big-1", "/v1/chat/completions", "vip", ["embed"]),
        ("beta", "big-1", "/v1/chat/completions", None, None),  # not in beta's allow-list
        ("alpha", "small-1", "/v1/chat/completions", "small", ["embed", "vip"]),
        ("beta", "small-9", "/v1/completions", "small", ["embed", "vip"]),
        ("alpha", "other", "/v1/chat/completions", None, ["embed", "vip", "small"]),
    ],
)
def test_explain_table(
    tmp_path: Path, tenant: str, model: str, path: str, route: str | None, skipped: list[str] | None
) -> None:
    (tmp_path / "p.yaml").write_text(EXPLAIN_POLICY)
    loaded = load_policy(tmp_path)
    answer = explain(loaded, compile_plan(loaded), model=model, path=path, tenant=tenant)
    assert (answer["route"] or {}).get("name") == route
    if skipped is not None:
        assert [s["route"] for s in answer["skipped"]] == skipped
    if route == "vip":
        assert answer["model_sent_upstream"] == "big-model-v2"
        assert answer["timeouts"]["idle"] == {"value": "20s", "from": "route"}
        assert answer["timeouts"]["first_token"] == {"value": "90s", "from": "upstream"}
        assert answer["timeouts"]["connect"] == {"value": "3s", "from": "policy"}
        assert answer["timeouts"]["total"] == {"value": "30m", "from": "default"}


def test_explain_cli_by_key_never_prints_the_key(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(EXPLAIN_POLICY)
    out = subprocess.run(
        [sys.executable, "-m", "proxy", "explain", "--policies", str(tmp_path), "--model", "big-x", "--key", "ka",
         "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=30, check=True,
    ).stdout
    answer = json.loads(out)
    assert answer["route"]["name"] == "vip" and answer["tenant"]["identified_by"] == "key"
    assert '"ka"' not in out


def test_published_schema_is_current_and_strict() -> None:
    published = json.loads((ROOT / "policy.schema.json").read_text())
    assert published == Policy.model_json_schema(mode="validation"), "run: signalbox schema > policy.schema.json"
    assert published["$defs"]["Route"]["additionalProperties"] is False
    out = subprocess.run(
        [sys.executable, "-m", "proxy", "schema"], cwd=ROOT, capture_output=True, text=True, timeout=30, check=True
    ).stdout
    assert json.loads(out) == published


def test_env_is_clean_of_test_keys() -> None:
    assert KEY not in os.environ.get("SIGNALBOX_DEV_KEY", "")
