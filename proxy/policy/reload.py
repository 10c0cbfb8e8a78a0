"""Hot reload: build the new plan aside, validate it, then swap one reference; on error keep the old one.

Triggers: a watcher that polls the policy directory's content digest (a ConfigMap update swaps a
`..data` symlink, so file inodes and mtimes are not reliable; hashing a few small files every
couple of seconds is), SIGHUP, and `POST /admin/reload`. Requests in flight keep the plan object
they started with; state keyed by name (limiters, queues, upstream pools) is re-configured by the
listeners, not reset.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from proxy.policy.compile import compile_plan
from proxy.policy.load import LoadedPolicy, PolicyError, load_policy, policy_files
from proxy.policy.plan import Plan

log = logging.getLogger("signalbox.policy")

Listener = Callable[[Plan, LoadedPolicy], Awaitable[None]]


@dataclass(slots=True)
class ReloadStatus:
    """What `GET /admin/policy` shows and what the reload metrics export."""

    source: str
    digest: str
    version: int = 1
    loaded_at: float = field(default_factory=time.time)
    last_attempt_at: float | None = None
    last_error: list[str] | None = None
    failures: int = 0
    successes: int = 0


def source_digest(path: Path) -> str:
    """The same digest `load_policy` computes, without parsing: cheap enough to poll."""
    digest = hashlib.sha256()
    for file in policy_files(path):
        try:
            digest.update(file.name.encode() + b"\0" + file.read_bytes() + b"\0")
        except OSError:
            digest.update(file.name.encode() + b"\0<unreadable>\0")
    return digest.hexdigest()


class Reloader:
    """Owns the active plan's life cycle; ingress reads `runtime.plans.current`, never this object."""

    def __init__(self, source: Path, loaded: LoadedPolicy, swap: Callable[[Plan], None]) -> None:
        self.source = source
        self.loaded = loaded
        self._swap = swap
        self._listeners: list[Listener] = []
        self._lock = asyncio.Lock()
        self.status = ReloadStatus(str(source), loaded.digest)

    def on_change(self, listener: Listener) -> None:
        """Called with the new plan before it is swapped in (e.g. to open pools for new upstreams)."""
        self._listeners.append(listener)

    async def reload(self, *, force: bool = False) -> bool:
        """Returns True when a new plan is active, False when nothing changed or the new files are bad."""
        async with self._lock:
            self.status.last_attempt_at = time.time()
            try:
                loaded = await asyncio.to_thread(load_policy, self.source)
                if loaded.digest == self.loaded.digest and not force:
                    self.status.last_error = None  # back to the serving version: nothing is wrong any more
                    return False
                plan = compile_plan(loaded)
                for listener in self._listeners:
                    await listener(plan, loaded)
            except PolicyError as exc:
                self._failed([str(p) for p in exc.problems])
                return False
            except Exception as exc:  # a reload must never take the serving plan down
                log.exception("policy reload failed")
                self._failed([f"{type(exc).__name__}: {exc}"])
                return False
            self._swap(plan)
            self.loaded = loaded
            self.status.digest = loaded.digest
            self.status.version += 1
            self.status.loaded_at = time.time()
            self.status.last_error = None
            self.status.successes += 1
            log.info("policy reloaded: version %d, digest %s", self.status.version, loaded.digest[:12])
            return True

    def _failed(self, problems: list[str]) -> None:
        self.status.failures += 1
        if problems != self.status.last_error:
            for problem in problems:
                log.error("policy reload rejected, still serving version %d: %s", self.status.version, problem)
        self.status.last_error = problems

    async def watch(self, interval: float = 2.0, reload: Callable[[], Awaitable[bool]] | None = None) -> None:
        """Poll the directory's digest; reload (via `reload`, default `self.reload`) when it changes."""
        seen = await asyncio.to_thread(source_digest, self.source)
        while True:
            await asyncio.sleep(interval)
            current = await asyncio.to_thread(source_digest, self.source)
            if current != seen:
                seen = current
                await (reload() if reload is not None else self.reload())
