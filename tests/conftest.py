"""Shared fixtures for the end-to-end tests: policies written to tmp_path, the proxy on loopback in the
test's own event loop, an echo upstream that records exactly what reached it and answers whatever a test
scripts, and openai SDK clients that are closed at teardown."""

from __future__ import annotations

import asyncio
import io
import socket
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from aiohttp import web
from kit import Loopback
from multidict import CIMultiDict
from stream_helpers import Servers

from proxy.app import build_app
from proxy.ingress.edge.connection import GuardedRunner
from proxy.policy.compile import compile_plan
from proxy.policy.load import load_policy
from proxy.policy.plan import Plan
from proxy.runtime import STATE, Runtime, Settings
from proxy.streaming.relay import StreamSettings
from proxy.telemetry.logging import AccessLog

# A recognisable upstream key: tests assert it never reaches a client, a log line or the access log.
UPSTREAM_KEY = "sk-upstream-SECRET-7f3a9c-do-not-leak"


def closed_port() -> int:
    """A loopback port with nothing listening (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture(autouse=True)
def _upstream_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """Test policies name the upstream key as ${TEST_UPSTREAM_KEY}."""
    monkeypatch.setenv("TEST_UPSTREAM_KEY", UPSTREAM_KEY)


@pytest.fixture
async def servers() -> AsyncIterator[Servers]:
    """Loopback upstreams a test starts, stopped at teardown (resilience tests use their own kind)."""
    started = Servers()
    yield started
    await started.close()


# --- policies ---------------------------------------------------------------------------------------


@pytest.fixture
def write_policy(tmp_path: Path) -> Callable[..., Path]:
    """write_policy(text, name="policy.yaml", directory=tmp_path) -> the file's path (text is dedented)."""

    def write(text: str, name: str = "policy.yaml", directory: Path | None = None) -> Path:
        path = (directory or tmp_path) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"))
        return path

    return write


@pytest.fixture
def make_plan(write_policy: Callable[..., Path]) -> Callable[[str], Plan]:
    def make(text: str) -> Plan:
        return compile_plan(load_policy(write_policy(text, name="proxy-policy.yaml")))

    return make


# --- the proxy --------------------------------------------------------------------------------------


@dataclass
class Proxy:
    url: str
    app: web.Application
    log: io.BytesIO
    """Everything the access log wrote."""

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    @property
    def state(self) -> Runtime:
        return self.app[STATE]

    def access_lines(self) -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in self.log.getvalue().splitlines() if line]


@pytest.fixture
async def loopback() -> AsyncIterator[Loopback]:
    """loopback.serve(app, **runner_options) -> the URL of `app` on 127.0.0.1; stopped at teardown."""
    servers = Loopback()
    yield servers
    await servers.close()


async def serve_proxy(servers: Loopback, app: web.Application) -> str:
    """The proxy runs under GuardedRunner, with its client timeouts and JSON answers."""
    timeouts = app[STATE].settings.client_timeouts
    return await servers.serve(
        app, runner=lambda a, **o: GuardedRunner(a, timeouts, **o), handler_cancellation=True
    )


@pytest.fixture
async def start_proxy(
    make_plan: Callable[[str], Plan], loopback: Loopback
) -> AsyncIterator[Callable[..., Awaitable[Proxy]]]:
    """await start_proxy(policy_yaml, heartbeat=0.0) -> a running Proxy; stopped at teardown.

    Heartbeats are off by default so stream bytes are deterministic; tests that want them pass one.
    """
    async def start(policy: str, *, heartbeat: float = 0.0, settings: Settings | None = None) -> Proxy:
        plan = make_plan(policy)
        app = build_app(plan, settings or Settings(stream=StreamSettings(heartbeat=heartbeat)))
        log = io.BytesIO()
        app[STATE].access_log = AccessLog(stream=log, enabled=True)
        return Proxy(await serve_proxy(loopback, app), app, log)

    yield start


# --- the echo upstream ------------------------------------------------------------------------------


