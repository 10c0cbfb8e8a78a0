"""The frontend helper (GET /signalbox/v1/client.js) and its demo page (GET /signalbox/v1/demo with `serve
--demo`), in headless Chromium against the mock upstream: the page streams the mock's whole text over SSE and
over a WebSocket, with one DOM update per animation frame; Cancel stops the upstream (the mock sees the
connection close, the queue slot comes back); a dropped connection resumes with the whole text and nothing
twice. The module's SSE parser is checked in the browser on fixed input."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from conftest import Proxy
from kit import build_policy, route_spec, scrape, total, until, upstream_spec
from kit.browser import Page, chromium
from unified_helpers import chat

from proxy.ingress.unified.frontend import CLIENT_PATH, DEMO_PATH
from proxy.mock.server import MOCK_STATS, MockSettings, build_mock_app
from proxy.runtime import Settings
from proxy.streaming.settings import StreamSettings

pytestmark = pytest.mark.timeout(90)
StartProxy = Callable[..., Awaitable[Proxy]]
KEY = "sk-alpha"
PROMPT = "Tell me about the lever frame of a signal box."


class Mock:
    def __init__(self, app: Any, url: str) -> None:
        self.app = app
        self.url = url

    @property
    def disconnects(self) -> int:
        return int(self.app[MOCK_STATS].disconnects)

    async def text(self, prompt: str, **headers: str) -> str:
        """The mock's answer to `prompt` without a stream: what every stream of it must add up to."""
        sent = {"x-mock-" + k.replace("_", "-"): v for k, v in headers.items()}
        async with aiohttp.ClientSession() as http, http.post(
            self.url + "/v1/chat/completions", json=chat(prompt=prompt), headers=sent
        ) as resp:
            assert resp.status == 200
            answer = await resp.json()
        text: str = answer["choices"][0]["message"]["content"]
        return text


@pytest.fixture
async def mock(loopback: Any) -> AsyncIterator[Mock]:
    app = build_mock_app(MockSettings(output_tokens=40))
    yield Mock(app, await loopback.serve(app, handler_cancellation=True))


def policy(url: str, stream: dict[str, Any] | None = None) -> str:
    route = route_spec("chat", "up", queue="q", **({"stream": stream} if stream else {}))
    return build_policy({"up": upstream_spec(url, "openai")}, [route],
                        queues={"q": {"concurrency": 2, "max_waiting": 10, "max_wait": "10s"}})


async def start(start_proxy: StartProxy, mock: Mock, *, demo: bool = True, **route: Any) -> Proxy:
    settings = Settings(stream=StreamSettings(heartbeat=0.0), demo=demo)
    return await start_proxy(policy(mock.url, **route), settings=settings)


async def active(proxy: Proxy) -> float:
    return total(await scrape(proxy), "signalbox_active_requests", queue="q")


async def open_demo(page: Page, proxy: Proxy, transport: str, tokens: str, delay: str) -> None:
    await page.goto(proxy.url + DEMO_PATH)
    await page.wait_for("return window.signalboxDemo !== undefined")
    await page.run(
        "const set = (id, v) => { document.getElementById(id).value = v; };"
        "set('key', arguments[0]); set('model', 'gpt-4o'); set('transport', arguments[1]);"
        "set('tokens', arguments[2]); set('delay', arguments[3]); set('prompt', arguments[4]);",
        KEY, transport, tokens, delay, PROMPT,
    )


async def finished(page: Page) -> dict[str, Any]:
    """The demo's last result, once the request ended."""
    result: dict[str, Any] = await page.wait_for(
        "const d = window.signalboxDemo; return d.result && {...d.result, frames: d.frames,"
        " reconnects: d.reconnects, answer: document.getElementById('answer').textContent,"
        " status: document.getElementById('status').dataset.state};", within=30.0,
    )
    return result


async def test_the_module_is_served_with_its_type_and_caching_and_the_demo_only_when_asked(
    start_proxy: StartProxy, mock: Mock
) -> None:
    quiet = await start(start_proxy, mock, demo=False)
    async with aiohttp.ClientSession() as http:
        async with http.get(quiet.url + CLIENT_PATH) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "text/javascript; charset=utf-8"
            assert "max-age=" in resp.headers["Cache-Control"]
            assert resp.headers["Access-Control-Allow-Origin"] == "*"
            etag = resp.headers["ETag"]
            source = await resp.text()
        assert "export function stream(" in source and "export class SSEParser" in source
        async with http.get(quiet.url + CLIENT_PATH, headers={"If-None-Match": etag}) as resp:
            assert resp.status == 304 and await resp.read() == b""
        async with http.get(quiet.url + DEMO_PATH) as resp:
            assert resp.status == 404  # a proxy without --demo serves no demo
        demo = await start(start_proxy, mock)
        async with http.get(demo.url + DEMO_PATH) as resp:
            assert resp.status == 200 and resp.content_type == "text/html"
            assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
        async with http.get(demo.url + DEMO_PATH + "/demo.js") as resp:
            assert resp.status == 200 and CLIENT_PATH in await resp.text()


