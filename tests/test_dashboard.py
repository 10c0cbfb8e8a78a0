"""The wall screen (GET /admin/dashboard and its live feed GET /admin/live) against the proxy under load from the
mock upstream: the token guards the data and not the page; the feed is Server-Sent Events that stop when the
client leaves; and, in headless Chromium, the page's queue rows match GET /admin/queues, the pause button
pauses the queue, and a screenshot is saved (DASHBOARD_SCREENSHOT_TO=docs/img/dashboard.png regenerates the
committed one)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from unittest import mock

import aiohttp
import orjson
import pytest
from conftest import UPSTREAM_KEY, Proxy
from kit import Loopback, until
from kit.browser import Page, chromium
from outcome_helpers import body, idle, mock_url, post, start
from test_admin_functional import TOKEN, Admin, serve_admin

from proxy.admin import build_admin_app
from proxy.ops.live import Window
from proxy.ops.wall import HUB, LIVE, PAGE, LiveSettings

pytestmark = pytest.mark.timeout(90)
__all__ = ["mock_url", "serve_admin"]  # the fixtures

StartProxy = Callable[..., Awaitable[Proxy]]
REPO = Path(__file__).resolve().parent.parent
SCREENSHOT_ENV = "DASHBOARD_SCREENSHOT_TO"
HOLD_MS = "60000"
"""How long the mock takes to answer a request that should hold its slot for the whole test."""


def policy(mock_url: str) -> str:
    """Queue `chat` (2 slots) in two classes: alpha is interactive, beta batch; gamma may send one request a
    minute (its second is refused); limits on the tenant, the route and the upstream to show."""
    return f"""
identify: {{mode: api_key}}
priorities: [interactive, batch]
upstreams:
  mock: {{provider: openai, base_url: "{mock_url}/v1", api_key: "${{TEST_UPSTREAM_KEY}}",
          limits: {{requests_per_minute: 2000, tokens_per_minute: 1000000}}}}
tenants:
  alpha: {{keys: [sk-alpha], priority: interactive, limits: {{requests_per_minute: 600, concurrent: 20}}}}
  beta: {{keys: [sk-beta], priority: batch}}
  gamma: {{keys: [sk-gamma], priority: batch, limits: {{requests_per_minute: 1}}}}
queues:
  chat: {{concurrency: 2, max_waiting: 50, max_wait: 120s}}
routes:
  - name: chat
    match: {{path: /v1/chat/completions, model: "gpt-*"}}
    upstream: mock
    queue: chat
    timeouts: {{first_token: 120s, total: 300s}}
    limits: {{requests_per_minute: 1200, tokens_per_minute: 400000}}
