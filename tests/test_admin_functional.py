"""The admin API on its own loopback server next to a running proxy: bearer-token auth (and the locked
default), queue inspection without prompt content, and pause, resume and clear as seen by real clients."""

from __future__ import annotations

import asyncio
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from conftest import Proxy
from kit import Loopback, until
from test_admission_functional import Gated, chat, gated, policy, start, waiting

from proxy import lifecycle
from proxy.admin import build_admin_app
from proxy.cli import main as cli_main
from proxy.policy.load import load_policy
from proxy.policy.reload import Reloader

pytestmark = pytest.mark.timeout(30)
__all__ = ["gated"]  # the fixture, shared with the admission tests

StartProxy = Callable[..., Awaitable[Proxy]]
MakeAsync = Callable[..., openai.AsyncOpenAI]
TOKEN = "admin-token-1234"
SECRET_PROMPT = "the prompt must never show up in the admin API"


class Admin:
    def __init__(self, url: str, session: aiohttp.ClientSession) -> None:
        self.url = url
        self.session = session

    async def call(self, method: str, path: str, token: str | None = TOKEN) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        async with self.session.request(method, self.url + path, headers=headers) as response:
            return response.status, await response.json()


@pytest.fixture
async def serve_admin(loopback: Loopback) -> AsyncIterator[Callable[..., Awaitable[Admin]]]:
    session = aiohttp.ClientSession()

    async def serve(proxy: Proxy, environ: dict[str, str] | None = None) -> Admin:
        env = {"SIGNALBOX_ADMIN_TOKEN": TOKEN} if environ is None else environ
        app = build_admin_app(proxy.app, environ=env)
        return Admin(await loopback.serve(app), session)

    yield serve
    await session.close()


# --- auth ------------------------------------------------------------------------------------------


async def test_bearer_token_is_required(start_proxy: StartProxy, gated: Gated, serve_admin: Any) -> None:
    admin = await serve_admin(await start_proxy(policy(gated, route="queue: chat")))
    assert (await admin.call("GET", "/admin/queues", token=None))[0] == 401
    assert (await admin.call("GET", "/admin/queues", token="wrong"))[0] == 401
    status, body = await admin.call("GET", "/admin/queues")
    assert status == 200 and [q["name"] for q in body["queues"]] == ["chat"]


async def test_without_a_token_everything_is_refused(
    start_proxy: StartProxy, gated: Gated, serve_admin: Any
) -> None:
    admin = await serve_admin(await start_proxy(policy(gated, route="queue: chat")), environ={})
    calls = (("GET", "/admin/queues"), ("POST", "/admin/queues/chat/pause"), ("DELETE", "/admin/queues/chat"))
    for method, path in calls:
        status, body = await admin.call(method, path, token=None)
        assert status == 403 and "SIGNALBOX_ADMIN_TOKEN" in body["error"]["message"]


async def test_auth_can_be_disabled_only_on_loopback(
    start_proxy: StartProxy, gated: Gated, serve_admin: Any
) -> None:
    proxy = await start_proxy(policy(gated, route="queue: chat"))
    proxy.state.settings.admin_auth_disabled = True
    admin = await serve_admin(proxy, environ={})
    assert (await admin.call("GET", "/admin/queues", token=None))[0] == 200
    proxy.state.settings.admin_host = "0.0.0.0"
    with pytest.raises(ValueError, match="loopback"):
        build_admin_app(proxy.app, environ={})