@dataclass
class Received:
    """One request exactly as the upstream saw it."""

    method: str
    path: str
    query_string: str
    headers: list[tuple[str, str]]
    """Raw header lines in arrival order (names as sent, duplicates kept)."""
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.header_all(name)
        return values[-1] if values else None

    def header_all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    @property
    def header_names(self) -> set[str]:
        return {k.lower() for k, _ in self.headers}


@dataclass
class Reply:
    """What the echo upstream answers. `chunks` makes it a streamed body, written one write at a time."""

    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=lambda: [("Content-Type", "application/json")])
    body: bytes = b'{"echo": true}'
    chunks: list[bytes] | None = None
    gap: float = 0.0
    """Pause after each chunk (forces separate TCP reads)."""
    linger: float = 0.0
    """Keep the response open this long after the last chunk before ending it."""


@dataclass
class EchoUpstream:
    url: str
    """Root URL (no path); policies use e.g. `{url}/v1` as base_url."""
    received: list[Received] = field(default_factory=list)
    script: list[Reply] = field(default_factory=list)
    default: Reply = field(default_factory=Reply)
    cancelled: int = 0
    """Responses cut short because the proxy closed the connection."""
    finished: int = 0
    """Streamed responses the upstream wrote to their end."""

    def reply(self, *replies: Reply) -> None:
        self.script.extend(replies)

    @property
    def last(self) -> Received:
        assert self.received, "the echo upstream received nothing"
        return self.received[-1]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers]
        self.received.append(
            Received(
                request.method,
                request.raw_path.split("?")[0],
                request.rel_url.raw_query_string,
                headers,
                body,
            )
        )
        reply = self.script.pop(0) if self.script else self.default
        if reply.chunks is None:
            return web.Response(status=reply.status, body=reply.body, headers=CIMultiDict(reply.headers))
        response = web.StreamResponse(status=reply.status, headers=CIMultiDict(reply.headers))
        try:
            await response.prepare(request)
            for chunk in reply.chunks:
                await response.write(chunk)
                if reply.gap:
                    await asyncio.sleep(reply.gap)
            if reply.linger:
                await asyncio.sleep(reply.linger)
            await response.write_eof()
            self.finished += 1
        except (asyncio.CancelledError, ConnectionResetError):
            self.cancelled += 1
            raise
        return response


@pytest.fixture
async def echo(loopback: Loopback) -> EchoUpstream:
    app = web.Application(client_max_size=64 * 1024**2)
    upstream = EchoUpstream(url="")
    app.router.add_route("*", "/{tail:.*}", upstream.handle)
    upstream.url = await loopback.serve(app, handler_cancellation=True)
    return upstream


# --- openai SDK clients -------------------------------------------------------------------------------


@pytest.fixture
async def async_openai() -> AsyncIterator[Callable[..., openai.AsyncOpenAI]]:
    """async_openai(proxy, key="sk-alpha", **kw) -> AsyncOpenAI on the proxy; max_retries=0, 10 s timeout."""
    clients: list[openai.AsyncOpenAI] = []

    def make(proxy: Proxy, key: str = "sk-alpha", **kwargs: Any) -> openai.AsyncOpenAI:
        kwargs.setdefault("max_retries", 0)
        kwargs.setdefault("timeout", 10.0)
        client = openai.AsyncOpenAI(base_url=proxy.v1, api_key=key, **kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


@pytest.fixture
def sync_openai() -> Iterator[Callable[..., openai.OpenAI]]:
    """sync_openai(proxy, key="sk-alpha", **kw) -> OpenAI; call it via asyncio.to_thread (the proxy runs in
    the test's loop)."""
    clients: list[openai.OpenAI] = []

    def make(proxy: Proxy, key: str = "sk-alpha", **kwargs: Any) -> openai.OpenAI:
        kwargs.setdefault("max_retries", 0)
        kwargs.setdefault("timeout", 10.0)
        client = openai.OpenAI(base_url=proxy.v1, api_key=key, **kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()