"""


def ask(key: str, **mock: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", **{"x-mock-" + k.replace("_", "-"): v for k, v in mock.items()}}


async def warm_up(proxy: Proxy) -> None:
    """Finished traffic to show: answers, streams (TTFT), upstream errors and one refusal."""
    jobs = [post(proxy, body(), ask("sk-alpha", ttft_ms="40")) for _ in range(4)]
    jobs += [post(proxy, body(stream=True), ask("sk-beta", ttft_ms="120")) for _ in range(3)]
    jobs += [post(proxy, body(), ask("sk-alpha", status="500"))]
    statuses = sorted(status for status, _ in await asyncio.gather(*jobs))
    assert statuses == [200] * 7 + [500]
    assert (await post(proxy, body(), ask("sk-gamma")))[0] == 200
    assert (await post(proxy, body(), ask("sk-gamma")))[0] == 429  # gamma's one a minute
    await idle(proxy)


async def load(proxy: Proxy, admin: Admin) -> tuple[list[asyncio.Task[Any]], list[asyncio.Task[Any]]]:
    """A steady state: both slots held by slow answers, two interactive and three batch requests waiting."""
    holders = [start(post(proxy, body(), ask("sk-alpha", ttft_ms=HOLD_MS))) for _ in range(2)]
    await until(lambda: proxy.state.scheduler.queues["chat"].active == 2)
    waiters = [start(post(proxy, body(), ask("sk-alpha", ttft_ms=HOLD_MS))) for _ in range(2)]
    waiters += [start(post(proxy, body(), ask("sk-beta", ttft_ms=HOLD_MS))) for _ in range(3)]
    await until(lambda: len(proxy.state.scheduler.queues["chat"].board) == 5)
    return holders, waiters


# --- what the page shows, and what the API says --------------------------------------------------------------

READ_ROWS = """
const rows = {};
for (const tr of document.querySelectorAll('#queues tr.queue')) {
  const cell = (f) => tr.querySelector(`[data-field="${f}"]`).textContent.trim();
  rows[tr.dataset.queue] = {active: cell('active'), waiting: cell('waiting'), state: cell('state'), classes: {}};
}
for (const tr of document.querySelectorAll('#queues tr.class')) {
  const cell = (f) => tr.querySelector(`[data-field="${f}"]`).textContent.trim();
  rows[tr.dataset.queue].classes[tr.dataset.class] = {waiting: cell('waiting'), tenants: cell('tenants')};
}
return rows;
"""


def expected_rows(listing: dict[str, Any]) -> dict[str, Any]:
    """The rows as the page should draw them from GET /admin/queues."""
    rows = {}
    for queue in listing["queues"]:
        classes = {}
        for name, waiting in queue["waiting_by_class"].items():
            tenants = sorted(queue["waiting_by_tenant"].get(name, {}).items())
            classes[name] = {"waiting": str(waiting), "tenants": " · ".join(f"{t} {n}" for t, n in tenants) or "–"}
        rows[queue["name"]] = {
            "active": f"{queue['active']} / {queue['slots']}",
            "waiting": str(queue["waiting"]),
            "state": "paused" if queue["paused"] else "running",
            "classes": classes,
        }
    return rows


async def page_matches_api(page: Page, admin: Admin, within: float = 15.0) -> dict[str, Any]:
    """Poll until the rows the page drew equal the rows GET /admin/queues gives at the same moment."""
    seen: tuple[Any, Any] = (None, None)

    async def same() -> Any:
        nonlocal seen
        status, listing = await admin.call("GET", "/admin/queues")
        assert status == 200
        seen = (await page.run(READ_ROWS), expected_rows(listing))
        return seen[0] if seen[0] == seen[1] else None

    try:
        return dict(await until(same, within=within, step=0.2))
    except AssertionError:
        raise AssertionError(f"the page never showed what the API did: page {seen[0]!r}, API {seen[1]!r}") from None


async def log_in(page: Page, admin: Admin) -> None:
    await page.goto(admin.url + PAGE)
    await page.wait_for("return !document.getElementById('login').hidden")  # asks for the token once
    await page.type("#token", "not-the-token")
    await page.click("#login button[type=submit]")
    assert await page.wait_for("return document.getElementById('login-why').textContent") == "That token was refused."
    assert await page.run("return sessionStorage.getItem('signalbox.adminToken')") is None
    await page.type("#token", TOKEN)
    await page.click("#login button[type=submit]")
    await page.wait_for("return document.getElementById('conn').dataset.state === 'live'")
    assert await page.run("return sessionStorage.getItem('signalbox.adminToken')") == TOKEN


async def test_the_page_shows_the_queues_the_api_reports_and_pauses_a_queue(
    start_proxy: StartProxy, mock_url: str, serve_admin: Any, tmp_path: Path, record_property: Any
) -> None:
    proxy = await start_proxy(policy(mock_url))
    admin = await serve_admin(proxy)
    await warm_up(proxy)
    holders, waiters = await load(proxy, admin)
    extra: list[asyncio.Task[Any]] = []
    try:
        async with chromium(1280, 800) as page:
            await log_in(page, admin)
            rows = await page_matches_api(page, admin)
            assert rows["chat"]["active"] == "2 / 2" and rows["chat"]["waiting"] == "5"
            assert rows["chat"]["classes"] == {
                "interactive": {"waiting": "2", "tenants": "alpha 2"},
                "batch": {"waiting": "3", "tenants": "beta 3"},
            }
            refused = await page.wait_for(
                "const r = document.querySelector('#refusals tbody tr:not(.empty)');"
                "return r && Array.from(r.cells).map(c => c.textContent)"
            )
            assert refused[1:5] == ["gamma", "chat", "rate_limit", "429"]
            shot = await page.screenshot(tmp_path / "dashboard.png")
            record_property("screenshot", str(shot))
            print(f"dashboard screenshot: {shot}")
            target = os.environ.get(SCREENSHOT_ENV)
            if target:
                shutil.copyfile(shot, REPO / target if not Path(target).is_absolute() else Path(target))
            assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert await page.run("return [window.innerWidth, window.innerHeight]") == [1280, 800]
            assert await page.external_requests(admin.url) == []
            errors = [e for e in await page.console() if e["level"] == "SEVERE"]
            # The one expected: the page's first try without a token (it then asks for one).
            assert [e for e in errors if "/admin/live" not in e["message"] or "401" not in e["message"]] == []

            # Pause: the API reports it, the page says so, and nothing is admitted while slots are free.
            await page.click("#queues tr.queue[data-queue='chat'] button[data-action='pause']")
            await until(lambda: proxy.state.scheduler.queues["chat"].paused, within=15)
            status, chat = await admin.call("GET", "/admin/queues/chat")
            assert status == 200 and chat["paused"] is True
            admitted = chat["admitted"]
            for task in holders:
                task.cancel()
            await until(lambda: proxy.state.scheduler.queues["chat"].active == 0)
            extra.append(start(post(proxy, body(), ask("sk-alpha", ttft_ms=HOLD_MS))))
            await until(lambda: len(proxy.state.scheduler.queues["chat"].board) == 6)
            rows = await page_matches_api(page, admin)
            assert rows["chat"] | {"classes": None} == {
                "active": "0 / 2", "waiting": "6", "state": "paused", "classes": None,
            }
            status, chat = await admin.call("GET", "/admin/queues/chat")
            assert chat["admitted"] == admitted and chat["waiting"] == 6 and chat["active"] == 0

            # Resume from the page: two of the waiters get the free slots.
            await page.click("#queues tr.queue[data-queue='chat'] button[data-action='resume']")
            await until(lambda: proxy.state.scheduler.queues["chat"].active == 2, within=15)
            rows = await page_matches_api(page, admin)
            assert rows["chat"]["state"] == "running" and rows["chat"]["waiting"] == "4"
    finally:
        for task in holders + waiters + extra:
            task.cancel()
        await asyncio.gather(*holders, *waiters, *extra, return_exceptions=True)


# --- the data needs the token; the page does not ----------------------------------------------------------


async def get(url: str, token: str | None = None) -> tuple[int, dict[str, str], bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as response:
        return response.status, dict(response.headers), await response.content.read(4096)


async def test_the_live_data_needs_the_token_and_the_page_holds_none(
    start_proxy: StartProxy, mock_url: str, serve_admin: Any
) -> None:
    proxy = await start_proxy(policy(mock_url))
    await warm_up(proxy)
    admin = await serve_admin(proxy)
    assert (await get(admin.url + LIVE))[0] == 401
    assert (await get(admin.url + LIVE, "wrong-token"))[0] == 401
    locked = await serve_admin(proxy, environ={})
    assert (await get(locked.url + LIVE))[0] == 403
    for name in ("", "/dashboard.js", "/dashboard.css"):
        status, headers, page = await get(locked.url + PAGE + name)  # readable even on a locked admin API
        assert status == 200, name
        assert "default-src 'none'" in headers["Content-Security-Policy"]
        for data in (b"alpha", b"gamma", b"chat", b"rate_limit"):
            assert data not in page, (name, data)
    assert (await get(admin.url + PAGE + "/secrets.json", TOKEN))[0] == 404
    for trick in ("/secrets.json", "/../queues", "/%2e%2e/queues", "/..%2fqueues", "/../live"):
        assert (await get(admin.url + PAGE + trick))[0] in (401, 404), trick  # never the data without the token
    # Only GET: a page path does not open the rest of the API.
    async with aiohttp.ClientSession() as session, session.post(admin.url + PAGE) as response:
        assert response.status == 401


# --- the live feed -------------------------------------------------------------------------------------------


async def events(response: aiohttp.ClientResponse) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """Server-Sent Events as (event, data)."""
    name, data = "message", b""
    async for line in response.content:
        line = line.rstrip(b"\r\n")
        if not line:
            yield name, orjson.loads(data) if data else {}
            name, data = "message", b""
        elif line.startswith(b"event:"):
            name = line[6:].strip().decode()
        elif line.startswith(b"data:"):
            data += line[5:].strip()


async def test_the_live_feed_sends_snapshots_and_stops_when_the_client_leaves(
    start_proxy: StartProxy, mock_url: str, loopback: Loopback
) -> None:
    proxy = await start_proxy(policy(mock_url))
    await warm_up(proxy)
    app = build_admin_app(proxy.app, environ={"SIGNALBOX_ADMIN_TOKEN": TOKEN})
    hub = app[HUB]
    hub.settings.max_streams = 1
    url = await loopback.serve(app)
    async with aiohttp.ClientSession() as session:
        response = await session.get(url + LIVE, headers={"Authorization": f"Bearer {TOKEN}"})
        assert response.status == 200 and response.headers["Content-Type"].startswith("text/event-stream")
        assert (await get(url + LIVE, TOKEN))[0] == 503  # bounded: one stream at most here
        stream = events(response)
        name, first = await anext(stream)
        assert name == "snapshot" and first["status"] in ("healthy", "degraded")
        (chat,) = first["queues"]
        assert (chat["name"], chat["active"], chat["slots"], chat["waiting"]) == ("chat", 0, 2, 0)
        assert chat["finished"] == 10 and chat["rejected"] == 1
        (route,) = first["traffic"]["routes"]
        assert route["route"] == "chat" and route["requests"] == 10
        assert route["outcomes"] == {"ok": 8, "upstream_error": 1, "rejected": 1}
        assert route["error_rate"] == 0.1 and route["rejection_rate"] == 0.1
        assert route["ttft_ms"]["samples"] == 3 and route["ttft_ms"]["p50"] >= 100  # the mock waited 120 ms
        assert [(r["tenant"], r["reason"], r["status"]) for r in first["refusals"]["recent"]] == [
            ("gamma", "rate_limit", 429)
        ]
        kinds = {limit["key"]: limit["kind"] for limit in first["limits"]}
        assert kinds["tenant:alpha"] == "tenant" and kinds["route:chat"] == "route"
        assert kinds["upstream:mock"] == "upstream"
        # A refused request whose id is the upstream key (a client may send any id): the feed never shows it.
        rid = {"x-request-id": UPSTREAM_KEY}
        assert (await post(proxy, body(), ask("sk-gamma") | rid))[0] == 429
        async with asyncio.timeout(10):
            async for name, data in stream:
                if name == "snapshot" and data["refusals"]["total"] == 2:
                    break
        assert UPSTREAM_KEY not in orjson.dumps(data).decode()
        assert data["refusals"]["recent"][0]["reason"] == "rate_limit"
        # A change goes out as a new snapshot: a request waits.
        holder = start(post(proxy, body(), ask("sk-alpha", ttft_ms=HOLD_MS)))
        try:
            async with asyncio.timeout(10):
                async for name, data in stream:
                    if name == "snapshot" and data["queues"][0]["active"] == 1:
                        break
        finally:
            holder.cancel()
        response.close()  # the client leaves
        await until(lambda: not hub.streams)
    assert (await get(url + LIVE, TOKEN))[0] == 200  # the slot it held is free again


async def test_an_idle_feed_sends_heartbeats_and_ends_at_shutdown(
    start_proxy: StartProxy, mock_url: str, loopback: Loopback
) -> None:
    proxy = await start_proxy(policy(mock_url))
    app = build_admin_app(proxy.app, environ={"SIGNALBOX_ADMIN_TOKEN": TOKEN})
    hub = app[HUB]
    hub.settings = LiveSettings(interval=0.05, heartbeat=0.3)
    hub.window = Window(span=1.0)
    url = await loopback.serve(app)
    seen: list[str] = []
    async with aiohttp.ClientSession() as session, session.get(
        url + LIVE, headers={"Authorization": f"Bearer {TOKEN}"}
    ) as response:
        stream = events(response)
        async with asyncio.timeout(20):
            async for name, data in stream:
                seen.append(name)
                if name == "heartbeat":
                    break
                assert name == "snapshot" and data["queues"][0]["waiting"] == 0
        # Nothing changes: the snapshots stop, only heartbeats follow.
        assert seen[0] == "snapshot" and seen[-1] == "heartbeat"
        assert [await anext(stream) for _ in range(2)] == [("heartbeat", mock.ANY), ("heartbeat", mock.ANY)]
        await hub.close()  # what the admin app's shutdown does
        async with asyncio.timeout(5):
            assert await anext(stream) == ("end", {"reason": "shutdown"})
        await until(lambda: not hub.streams)


# --- the install script ------------------------------------------------------------------------------------


@pytest.mark.timeout(900)  # on a machine without chromium, the first run installs it (make tools does it first)
def test_install_chromium_is_idempotent() -> None:
    script = str(REPO / "scripts" / "install-chromium.sh")
    subprocess.run(["bash", script], check=True, capture_output=True, timeout=900)
    again = subprocess.run(["bash", script], check=True, capture_output=True, text=True, timeout=60)
    assert again.stdout == "" and again.stderr == ""
    assert shutil.which("chromium") and shutil.which("chromedriver")
