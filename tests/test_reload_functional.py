"""Hot reload: a real `signalbox serve` under load while its policy directory is swapped the way the
kubelet swaps a ConfigMap volume (a new timestamped directory behind the `..data` symlink); the three
triggers (watch, SIGHUP, POST /admin/reload) and what each reports; and the limiter registry keeping
counters across a reload while taking the new numbers at once."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from kit import until
from test_ops_functional import Serve

from proxy.admission.limits import Refusal
from proxy.admission.local import LocalStore
from proxy.admission.store import Reservation
from proxy.policy.plan import Limit, LimitSpec
from proxy.tasks import spawn

KEY, STREAM_KEY = "sk-reload-load", "sk-reload-stream"
AUTH = {"Authorization": f"Bearer {KEY}"}

POLICY = """\
upstreams:
  mock: {{provider: mock}}
  slow: {{provider: mock, mock: {{output_tokens: 30, token_delay: 100ms}}}}
tenants:
  ops:
    keys: [{key}]
    limits: {{requests_per_minute: {rpm}}}
  streamer: {{keys: [{stream_key}]}}
routes:
  - name: slow
    match: {{model: slow-m}}
    upstream: slow
  - name: chat
    match: {{model: [{models}]}}
    {upstream_key}: mock
"""
BROKEN_LINE = 15  # the `upstreem:` line of the broken version


def policy(rpm: int, models: str = "m1", upstream_key: str = "upstream") -> str:
    return POLICY.format(key=KEY, stream_key=STREAM_KEY, rpm=rpm, models=models, upstream_key=upstream_key)


class ConfigMapDir:
    """A directory laid out as the kubelet lays out a ConfigMap volume: `name -> ..data/name`, and an
    update writes a new `..<timestamp>` directory, then renames a fresh `..data` symlink over the old."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir()
        self.current: Path | None = None

    def write(self, files: dict[str, str]) -> None:
        stamp = self.root / f"..{time.time_ns()}"
        stamp.mkdir()
        for name, text in files.items():
            (stamp / name).write_text(text)
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(stamp.name)
        os.replace(tmp, self.root / "..data")  # the atomic swap
        for name in files:
            link = self.root / name
            if not link.is_symlink():
                link.symlink_to(f"..data/{name}")
        if self.current is not None:
            shutil.rmtree(self.current)
        self.current = stamp


@dataclass
class Outcome:
    status: int
    limit: str | None
    at: float


@dataclass
class Load:
    url: str
    outcomes: list[Outcome] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def worker(self, session: aiohttp.ClientSession) -> None:
        body = {"model": "m1", "messages": [{"role": "user", "content": "hi"}]}
        while not self.stop.is_set():
            try:
                async with session.post(self.url + "/v1/chat/completions", json=body, headers=AUTH) as resp:
                    await resp.read()
                    limit = resp.headers.get("x-ratelimit-limit-requests")
                    self.outcomes.append(Outcome(resp.status, limit, time.monotonic()))
            except aiohttp.ClientError as exc:  # any of these fails the test
                self.errors.append(repr(exc))
            await asyncio.sleep(0.003)

    def count(self, status: int, since: float = 0.0) -> int:
        return sum(1 for o in self.outcomes if o.status == status and o.at >= since)


