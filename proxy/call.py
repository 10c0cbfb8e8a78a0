"""The per-request context (`Call`): created by ingress, handed along the stages, read by telemetry.

Stages stamp timings with `call.mark(stage)` (loop clock, seconds since start) instead of logging
themselves, so metrics and the access log are fed from one place at the end.
"""

from __future__ import annotations

import os
import time
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from proxy.errors import Protocol, ProxyError
from proxy.policy.plan import DeploymentSpec, Plan, RouteRule, TenantRule
from proxy.providers.exchange import Exchange


@dataclass(slots=True)
class Attempt:
    upstream: str
    status: int
    duration: float
    error: str | None = None
    shared: bool = False
    """A merged embeddings call's attempt as another caller of the batch sees it: in that caller's access
    log, but counted once in the upstream metrics (by the batch's first caller)."""
    wait: tuple[float, str] | None = None
    """The wait planned before this attempt (seconds, and how it was chosen: exponential, fixed, reset or
    hint), for a retry of a deployment already tried; None: sent at once."""


class Hold(typing.Protocol):
    """What one upstream attempt holds in its upstream's limit (proxy/flow/upstream.py). Finished
    once: by dispatch for an attempt that failed, else once the response it produced is done with."""

    async def finish(self, status: int, usage: Mapping[str, Any] | None, *, sent: bool = True) -> None:
        """`status`: the attempt's answer (0: none came); `usage`: the response's, for a token limit;
        `sent`: False when the attempt never left the proxy (its request is given back too)."""
        ...


class WaitingRoom(typing.Protocol):
    """Told when a request starts and stops waiting: a queued stream's early 200 and heartbeats
    (proxy.streaming.queued.QueuedStream). The flow (queue, limits) and dispatch (an upstream's limit) know
    it only by this port, so neither imports the relay."""

    async def begin(self, status: Callable[[], str]) -> None: ...

    def end(self) -> None: ...


class Trace(typing.Protocol):
    """The request's spans while tracing is on (proxy/telemetry/spans.py). `call.trace` is None when it is
    off, so each stage's hook costs one `is not None` test."""

    def attempt(self, deployment: DeploymentSpec, url: str, headers: dict[str, str]) -> dict[str, str]:
        """An attempt is sent: its span starts; returns `headers` with its traceparent (a copy)."""
        ...

    def relaying(self, whole: bytes | None) -> None:
        """The answer goes to the client (`whole`: a non-streamed answer's body, read by dispatch)."""
        ...

    def event(self, name: str | None, data: bytes) -> None:
        """A stream event the relay parsed (its `event:` name and data), for the answer's model, usage and
        finish reasons."""
        ...

    def end(self, call: Call, cls: str | None) -> None:
        """The request is over (its outcome judged): every span ends. `cls`: its priority class."""
        ...


class Call:
    """One request's context. Not a dataclass: every field but the six given at arrival has an immutable
    class-level default, so a request pays only for what it sets (a 36-field dataclass `__init__` cost
    ~140 bytecodes per request; this one ~30)."""

    request_id: str
    plan: Plan
    method: str
    path: str
    protocol: Protocol
    started: float
    """time.perf_counter() at arrival; all marks are relative to it."""
    started_wall: float
    attempts: list[Attempt]
    marks: dict[str, float]
    tenant: TenantRule | None = None
    route: RouteRule | None = None
    raw_body: bytes = b""
    body: dict[str, Any] | None = None
    model: str = ""
    form_model: tuple[int, int] | None = None
    """A multipart upload: the byte span of its `model` field (a deployment's rewrite splices it)."""
    stream: bool = False
    upstream: str = ""
    status: int = 0
    error: str | None = None
    usage: dict[str, Any] | None = None
    events_relayed: int = 0
    bytes_out: int = 0
    client_gone: bool = False
    failure: ProxyError | None = None
    """The proxy-made error the client got (as a response or as a stream's last event), if any."""
    outcome: str = ""
    """Set once at the end (proxy/telemetry/outcome.py): ok, upstream_error, timeout, rejected, cancelled or
    proxy_error; `reason` says why for every outcome but ok."""
    reason: str | None = None
    exchange: Exchange | None = None
    """Pass-through or a protocol translation, chosen by dispatch from the front and the upstream."""
    token_estimate: int = 0
    """Tokens reserved at admission (prompt estimate + max output); settled from `usage`."""
    want_usage: bool = False
    """A token limit applies: relay records the response's `usage` on the call."""
    strip_usage: bool = False
    """The proxy asked the upstream for stream usage (include_usage); relay drops that chunk."""
    waiting: WaitingRoom | None = None
    """Set for a stream on a queue with `heartbeat_while_queued`: how any wait keeps the client informed."""
    prehold: tuple[str, Hold] | None = None
    """Upstream capacity the queue secured with everything else (limit key, hold): dispatch's first attempt
    to that upstream uses it instead of taking its own."""
    queue_wait: float = 0.0
    """Seconds spent waiting in a queue (x-signalbox-queue-wait-ms)."""
    cache: str | None = None
    """On a route with a cache: hit, miss or bypass (x-signalbox-cache; a hit counts as one request)."""
    trace: Trace | None = None
    """The request's spans, when tracing is on (None: off)."""
    trace_id: str | None = None
    """For the access log: the request span's trace id (tracing on), else a valid client traceparent's."""
    hold: Hold | None = None
    """The current attempt's place in its upstream's limit, until finished (admission's exit finishes
    the one the relayed response came from)."""

    def __init__(
        self, request_id: str, plan: Plan, method: str, path: str, protocol: Protocol, started: float
    ) -> None:
        self.request_id = request_id
        self.plan = plan
        self.method = method
        self.path = path
        self.protocol = protocol
        self.started = started
        self.started_wall = time.time()
        self.attempts = []
        self.marks = {}

    def derive(self, body: dict[str, Any]) -> Call:
        """A call of its own for `body` on this call's route and model (an embeddings batch merged or split):
        dispatch sends it like any other."""
        call = Call(os.urandom(12).hex(), self.plan, self.method, self.path, self.protocol, time.perf_counter())
        call.tenant, call.route, call.model = self.tenant, self.route, self.model
        call.raw_body, call.body = orjson.dumps(body), body
        return call

    def __repr__(self) -> str:
        return f"Call({self.request_id!r}, {self.method} {self.path}, status={self.status})"

    def mark(self, stage: str) -> None:
        self.marks[stage] = time.perf_counter() - self.started

    def elapsed(self) -> float:
        return time.perf_counter() - self.started
