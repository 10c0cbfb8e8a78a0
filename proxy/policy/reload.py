"""Hot reload: build the new plan aside, validate it, then swap one reference; on error keep the old one.

Triggers: a watcher that polls the policy directory's content digest (a ConfigMap update swaps a
`..data` symlink, so file inodes and mtimes are not reliable; hashing a few small files every
couple of seconds is, and needs no inotify library that a read-only ConfigMap mount defeats
anyway), SIGHUP, and `POST /admin/reload`. Requests in flight keep the plan object they started
with; state keyed by name (limiters, queues, upstream pools) is re-configured by the listeners,
not reset.

Two kinds of listener: `on_change` runs before the swap and may refuse the plan by raising (it
prepares things that can fail, such as opening pools for new upstreams); `on_swap` runs right
after it and must not fail (it hands the new numbers to limiters and queues).
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
from proxy.policy.load import LoadedPolicy, PolicyError, Problem, load_policy, policy_files
from proxy.policy.plan import Plan
from proxy.policy.units import secret_files_fingerprint

log = logging.getLogger("signalbox.policy")

Listener = Callable[[Plan, LoadedPolicy], Awaitable[None]]


@dataclass(slots=True)
class ReloadStatus:
    """What `GET /admin/policy` shows and what the reload metrics export."""

    source: str
    digest: str
    version: int = 1
    """1 for the policy the process started with, +1 for every reload that swapped a new plan in."""
    loaded_at: float = field(default_factory=time.time)
    last_attempt_at: float | None = None
    last_trigger: str | None = None
    last_error: list[Problem] | None = None
    """Why the last attempt was refused (each problem with its file:line), None once a good version
    (or the serving one) is read again."""
    failed_digest: str | None = None
    """The source digest of the refused version, so an operator can tell which edit it was."""
    failures: int = 0
    successes: int = 0


@dataclass(frozen=True, slots=True)
class ReloadResult:
    changed: bool
    """A new plan is serving."""
    problems: tuple[Problem, ...] = ()
    """Why the new files were refused (empty when they were not)."""

    @property
    def failed(self) -> bool:
        return bool(self.problems)


def source_digest(path: Path) -> str:
    """The same digest `load_policy` computes, without parsing: cheap enough to poll."""
    return _source_version(path)[0]


def _source_version(path: Path) -> tuple[str, str]:
    """What `load_policy` reports as (digest, secrets), without parsing: cheap enough to poll."""
    digest = hashlib.sha256()
    texts: list[str] = []
    for file in policy_files(path):
        try:
            raw = file.read_bytes()
        except OSError:
            digest.update(file.name.encode() + b"\0<unreadable>\0")
            continue
        digest.update(file.name.encode() + b"\0" + raw + b"\0")
        texts.append(raw.decode("utf-8", errors="replace"))
    return digest.hexdigest(), secret_files_fingerprint(texts)


class Reloader:
    """Owns the active plan's life cycle; ingress reads `runtime.plans.current`, never this object."""

    def __init__(self, source: Path, loaded: LoadedPolicy, swap: Callable[[Plan], None]) -> None:
        self.source = source
        self.loaded = loaded
        self._swap = swap
        self._prepare: list[Listener] = []
        self._commit: list[Listener] = []
        self._lock = asyncio.Lock()
        self.status = ReloadStatus(str(source), loaded.digest)

    def on_change(self, listener: Listener) -> None:
        """Called with the new plan before it is swapped in; raising refuses the plan."""
        self._prepare.append(listener)

    def on_swap(self, listener: Listener) -> None:
        """Called with the new plan right after it is swapped in (reconfigure state kept by name)."""
        self._commit.append(listener)

    async def reload(self, *, force: bool = False, trigger: str = "manual") -> ReloadResult:
        """Load, validate, compile and swap. Unchanged files (same digest) are a no-op unless `force`."""
        async with self._lock:
            self.status.last_attempt_at = time.time()
            self.status.last_trigger = trigger
            try:
                loaded = await asyncio.to_thread(load_policy, self.source)
                same = (loaded.digest, loaded.secrets) == (self.loaded.digest, self.loaded.secrets)
                if same and not force:
                    self._clear_error()  # back to the serving version: nothing is wrong any more
                    return ReloadResult(False)
                plan = compile_plan(loaded)
                for listener in self._prepare:
                    await listener(plan, loaded)
            except PolicyError as exc:
                return await self._failed(exc.problems)
            except Exception as exc:  # a reload must never take the serving plan down
                log.exception("policy reload failed")
                return await self._failed([Problem(None, "", f"{type(exc).__name__}: {exc}")])
            self._swap(plan)
            self.loaded = loaded
            status = self.status
            status.digest = loaded.digest
            status.version += 1
            status.loaded_at = time.time()
            status.successes += 1
            self._clear_error()
            for listener in self._commit:
                try:
                    await listener(plan, loaded)
                except Exception:  # the plan is serving already; say so loudly, keep going
                    log.exception("reconfiguring after the policy swap failed")
            log.info(
                "policy reloaded (%s): version %d, digest %s", trigger, status.version, loaded.digest[:12]
            )
            return ReloadResult(True)

    def _clear_error(self) -> None:
        self.status.last_error = None
        self.status.failed_digest = None

    async def _failed(self, problems: list[Problem]) -> ReloadResult:
        status = self.status
        status.failures += 1
        if problems != status.last_error:  # one log burst per bad version, not one per poll
            for problem in problems:
                log.error("policy reload rejected, still serving version %d: %s", status.version, problem)
        try:
            failed_digest: str | None = await asyncio.to_thread(source_digest, self.source)
        except OSError:
            failed_digest = None
        # Both at once (no await between): a reader never sees the new error with the old digest.
        status.last_error, status.failed_digest = list(problems), failed_digest
        return ReloadResult(False, tuple(problems))

    async def watch(self, interval: float, reload: Callable[[], Awaitable[object]]) -> None:
        """Poll the directory's digest, and the secret files the policy reads, every `interval` seconds;
        call `reload` when either changes (a rotated key file is applied without a restart).

        A refused version is tried once: the next attempt comes with the next change (or SIGHUP).
        """
        seen = (self.loaded.digest, self.loaded.secrets)  # changes since start-up count as a change
        while True:
            await asyncio.sleep(interval)
            try:
                current = await asyncio.to_thread(_source_version, self.source)
            except OSError as exc:  # the directory is being swapped or is gone: look again later
                log.warning("policy watch: cannot read %s: %s", self.source, exc)
                continue
            if current != seen:
                seen = current
                await reload()
