"""Slow-drip and idle clients, on raw sockets against the proxy with small client timeouts: each form is
closed by the server (with a 408 in JSON when the client had sent part of a request), on the public port
and on the admin port, and a client that is merely slow within the limits is served."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import Awaitable, Callable

import pytest
from conftest import EchoUpstream, Proxy
from edge_helpers import TENANT_KEY, Conversation, converse, policy, serve_admin
from test_cli import PYTHON, REPO, child_env, free_port

from proxy.runtime import ClientTimeouts, Settings

pytestmark = pytest.mark.timeout(60)

StartProxy = Callable[..., Awaitable[Proxy]]
FAST = ClientTimeouts(header=0.5, body_idle=0.5, body=2.0, keepalive=0.5)
HEAD = f"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nAuthorization: Bearer {TENANT_KEY}\r\n"
CHAT = b'{"model": "gpt-x", "messages": [{"role": "user", "content": "hi"}]}'


@pytest.fixture
async def port(start_proxy: StartProxy, echo: EchoUpstream) -> int:
    proxy = await start_proxy(policy(echo.url), settings=Settings(client_timeouts=FAST))
    return int(proxy.url.rsplit(":", 1)[1])


async def silent(writer: asyncio.StreamWriter) -> None:
    await asyncio.Event().wait()  # sends nothing, ever (cancelled when the server closes)


def drip(first: bytes, each: bytes, every: float) -> Callable[[asyncio.StreamWriter], Awaitable[None]]:
    async def send(writer: asyncio.StreamWriter) -> None:
        writer.write(first)
        while True:
            await writer.drain()
            await asyncio.sleep(every)
            writer.write(each)

    return send


def assert_timed_out(talk: Conversation, *, mentions: str) -> None:
    assert talk.closed_by_server, "the proxy kept the connection open"
    assert [a.status for a in talk.answers] == [408], talk.raw[:300]
    error = talk.answers[0].json()["error"]
    assert error["code"] == "request_timeout" and mentions in error["message"]
    assert talk.answers[0].headers.get("connection") == "close"


async def test_a_connection_that_sends_nothing_is_closed_without_an_answer(port: int) -> None:
    talk = await converse(port, silent)
    assert talk.closed_by_server and talk.raw == b""


async def test_an_unfinished_request_line_gets_a_408_and_is_closed(port: int) -> None:
    talk = await converse(port, drip(b"POST /v1/chat/compl", b"", 3600))
    assert_timed_out(talk, mentions="--header-timeout")


async def test_headers_sent_one_line_at_a_time_get_a_408_and_are_closed(port: int) -> None:
    talk = await converse(port, drip(HEAD.encode(), b"X-Drip: still-coming\r\n", 0.1))
    assert_timed_out(talk, mentions="--header-timeout")


async def test_an_idle_kept_alive_connection_is_closed_after_its_answer(port: int) -> None:
    async def one_request_then_idle(writer: asyncio.StreamWriter) -> None:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: proxy\r\n\r\n")
        await silent(writer)

    talk = await converse(port, one_request_then_idle)
    assert talk.closed_by_server
    assert [a.status for a in talk.answers] == [200]
    assert talk.answers[0].headers.get("connection") != "close"  # kept alive, then closed for idleness


async def test_the_next_head_on_a_kept_alive_connection_is_timed_too(port: int) -> None:
    async def one_request_then_half_a_head(writer: asyncio.StreamWriter) -> None:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: proxy\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.1)
        await drip(b"GET /v1/mo", b"d", 0.1)(writer)

    talk = await converse(port, one_request_then_half_a_head)
    assert talk.closed_by_server
    assert [a.status for a in talk.answers] == [200, 408]
    assert "--header-timeout" in talk.answers[1].json()["error"]["message"]


@pytest.mark.parametrize("sent", [0, 10])
async def test_a_body_that_stops_gets_a_408_and_is_closed(port: int, sent: int) -> None:
    head = f"{HEAD}Content-Type: application/json\r\nContent-Length: {len(CHAT)}\r\n\r\n".encode()
    talk = await converse(port, drip(head + CHAT[:sent], b"", 3600))
    assert_timed_out(talk, mentions="--body-idle-timeout")


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_body_that_trickles_gets_a_408_and_is_closed(port: int, framing: str) -> None:
    """One byte every 0.1 s: never idle for 0.5 s, so only the total body limit (2 s) can end it."""
    if framing == "chunked":
        head = f"{HEAD}Transfer-Encoding: chunked\r\n\r\n".encode()
        sender = drip(head + b"1\r\n{\r\n", b"1\r\n \r\n", 0.1)
    else:
        head = f"{HEAD}Content-Length: 100000\r\n\r\n".encode()
        sender = drip(head + b"{", b" ", 0.1)
    talk = await converse(port, sender)
    assert_timed_out(talk, mentions="--body-timeout")


async def test_a_client_slow_within_every_limit_is_served(port: int, echo: EchoUpstream) -> None:
    """Head split in two, body in three parts, each gap shorter than its limit but the sum longer than
    the header and body-idle limits: timers restart where they should, and the request goes through
    (then the idle connection is closed)."""
    head = f"{HEAD}Content-Type: application/json\r\nContent-Length: {len(CHAT)}\r\n\r\n"

    async def slow(writer: asyncio.StreamWriter) -> None:
        for part in (head[:40].encode(), head[40:].encode(), CHAT[:20], CHAT[20:40], CHAT[40:]):
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(0.3)
        await silent(writer)

    talk = await converse(port, slow)
    assert [a.status for a in talk.answers] == [200]
    assert echo.last.body == CHAT
    assert talk.closed_by_server


async def test_a_head_within_its_limit_is_not_cut_by_a_shorter_keepalive(
    start_proxy: StartProxy, echo: EchoUpstream
) -> None:
    timeouts = ClientTimeouts(header=2.0, body_idle=0.5, body=2.0, keepalive=0.3)
    proxy = await start_proxy(policy(echo.url), settings=Settings(client_timeouts=timeouts))

    async def pause_mid_head(writer: asyncio.StreamWriter) -> None:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: proxy\r\n")
        await writer.drain()
        await asyncio.sleep(0.8)  # past the keep-alive limit, within the header limit
        writer.write(b"\r\n")
        await silent(writer)

    talk = await converse(int(proxy.url.rsplit(":", 1)[1]), pause_mid_head)
    assert [a.status for a in talk.answers] == [200]
    assert talk.closed_by_server  # by the keep-alive limit, once idle after the answer


async def test_the_admin_port_closes_slow_and_idle_clients_too(start_proxy: StartProxy, echo: EchoUpstream) -> None:
    proxy = await start_proxy(policy(echo.url), settings=Settings(client_timeouts=FAST))
    runner, admin_port = await serve_admin(proxy.app, FAST)
    try:
        nothing = await converse(admin_port, silent)
        assert nothing.closed_by_server and nothing.raw == b""
        dripping = await converse(admin_port, drip(b"GET /admin/queues HTTP/1.1\r\n", b"X-Drip: 1\r\n", 0.1))
        assert_timed_out(dripping, mentions="--header-timeout")
    finally:
        await runner.cleanup()


def test_serve_takes_the_timeouts_from_its_flags() -> None:
    """`signalbox serve --header-timeout ...`: both ports close a client that sends half a request line."""
    port, admin_port = free_port(), free_port()
    args = ["serve", "--policies", "policies/default.yaml", "--port", str(port), "--admin-port", str(admin_port)]
    flags = ["--header-timeout", "300ms", "--body-idle-timeout", "1s", "--body-timeout", "2s",
             "--keepalive-timeout", "1s", "--shutdown-grace", "0"]
    child = subprocess.Popen([PYTHON, "-m", "proxy", *args, *flags], cwd=REPO, env=child_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for target in (port, admin_port):
            talk = asyncio.run(_when_listening(target))
            assert_timed_out(talk, mentions="0.3 s")
    finally:
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(timeout=15)
        finally:
            if child.poll() is None:
                os.kill(child.pid, signal.SIGKILL)
                child.wait(timeout=5)
        assert child.stderr is not None
        child.stderr.close()


async def _when_listening(port: int) -> Conversation:
    for _ in range(200):
        try:
            return await converse(port, drip(b"GET /v1/mod", b"", 3600))
        except OSError:
            await asyncio.sleep(0.05)
    raise AssertionError(f"nothing listening on {port}")