async def stream(url: str, session: aiohttp.ClientSession) -> bytes:
    body = {"model": "slow-m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    headers = {"Authorization": f"Bearer {STREAM_KEY}"}
    async with session.post(url + "/v1/chat/completions", json=body, headers=headers) as resp:
        assert resp.status == 200
        return await resp.read()


@pytest.mark.timeout(90)
async def test_reload_under_load_applies_a_new_limit_and_never_serves_a_broken_one(tmp_path: Path) -> None:
    policies = ConfigMapDir(tmp_path / "policies")
    policies.write({"policy.yaml": policy(rpm=100_000)})
    proxy = Serve(policies.root, "--reload-interval", "0.2s")
    try:
        await proxy.wait_ready()
        load = Load(proxy.url)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

            async def version(n: int) -> bool:
                answer = (await proxy.admin(session, "GET", "/admin/policy"))[1]
                return bool(answer["version"] == n)

            workers = [spawn(load.worker(session), name=f"load-{i}") for i in range(4)]
            # Streams that span every reload: they finish under the plan they started with.
            streams = [spawn(stream(proxy.url, session), name=f"stream-{i}") for i in range(3)]
            await until(lambda: load.count(200) >= 150, within=10)
            first_digest = (await proxy.admin(session, "GET", "/admin/policy"))[1]["digest"]

            # 1. A changed limit, lower than what this minute already counted.
            policies.write({"policy.yaml": policy(rpm=40)})
            await until(lambda: version(2), within=10)
            swapped = time.monotonic()
            counted_before = load.count(200)
            await until(lambda: load.count(429, since=swapped) >= 20, within=10)
            assert load.count(200, since=swapped + 0.1) == 0, "the counter survived: nothing is left under 40"
            assert counted_before > 40

            # 2. A broken version (it would also lift the limit, if it were ever served).
            policies.write({"policy.yaml": policy(rpm=100_000, models="m1, m2", upstream_key="upstreem")})

            async def rejected() -> dict[str, Any] | None:
                answer = (await proxy.admin(session, "GET", "/admin/policy"))[1]
                return answer if answer["last_error"] else None

            status = await until(rejected, within=10)
            broken_at = time.monotonic()
            assert status["version"] == 2 and status["digest"] != first_digest
            problem = next(p for p in status["last_error"]["problems"] if "upstreem" in p["message"])
            assert problem["file"] == str(policies.root / "policy.yaml") and problem["line"] == BROKEN_LINE
            assert status["last_error"]["digest"] not in (status["digest"], None)
            assert await proxy.metric(session, "signalbox_policy_reload_failures_total") == 1.0
            assert await proxy.metric(session, "signalbox_policy_last_reload_success") == 0.0
            reloads = "signalbox_policy_reloads_total"
            assert await proxy.metric(session, reloads, trigger="watch", result="rejected") == 1.0
            await asyncio.sleep(0.6)  # a few more polls: the broken version is tried once, never served
            assert load.count(200, since=broken_at) == 0
            async with session.post(
                proxy.url + "/v1/chat/completions", headers=AUTH,
                json={"model": "m2", "messages": [{"role": "user", "content": "hi"}]},
            ) as resp:
                assert resp.status == 404  # m2 exists only in the broken version
            assert await proxy.metric(session, "signalbox_policy_reload_failures_total") == 1.0
            assert (await proxy.admin(session, "GET", "/admin/policy"))[1]["version"] == 2

            # 3. Fixed: a good version lifts the limit again; the error clears.
            policies.write({"policy.yaml": policy(rpm=100_000, models="m1, m3")})
            await until(lambda: version(3), within=10)
            fixed = time.monotonic()
            await until(lambda: load.count(200, since=fixed) >= 20, within=10)
            status = (await proxy.admin(session, "GET", "/admin/policy"))[1]
            assert status["last_error"] is None and status["reloads"] == {"applied": 2, "rejected": 1}
            assert status["last_attempt"]["trigger"] == "watch"
            assert await proxy.metric(session, "signalbox_policy_last_reload_success") == 1.0

            load.stop.set()
            await asyncio.gather(*workers)
            bodies = await asyncio.gather(*streams)
        assert load.errors == []
        expected = [o for o in load.outcomes if o.status == 200 or (o.status == 429 and o.limit == "40")]
        unexpected = [o for o in load.outcomes if o not in expected]
        assert unexpected == [], "only the new limit's 429s may appear"
        assert len(load.outcomes) > 300
        for body in bodies:
            assert body.rstrip().endswith(b"data: [DONE]") and b'"error"' not in body
        assert "upstreem" in proxy.log() and f"policy.yaml:{BROKEN_LINE}:" in proxy.log()
    finally:
        proxy.stop()


@pytest.mark.timeout(60)
async def test_sighup_and_admin_reload_report_what_happened(tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "policy.yaml").write_text(policy(rpm=100))
    proxy = Serve(policies, "--reload-interval", "1h")  # only the explicit triggers
    try:
        await proxy.wait_ready()
        async with aiohttp.ClientSession() as session:
            status, answer = await proxy.admin(session, "POST", "/admin/reload")
            assert status == 200 and answer["result"] == "unchanged" and answer["policy"]["version"] == 1

            (policies / "policy.yaml").write_text(policy(rpm=100, models="m1, m2"))
            status, answer = await proxy.admin(session, "POST", "/admin/reload")
            assert status == 200 and answer["result"] == "applied" and answer["policy"]["version"] == 2
            good_digest = answer["policy"]["digest"]

            (policies / "policy.yaml").write_text(policy(rpm=100, upstream_key="upstreem"))
            status, answer = await proxy.admin(session, "POST", "/admin/reload")
            assert status == 422 and answer["result"] == "rejected"
            assert answer["policy"]["version"] == 2 and answer["policy"]["digest"] == good_digest
            lines = {(p["file"], p["line"]) for p in answer["policy"]["last_error"]["problems"]}
            assert (str(policies / "policy.yaml"), BROKEN_LINE) in lines

            (policies / "policy.yaml").write_text(policy(rpm=100, models="m1, m3"))
            os.kill(proxy.process.pid, signal.SIGHUP)

            async def reloaded() -> dict[str, Any] | None:
                answer = (await proxy.admin(session, "GET", "/admin/policy"))[1]
                return answer if answer["version"] == 3 else None

            status_now = await until(reloaded, within=10)
            assert status_now["last_error"] is None and status_now["last_attempt"]["trigger"] == "sighup"
            assert status_now["loaded_at"].endswith("Z") and len(status_now["digest"]) == 64
            reloads = "signalbox_policy_reloads_total"
            assert await proxy.metric(session, reloads, trigger="admin", result="applied") == 1
            assert await proxy.metric(session, reloads, trigger="admin", result="rejected") == 1
            assert await proxy.metric(session, reloads, trigger="sighup", result="applied") == 1
            assert await proxy.metric(session, "signalbox_policy_info", digest=status_now["digest"][:12]) == 1
            assert proxy.process.poll() is None, "SIGHUP must not end the process"
    finally:
        proxy.stop()


@pytest.mark.timeout(60)
async def test_an_emptied_file_or_a_dangling_key_is_refused_and_the_old_policy_keeps_serving(tmp_path: Path) -> None:
    # A non-atomic save truncates the file first; a removed ConfigMap key leaves a dangling symlink for a
    # moment. Either was applied (every request a 401) or crashed the loader; both must be refused.
    policies = tmp_path / "policies"
    policies.mkdir()
    file = policies / "policy.yaml"
    file.write_text(policy(rpm=1000))
    proxy = Serve(policies, "--reload-interval", "0.1s")
    try:
        await proxy.wait_ready()
        async with aiohttp.ClientSession() as session:

            async def policy_status() -> dict[str, Any]:
                return (await proxy.admin(session, "GET", "/admin/policy"))[1]

            async def refused() -> list[dict[str, Any]] | None:
                answer = await policy_status()
                return answer["last_error"]["problems"] if answer["last_error"] else None

            async def chat() -> int:
                body = {"model": "m1", "messages": [{"role": "user", "content": "hi"}]}
                async with session.post(proxy.url + "/v1/chat/completions", json=body, headers=AUTH) as resp:
                    return resp.status

            file.write_text("")  # the watch sees it
            [problem] = await until(refused, within=10)
            assert (problem["file"], problem["line"], problem["column"]) == (str(file), 1, 1)
            assert "the file is empty" in problem["message"]
            assert await chat() == 200 and (await policy_status())["version"] == 1
            file.write_text("# comments only\n")
            status, answer = await proxy.admin(session, "POST", "/admin/reload")
            assert status == 422 and answer["result"] == "rejected" and answer["policy"]["version"] == 1
            assert await proxy.metric(session, "signalbox_policy_last_reload_success") == 0

            async def cleared() -> bool:
                return (await policy_status())["last_error"] is None

            file.write_text(policy(rpm=1000))  # back to the serving version: the error clears
            await until(cleared, within=10)
            dangling = policies / "removed.yaml"
            dangling.symlink_to(Path("..data") / "removed.yaml")
            [problem] = await until(refused, within=10)
            assert problem["file"] == str(dangling) and "cannot read this file" in problem["message"]
            assert await chat() == 200
            dangling.unlink()  # the kubelet removes it next: the set is the serving one again
            await until(cleared, within=10)
            assert (await policy_status())["version"] == 1 and await chat() == 200
    finally:
        proxy.stop()


# --- the limiter registry across a reload (pure, fake clock) ------------------------------------------


def limit(key: str = "tenant:a", rpm: int | None = None, concurrent: int | None = None) -> Limit:
    return Limit(key, key, "a", LimitSpec(requests_per_minute=rpm, concurrent=concurrent))


async def test_reconfigure_applies_a_changed_limit_to_the_existing_counter_at_once() -> None:
    store = LocalStore(lambda: 1.0)
    old = limit(rpm=10)
    for _ in range(5):
        assert isinstance(await store.try_acquire([old], 0), Reservation)
    new = limit(rpm=4)
    await store.reconfigure({new.key: new})
    (usage,) = await store.remaining()
    assert usage.requests is not None and (usage.requests.limit, usage.requests.used) == (4, 5.0)
    # A request still holding the old plan is counted under the new number and cannot flip it back.
    refused = await store.try_acquire([old], 0)
    assert isinstance(refused, Refusal) and refused.limit is new
    (usage,) = await store.remaining()
    assert usage.requests is not None and usage.requests.limit == 4


async def test_reconfigure_drops_keys_that_left_the_plan() -> None:
    store = LocalStore(lambda: 1.0)
    both = [limit("tenant:a", rpm=5), limit("route:r", rpm=5)]
    assert isinstance(await store.try_acquire(both, 0), Reservation)
    await store.reconfigure({"route:r": limit("route:r", rpm=7)})
    assert [u.key for u in await store.remaining()] == ["route:r"]


async def test_concurrency_is_given_back_where_it_was_counted_across_a_reload() -> None:
    store = LocalStore(lambda: 1.0)
    old, new = limit(rpm=100), limit(rpm=100, concurrent=1)
    await store.try_acquire([old], 0)  # seeds the key
    await store.reconfigure({new.key: new})
    held = await store.try_acquire([old], 0)  # an old-plan request, counted under the new spec
    assert isinstance(held, Reservation) and held.concurrent
    assert isinstance(await store.try_acquire([new], 0), Refusal)
    await store.release(held)
    assert isinstance(await store.try_acquire([new], 0), Reservation)