def test_cli_refuses_no_auth_on_a_public_admin_host(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["serve", "--admin-no-auth", "--admin-host", "0.0.0.0", "--policies", "/nonexistent"]
    assert cli_main(args) == 2
    assert "loopback" in capsys.readouterr().err


# --- inspection ----------------------------------------------------------------------------------------


async def test_queues_and_items_show_the_board_without_content(
    start_proxy: StartProxy, async_openai: MakeAsync, gated: Gated, serve_admin: Any
) -> None:
    gated.hold = True
    limits = "limits: {requests_per_minute: 100}"
    proxy = await start_proxy(policy(gated, route="queue: chat", tenants=limits))
    admin = await serve_admin(proxy)
    alpha, beta = async_openai(proxy), async_openai(proxy, key="sk-beta")

    def ask(client: openai.AsyncOpenAI, rid: str, **kw: Any) -> asyncio.Task[Any]:
        headers = {"x-request-id": rid, **kw.pop("headers", {})}
        return start(client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": SECRET_PROMPT}], extra_headers=headers, **kw
        ))

    tasks = [ask(alpha, "r-running")]
    await until(lambda: len(gated.seen) == 1)
    batch = {"x-signalbox-priority": "batch"}
    tasks += [ask(alpha, "r-alpha"), ask(beta, "r-beta", headers=batch, stream=True)]
    await until(lambda: waiting(proxy) == 2)
    await asyncio.sleep(0.02)
    status, body = await admin.call("GET", "/admin/queues")
    assert status == 200
    (chat_queue,) = body["queues"]
    assert chat_queue["slots"] == 1 and chat_queue["active"] == 1 and chat_queue["waiting"] == 2
    assert chat_queue["paused"] is False and chat_queue["admitted"] == 1
    assert chat_queue["waiting_by_class"] == {"critical": 0, "standard": 1, "batch": 1}
    assert chat_queue["waiting_by_tenant"] == {"standard": {"alpha": 1}, "batch": {"beta": 1}}
    assert chat_queue["oldest_wait_ms"] >= 20
    assert chat_queue["wait_ms"]["samples"] == 1
    (alpha_limit,) = body["limits"]
    assert alpha_limit["key"] == "tenant:alpha" and alpha_limit["requests_per_minute"]["used"] == 2
    status, items = await admin.call("GET", "/admin/queues/chat/items")
    assert status == 200
    listed = [(i["request_id"], i["tenant"], i["priority"], i["model"], i["stream"]) for i in items["items"]]
    assert listed == [
        ("r-alpha", "alpha", "standard", "m", False),
        ("r-beta", "beta", "batch", "m", True),
    ]
    assert all(i["waited_ms"] >= 20 for i in items["items"])
    async with admin.session.get(admin.url + "/admin/queues/chat/items",
                                 headers={"Authorization": f"Bearer {TOKEN}"}) as raw:
        assert SECRET_PROMPT not in await raw.text()
    assert (await admin.call("GET", "/admin/queues/nope/items"))[0] == 404
    gated.release(10)
    for task in tasks:
        result = await task
        if not isinstance(result, openai.types.chat.ChatCompletion):
            [chunk async for chunk in result]


# --- control -----------------------------------------------------------------------------------------


async def test_pause_holds_new_requests_and_resume_lets_them_go(
    start_proxy: StartProxy, async_openai: MakeAsync, gated: Gated, serve_admin: Any
) -> None:
    gated.hold = True
    proxy = await start_proxy(policy(gated, route="queue: chat", queue="concurrency: 2"))
    admin = await serve_admin(proxy)
    alpha = async_openai(proxy)
    running = start(chat(alpha, user="running"))
    await until(lambda: len(gated.seen) == 1)
    status, body = await admin.call("POST", "/admin/queues/chat/pause")
    assert status == 200 and body == {"queue": "chat", "paused": True, "waiting": 0, "active": 1}
    held = start(chat(alpha, user="held"))  # a slot is free, but the queue is paused
    await until(lambda: waiting(proxy) == 1)
    gated.release()
    await running  # in-flight requests finish while paused
    await asyncio.sleep(0.05)
    assert gated.users() == ["running"] and waiting(proxy) == 1
    status, body = await admin.call("POST", "/admin/queues/chat/resume")
    assert status == 200 and body["paused"] is False
    await until(lambda: len(gated.seen) == 2)
    gated.release()
    await held
    assert gated.users() == ["running", "held"]


async def test_clear_answers_every_waiter_with_503_and_no_retry(
    start_proxy: StartProxy, async_openai: MakeAsync, gated: Gated, serve_admin: Any
) -> None:
    gated.hold = True
    proxy = await start_proxy(policy(gated, route="queue: chat"))
    admin = await serve_admin(proxy)
    alpha = async_openai(proxy)
    running = start(chat(alpha, user="running"))
    await until(lambda: len(gated.seen) == 1)
    waiters = [start(chat(alpha, user=f"w{i}")) for i in range(3)]
    await until(lambda: waiting(proxy) == 3)
    status, body = await admin.call("DELETE", "/admin/queues/chat")
    assert status == 200 and body == {"queue": "chat", "cleared": 3}
    results = await asyncio.gather(*waiters, return_exceptions=True)
    for result in results:
        assert isinstance(result, openai.InternalServerError) and result.status_code == 503
        assert result.response.headers["x-should-retry"] == "false"
        assert "queue 'chat' was cleared by an operator" in result.message
    gated.release()
    await running  # the request in flight was not touched
    assert gated.users() == ["running"]
    status, body = await admin.call("GET", "/admin/queues")
    assert body["queues"][0]["rejected"] == {"queue_cleared": 3}
    assert (await admin.call("DELETE", "/admin/queues/nope"))[0] == 404


