"""The Redis limiter store's view of Redis: every call goes through `Health.call(op)` or, for the acquire,
`Health.run(op, ...)`; both bound it in time, ask the circuit breaker first and tell it the outcome
after, and report each change of state once (a log line, the `signalbox_limiter_degraded` gauge, the
/readyz detail).

A slow answer is not an outage. The bound (`state.timeout`, 1 s by default) is far above a healthy
Redis round trip. An acquire past it is given up on only if Redis answered nothing else either for
`alive_for` (the bound plus the keeper's tick: the keeper pings when nothing else did): a Redis that
answers other calls is alive, and the call is late because of a cold pool, a stall or this replica's
own busy event loop, so it waits on, up to LATE_LIMIT bounds in all. An acquire that fails on a broken
connection is sent once more within the bound; one that is only slow is never re-sent: it may have run,
and a second one would count the request twice. Given up on, the request is decided locally, but the
call is not cancelled: its late answer goes to the store to reconcile (`late`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn, TypeVar

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from proxy.admission.redis.degrade import Breaker
from proxy.policy.plan import StateRule
from proxy.tasks import spawn
from proxy.telemetry.metrics import Metrics

log = logging.getLogger("signalbox.limits")

FAILURES: tuple[type[BaseException], ...] = (RedisError, RedisClusterException, OSError, TimeoutError)
"""What a Redis call may fail with (TimeoutError: our own bound on the call)."""


T = TypeVar("T")

LATE_LIMIT = 20
"""A call waits at most this many bounds while Redis answers other calls; an acquire given up on may
still answer within as many more (then it is cancelled)."""
BLOCKED = 0.1
"""A bound that ran out this late (as a share of it): the event loop was blocked, answers may be unread."""


class Unavailable(Exception):
    """The Redis call failed (it may or may not have run): use the local limits."""


class Skipped(Unavailable):
    """Redis was not asked at all (the breaker is open)."""


class Health:
    __slots__ = (
        "breaker", "timeout", "where", "replicas", "metrics", "clock", "reason", "since", "late", "alive_for",
        "answered_at",
    )

    def __init__(
        self,
        rule: StateRule,
        where: str,
        metrics: Metrics | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.breaker = Breaker(rule.breaker_failures, rule.breaker_cooldown)
        self.timeout = rule.timeout
        self.where = where
        self.replicas = rule.expected_replicas
        self.metrics = metrics
        self.clock = clock
        self.reason: str | None = None
        self.since: float | None = None
        """Wall-clock time of the last change of state."""
        self.late: set[asyncio.Task[Any]] = set()
        """Calls past their bound whose answer may still come (cancelled by `cancel_late`)."""
        self.alive_for = self.timeout + keeper_tick(rule)
        self.answered_at = clock()
        """When Redis last answered any call of this replica."""
        if metrics is not None:
            metrics.limiter_degraded.set(0)

    @property
    def degraded(self) -> bool:
        return self.breaker.degraded

    def call(self, op: str, timeout: float | None = None) -> Call:
        """`async with health.call("acquire"):` around one logical Redis operation (one or more
        commands sent together). Raises `Skipped` or `Unavailable` instead of any Redis error."""
        return Call(self, op, self.timeout if timeout is None else timeout)

    async def run(self, op: str, send: Callable[[], Coroutine[Any, Any, T]], late: Callable[[T], None]) -> T:
        """One guarded call that must not run twice (an acquire): `send()` is re-sent once only after a
        connection error within the bound. Past the bound: `Unavailable`, and the call goes on (for at
        most LATE_LIMIT bounds) so that `late(answer)` can reconcile what it did."""
        breaker = self.breaker
        probe = breaker.state != "closed"
        if not breaker.allow(self.clock()):
            raise Skipped
        started = self.clock()
        end = started + self.timeout
        task = spawn(send(), name=f"limiter-store-{op}")
        resent = False
        try:
            while True:
                done, _ = await asyncio.wait((task,), timeout=max(0.0, end - self.clock()))
                if not done:
                    now = self.clock()
                    if self.waits_on(now, started, now - end):
                        end = now + self.timeout
                        continue
                    self._outlive(task, late)
                    self.failed(op, TimeoutError(f"Redis silent for {self.timeout * 1000:g} ms"))
                exc = task.exception()
                if exc is None:
                    self.succeeded()
                    return task.result()
                if not isinstance(exc, FAILURES):
                    raise exc  # a bug, not Redis: no fallback hides it
                if not resent and isinstance(exc, RedisConnectionError | ConnectionError) and self.clock() < end:
                    # Mostly a pooled connection Redis had closed: the command never ran. (If it did, the
                    # request counts twice: errs towards admitting less, never more.)
                    resent = True
                    task = spawn(send(), name=f"limiter-store-{op}")
                    continue
                self.failed(op, exc)
        except asyncio.CancelledError:
            if not task.done():
                task.cancel()
            if probe and breaker.state == "half_open":
                breaker.abandon()
            raise

    def _outlive(self, task: asyncio.Task[T], late: Callable[[T], None]) -> None:
        """Let a call past its bound finish (bounded), handing its answer to `late`."""
        stop = asyncio.get_running_loop().call_later(self.timeout * LATE_LIMIT, task.cancel)
        self.late.add(task)

        def landed(done: asyncio.Task[T]) -> None:
            stop.cancel()
            self.late.discard(done)
            if not done.cancelled() and done.exception() is None:
                self.answered_at = self.clock()
                late(done.result())

        task.add_done_callback(landed)

    def waits_on(self, now: float, started: float, late_by: float) -> bool:
        """Is a call past its bound only slow, not lost? Redis answered some call recently (within the
        bound plus the keeper's tick), or the bound ran out late because this replica's event loop was
        blocked (the answer may be there, unread); and the call is not older than LATE_LIMIT bounds."""
        if now - started >= self.timeout * LATE_LIMIT:
            return False
        return now - self.answered_at < self.alive_for or late_by > self.timeout * BLOCKED

    def cancel_late(self) -> None:
        for task in list(self.late):
            task.cancel()

    def succeeded(self) -> None:
        self.answered_at = self.clock()
        if self.breaker.success(self.answered_at):
            self.changed(False)

    def failed(self, op: str, exc: BaseException) -> NoReturn:
        """Count a failed call (metrics, breaker) and raise `Unavailable` from it."""
        if self.metrics is not None:
            self.metrics.redis_failed(op, kind_of(exc))
        log.debug("limiter store: %s failed: %s", op, describe(exc))
        if self.breaker.failure(self.clock()):
            self.changed(True, exc)
        raise Unavailable from exc

    def trip(self, exc: BaseException) -> None:
        """Redis is unreachable at start-up: degraded from the first request on."""
        self.breaker.trip(self.clock())
        self.changed(True, exc)

    def describe(self) -> dict[str, Any]:
        """For /readyz: shared or degraded, since when and why (never the URL's credentials)."""
        degraded = self.breaker.degraded
        return {
            "backend": "redis",
            "where": self.where,
            "shared": not degraded,
            "degraded": degraded,
            "since": self.since,
            "reason": self.reason if degraded else None,
        }

    def changed(self, degraded: bool, exc: BaseException | None = None) -> None:
        """Log once per change of state; the gauge and /readyz follow it."""
        self.since = time.time()
        if self.metrics is not None:
            self.metrics.limiter_degraded.set(1 if degraded else 0)
        if degraded:
            self.reason = describe(exc) if exc is not None else "unavailable"
            log.warning(
                "limiter store: Redis at %s unreachable (%s); applying local limits (each limit / %d "
                "replicas) until it answers again",
                self.where, self.reason, self.replicas,
            )
        else:
            log.info("limiter store: Redis at %s answers again; limits are shared again", self.where)


class Call:
    """One guarded Redis operation: the breaker's gate, a time bound (renewed while Redis answers other
    calls, as for `Health.run`), and the outcome reported back."""

    __slots__ = ("health", "op", "limit", "probe", "bound", "started", "timer")

    def __init__(self, health: Health, op: str, limit: float) -> None:
        self.health = health
        self.op = op
        self.limit = limit
        self.probe = False
        self.bound: asyncio.Timeout | None = None
        self.started = 0.0
        self.timer: asyncio.TimerHandle | None = None

    async def __aenter__(self) -> None:
        health = self.health
        breaker = health.breaker
        self.probe = breaker.state != "closed"
        self.started = health.clock()
        if not breaker.allow(self.started):
            raise Skipped
        self.bound = asyncio.timeout(None)  # expired by `_expire` (one timer per call, as before)
        await self.bound.__aenter__()
        self.timer = asyncio.get_running_loop().call_later(self.limit, self._expire)

    def _expire(self) -> None:
        assert self.bound is not None and self.timer is not None
        loop = asyncio.get_running_loop()
        if self.health.waits_on(self.health.clock(), self.started, loop.time() - self.timer.when()):
            self.timer = loop.call_later(self.limit, self._expire)
        else:
            self.bound.reschedule(loop.time())

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        assert self.bound is not None and self.timer is not None
        self.timer.cancel()
        try:
            await self.bound.__aexit__(kind, exc, tb)  # turns its own cancellation into TimeoutError
        except TimeoutError as timed_out:
            kind, exc = TimeoutError, timed_out
        health = self.health
        if kind is None:
            health.succeeded()
            return
        if isinstance(exc, FAILURES):
            health.failed(self.op, exc)
        if self.probe:  # cancelled (or a bug): neither outcome; let the next caller probe
            health.breaker.abandon()


def keeper_tick(rule: StateRule) -> float:
    """How often the store's keeper runs a round (renewing leases, probing or pinging Redis)."""
    return max(0.02, min(rule.lease_ttl / 3, rule.breaker_cooldown))


def kind_of(exc: BaseException) -> str:
    """A bounded label for the errors metric."""
    if isinstance(exc, TimeoutError | RedisTimeoutError):
        return "timeout"
    if isinstance(exc, RedisConnectionError | OSError):
        return "connection"
    if isinstance(exc, ResponseError):
        return "response"
    if isinstance(exc, RedisClusterException):
        return "cluster"
    return "other"


def describe(exc: BaseException) -> str:
    text = str(exc) or "no detail"
    return f"{type(exc).__name__}: {text[:200]}"
