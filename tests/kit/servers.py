"""One way to run a test server on loopback: an AppRunner on 127.0.0.1, port chosen by the kernel.

pytest-aiohttp's `aiohttp_server` builds a TestServer without our runner class (the proxy runs under
GuardedRunner, its connection guard) and with handler cancellation forced on; tests here need both
choices, so this small helper owns them instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

Runner = Callable[..., web.AppRunner]


@dataclass
class Loopback:
    """Servers started by one test; `close()` (the `loopback` fixture does it) stops them newest first."""

    runners: list[web.AppRunner] = field(default_factory=list)

    async def serve(self, app: web.Application, *, runner: Runner = web.AppRunner, **options: Any) -> str:
        """Start `app` and return its root URL. `options` go to the runner (keepalive_timeout, ...)."""
        options = {"access_log": None, "shutdown_timeout": 0.5, **options}
        started = runner(app, **options)
        await started.setup()
        self.runners.append(started)
        await web.TCPSite(started, "127.0.0.1", 0).start()
        return f"http://127.0.0.1:{started.addresses[0][1]}"

    async def close(self) -> None:
        while self.runners:
            await self.runners.pop().cleanup()