# --- policy life cycle ---------------------------------------------------------------------------------


def attach_reloader(proxy: Proxy, source: Path) -> None:
    """What `signalbox serve` does for a policy loaded from files (start_proxy builds from a plan)."""
    runtime = proxy.state
    runtime.reloader = Reloader(source, load_policy(source), runtime.plans.swap)
    lifecycle.attach(runtime)


async def test_policy_endpoints_without_policy_files(
    start_proxy: StartProxy, gated: Gated, serve_admin: Any
) -> None:
    proxy = await start_proxy(policy(gated))
    admin = await serve_admin(proxy)
    status, body = await admin.call("GET", "/admin/policy")
    assert status == 200 and body["version"] == 1 and body["reloadable"] is False
    assert body["digest"] == proxy.state.plans.current.digest and body["last_error"] is None
    assert (await admin.call("POST", "/admin/reload"))[0] == 409
    assert (await admin.call("GET", "/admin/explain?model=m&tenant=alpha"))[0] == 409
    for method, path in (("GET", "/admin/policy"), ("POST", "/admin/reload"), ("GET", "/admin/explain")):
        assert (await admin.call(method, path, token=None))[0] == 401


async def test_admin_reload_keeps_counters_and_waiters_and_applies_new_numbers(
    start_proxy: StartProxy, async_openai: MakeAsync, gated: Gated, serve_admin: Any, tmp_path: Path
) -> None:
    gated.hold = True
    text = policy(gated, route="queue: chat", tenants="limits: {requests_per_minute: 100}")
    proxy = await start_proxy(text)
    source = tmp_path / "proxy-policy.yaml"  # where make_plan wrote it
    attach_reloader(proxy, source)
    admin = await serve_admin(proxy)
    alpha = async_openai(proxy)
    plan = proxy.state.plans.current
    queue = proxy.state.scheduler.queue(plan.queues["chat"], plan.priorities)
    tasks = [start(chat(alpha, user=f"u{i}")) for i in range(3)]
    await until(lambda: len(gated.seen) == 1 and waiting(proxy) == 2)

    source.write_text(textwrap.dedent(policy(
        gated, route="queue: chat", queue="concurrency: 3", tenants="limits: {requests_per_minute: 3}"
    )).lstrip("\n"))
    status, body = await admin.call("POST", "/admin/reload")
    assert status == 200 and body["result"] == "applied" and body["policy"]["version"] == 2
    # The same queue object took the new slot count, and its two waiters went through at once.
    await until(lambda: len(gated.seen) == 3)
    assert proxy.state.scheduler.queues["chat"] is queue and queue.spec.concurrency == 3
    # The counter kept its 3 requests and shows the new number before any new request carried it.
    status, body = await admin.call("GET", "/admin/queues")
    (alpha_limit,) = body["limits"]
    rpm = alpha_limit["requests_per_minute"]
    assert rpm["limit"] == 3 and rpm["used"] == 3
    gated.release(3)
    await asyncio.gather(*tasks)
    with pytest.raises(openai.RateLimitError) as caught:
        await chat(alpha)
    assert caught.value.response.headers["x-ratelimit-limit-requests"] == "3"

    source.write_text("routes:\n  - name: chat\n    upstreem: up\n")
    status, body = await admin.call("POST", "/admin/reload")
    assert status == 422 and body["result"] == "rejected" and body["policy"]["version"] == 2
    problems = body["policy"]["last_error"]["problems"]
    assert {(p["file"], p["line"]) for p in problems} >= {(str(source), 3)}
    assert all(p["text"].startswith(f"{source}:") for p in problems if p["file"])
    status, same = await admin.call("GET", "/admin/policy")
    assert same["last_error"] == body["policy"]["last_error"] and same["last_attempt"]["trigger"] == "admin"
