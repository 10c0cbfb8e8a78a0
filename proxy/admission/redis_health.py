"""The Redis limiter store's view of Redis: every call goes through `Health.call(op)`, which bounds it in
time, asks the circuit breaker first and tells it the outcome after, and reports each change of state
once (a log line, the `signalbox_limiter_degraded` gauge, the /readyz detail).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from proxy.admission.degrade import Breaker
from proxy.policy.plan import StateRule
from proxy.telemetry.metrics import Metrics

log = logging.getLogger("signalbox.limits")

FAILURES: tuple[type[BaseException], ...] = (RedisError, RedisClusterException, OSError, TimeoutError)
"""What a Redis call may fail with (TimeoutError: our own bound on the call)."""


class Unavailable(Exception):
    """The Redis call failed (it may or may not have run): use the local limits."""


class Skipped(Unavailable):
    """Redis was not asked at all (the breaker is open)."""


class Health:
    __slots__ = ("breaker", "timeout", "where", "replicas", "metrics", "clock", "reason", "since")

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
        if metrics is not None:
            metrics.limiter_degraded.set(0)

    @property
    def degraded(self) -> bool:
        return self.breaker.degraded

    def call(self, op: str, timeout: float | None = None) -> Call:
        """`async with health.call("acquire"):` around one logical Redis operation (one or more
        commands sent together). Raises `Skipped` or `Unavailable` instead of any Redis error."""
        return Call(self, op, self.timeout if timeout is None else timeout)

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
    """One guarded Redis operation: the breaker's gate, a time bound, and the outcome reported back."""

    __slots__ = ("health", "op", "limit", "probe", "bound")

    def __init__(self, health: Health, op: str, limit: float) -> None:
        self.health = health
        self.op = op
        self.limit = limit
        self.probe = False
        self.bound: asyncio.Timeout | None = None

    async def __aenter__(self) -> None:
        breaker = self.health.breaker
        self.probe = breaker.state != "closed"
        if not breaker.allow(self.health.clock()):
            raise Skipped
        self.bound = asyncio.timeout(self.limit)
        await self.bound.__aenter__()

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        assert self.bound is not None
        try:
            await self.bound.__aexit__(kind, exc, tb)  # turns its own cancellation into TimeoutError
        except TimeoutError as timed_out:
            kind, exc = TimeoutError, timed_out
        health = self.health
        breaker = health.breaker
        if kind is None:
            if breaker.success(health.clock()):
                health.changed(False)
            return
        if isinstance(exc, FAILURES):
            if health.metrics is not None:
                health.metrics.redis_failed(self.op, kind_of(exc))
            log.debug("limiter store: %s failed: %s", self.op, describe(exc))
            if breaker.failure(health.clock()):
                health.changed(True, exc)
            raise Unavailable from exc
        if self.probe:  # cancelled (or a bug): neither outcome; let the next caller probe
            breaker.abandon()


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