async def test_the_sse_parser_on_fixed_input_in_chromium(start_proxy: StartProxy, mock: Mock) -> None:
    proxy = await start(start_proxy, mock)
    async with chromium() as page:
        await page.goto(proxy.url + DEMO_PATH)
        parsed = await page.call(page.driver.execute_async_script, """
            const done = arguments[arguments.length - 1];
            import(arguments[0]).then(({ SSEParser }) => {
              const parser = new SSEParser();
              const chunks = [": ping\\n\\n", "id: 0\\r", "\\nevent: text_delta\\r\\ndata: {\\"a\\"", ":1}\\r\\n\\r\\n",
                              "data: one\\ndata: two\\n", ": a comment in the block\\nid: 7\\n\\n",
                              "event: x\\ndata:no-space\\r\\rdata: tail"];
              done(chunks.flatMap((chunk) => parser.push(chunk)));
            }, (err) => done(String(err)));
        """, proxy.url + CLIENT_PATH)
    assert parsed == [
        {"event": "text_delta", "data": '{"a":1}', "id": "0"},
        {"event": "message", "data": "one\ntwo", "id": "7"},
        {"event": "x", "data": "no-space", "id": "7"},
    ]  # the comment blocks give nothing, the unfinished last block waits for its blank line


@pytest.mark.parametrize("transport", ["sse", "ws"])
async def test_the_page_streams_the_whole_text_one_update_per_frame(
    start_proxy: StartProxy, mock: Mock, transport: str
) -> None:
    proxy = await start(start_proxy, mock)
    expected = await mock.text(PROMPT, output_tokens="300")
    async with chromium() as page:
        await open_demo(page, proxy, transport, tokens="300", delay="0")
        await page.click("#send")
        result = await finished(page)
        assert not [e for e in await page.console() if e["level"] == "SEVERE"]
    assert result["finishReason"] == "stop" and result["status"] == "done", result
    assert result["text"] == expected and result["answer"] == expected
    assert result["usage"]["output_tokens"] == 300
    # 300 deltas arrive faster than frames are painted: merged, far fewer DOM updates than deltas.
    assert result["textEvents"] == 300
    assert 1 <= result["frames"] < result["textEvents"]
    await until(lambda: proxy.state.in_flight == 0)
    assert [line["outcome"] for line in proxy.access_lines()] == ["ok"]


RESUMABLE = {"resumable": {"buffer": "1MiB", "ttl": "30s"}}


@pytest.mark.parametrize("resumable", [False, True], ids=["plain", "resumable"])
@pytest.mark.parametrize("transport", ["sse", "ws"])
async def test_cancel_stops_the_upstream_and_frees_the_slot(
    start_proxy: StartProxy, mock: Mock, transport: str, resumable: bool
) -> None:
    """On a resumable route the generation would go on without its client: Cancel stops it all the same."""
    proxy = await start(start_proxy, mock, **({"stream": RESUMABLE} if resumable else {}))
    full = await mock.text(PROMPT, output_tokens="200")
    async with chromium() as page:
        await open_demo(page, proxy, transport, tokens="200", delay="100")
        await page.click("#send")
        await page.wait_for("return document.getElementById('answer').textContent.length > 0")
        assert await active(proxy) == 1  # the request holds its queue slot while it streams
        await page.click("#cancel")
        result = await finished(page)
    assert result["finishReason"] == "cancelled" and result["status"] == "done"
    assert 0 < len(result["text"]) < len(full) and full.startswith(result["text"])
    await until(lambda: mock.disconnects == 1)  # the proxy closed the upstream connection
    await until(lambda: _idle(proxy))  # and the slot is back
    await until(lambda: proxy.state.in_flight == 0)
    assert [line["outcome"] for line in proxy.access_lines()] == ["cancelled"]


@pytest.mark.parametrize("transport", ["sse", "ws"])
async def test_a_dropped_connection_resumes_with_the_whole_text_and_nothing_twice(
    start_proxy: StartProxy, mock: Mock, transport: str
) -> None:
    proxy = await start(start_proxy, mock, stream=RESUMABLE)
    full = await mock.text(PROMPT, output_tokens="60")
    async with chromium() as page:
        await open_demo(page, proxy, transport, tokens="60", delay="40")
        await page.click("#send")
        await page.wait_for("return document.getElementById('answer').textContent.length > 0")
        await page.click("#drop")
        result = await finished(page)
        log = await page.run("return [...document.querySelectorAll('#log li')].map((li) => li.textContent)")
    assert result["finishReason"] == "stop" and result["status"] == "done", result
    assert result["resumes"] >= 1 and result["reconnects"] >= 1
    assert any(line.startswith("connection dropped: resuming after event") for line in log)
    assert result["text"] == full and result["answer"] == full
    # Every seq exactly once: the proxy sent exactly the events after the last one the page had.
    assert result["repeated"] == 0
    assert result["textEvents"] == 60 and result["events"] == 62  # + usage + stream_complete
    assert mock.disconnects == 0  # the generation went on while the page was away
    await until(lambda: proxy.state.in_flight == 0)
    assert await active(proxy) == 0
    lines = {line["path"]: line for line in proxy.access_lines()}
    # The request (logged when its generation ended), and over SSE its resume as a request of its own.
    assert sorted(lines) == (["/signalbox/v1/stream", "/v1/chat/completions"] if transport == "sse"
                             else ["/v1/chat/completions"]), lines
    # The client it started with left: 499 as any abandoned resumable stream (docs/apps/resumable-streams.md).
    assert lines["/v1/chat/completions"]["status"] == 499
    if transport == "sse":
        assert lines["/signalbox/v1/stream"]["status"] == 200 and lines["/signalbox/v1/stream"]["outcome"] == "ok"


async def _idle(proxy: Proxy) -> bool:
    return await active(proxy) == 0
