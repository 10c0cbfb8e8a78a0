"""Raw-socket clients for the edge tests: what a slow, idle or broken client sends, and what it got back
before the server closed the connection."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from kit import build_policy, route_spec, upstream_spec

from proxy.ingress.edge.connection import GuardedRunner
from proxy.runtime import ClientTimeouts

TENANT_KEY = "sk-alpha-SECRET-4be1d0-tenant"
GIVE_UP = 30.0
"""A test fails if the server has not closed the connection by then (the configured limits are < 1 s)."""


def policy(base_url: str, identify: dict[str, str] | None = None) -> str:
    return build_policy(
        {"up": upstream_spec(base_url)},
        [route_spec("all", "up")],
        tenants={"alpha": {"keys": [TENANT_KEY]}},
        identify=identify or {"mode": "api_key"},
    )


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        assert self.headers.get("content-type", "").startswith("application/json"), self.headers
        return orjson.loads(self.body)


@dataclass
class Conversation:
    """Everything the server sent on one connection, until it closed it."""

    raw: bytes = b""
    closed_by_server: bool = False
    answers: list[Answer] = field(default_factory=list)


def split_answers(raw: bytes) -> list[Answer]:
    """The HTTP/1.1 responses in `raw`, in order (Content-Length and chunked bodies)."""
    found: list[Answer] = []
    while raw:
        head, sep, raw = raw.partition(b"\r\n\r\n")
        assert sep, f"an incomplete response head: {head[:200]!r}"
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        if headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                size_line, _, raw = raw.partition(b"\r\n")
                size = int(size_line, 16)
                body, raw = body + raw[:size], raw[size + 2 :]
                if size == 0:
                    break
        else:
            length = int(headers.get("content-length", "0"))
            body, raw = raw[:length], raw[length:]
        found.append(Answer(status, headers, body))
    return found


async def converse(
    port: int, send: Callable[[asyncio.StreamWriter], Awaitable[None]] | bytes
) -> Conversation:
    """Connect, send (bytes, or a coroutine that writes at its own pace), and read until the server
    closes the connection (or GIVE_UP passes: the test then fails on `closed_by_server`)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    talk = Conversation()

    async def sender() -> None:
        with contextlib.suppress(ConnectionError):
            if isinstance(send, bytes):
                writer.write(send)
                await writer.drain()
            else:
                await send(writer)

    task = asyncio.get_running_loop().create_task(sender())
    try:
        async with asyncio.timeout(GIVE_UP):
            while chunk := await reader.read(65536):
                talk.raw += chunk
            talk.closed_by_server = True
    except TimeoutError:
        pass  # still open: `closed_by_server` stays False
    except ConnectionResetError:
        talk.closed_by_server = True
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    talk.answers = split_answers(talk.raw)
    return talk


async def serve_admin(proxy_app: web.Application, timeouts: ClientTimeouts) -> tuple[GuardedRunner, int]:
    """The admin API of `proxy_app` on its own guarded runner, as `signalbox serve` starts it."""
    from proxy.admin import build_admin_app

    admin = build_admin_app(proxy_app, environ={"SIGNALBOX_ADMIN_TOKEN": "admin-token-SECRET-91f2"})
    runner = GuardedRunner(admin, timeouts, admin=True, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, runner.addresses[0][1]
