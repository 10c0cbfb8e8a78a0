"""The running proxy's state, hung off the aiohttp app under one typed key (no module globals), and the
process settings it runs with (`Settings`, `ClientTimeouts`): the command line's, not hot-reloadable."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

from proxy.batching.batcher import Batcher
from proxy.cache.serve import ResponseCache
from proxy.errors import ProxyError
from proxy.flow.admit import Admission
from proxy.flow.scheduler import PRIORITY_HEADER, Scheduler
from proxy.flow.upstream import UpstreamQuota
from proxy.policy.plan import Plan
from proxy.policy.redact import SecretsRef, redact_logs
from proxy.policy.reload import Reloader
from proxy.streaming.relay import StreamSettings
from proxy.streaming.resume.hub import Hub
from proxy.tasks import Deadlines
from proxy.telemetry.logging import AccessLog
from proxy.telemetry.metrics import Metrics
from proxy.telemetry.tracing import OFF, Tracer
from proxy.upstream.client import UpstreamClients
from proxy.upstream.registry import Registry


@dataclass(frozen=True, slots=True)
class ClientTimeouts:
    """How long a client may take to send its request or keep a connection idle: process settings
    (`serve --header-timeout ...`), seconds. Defaults, for a proxy whose clients are SDKs that write a
    whole request at once:

    - header 10 s: an SDK sends its head (< 2 KiB) in one write; 10 s covers a few TCP retransmissions.
      Counted from the accept for a new connection, from the first byte of the next request on a kept-alive one.
    - body idle 30 s: no body byte for this long ends the request with a 408. A gap in a live upload is a
      network stall, and TCP's retransmission backoff (1+2+4+8 s) stays well under it.
    - body 120 s: the whole body, however it trickles. A 25 MiB upload (the largest the OpenAI API takes)
      needs 1.7 Mbit/s to make it.
    - keep-alive 75 s: an idle connection between requests. Longer than the 60 s idle timeout of the usual
      balancers and ingress controllers in front of a proxy (which must close first, or a request they send
      on a connection we are closing fails), and than every SDK's pool expiry (5 s for the Python and Node
      SDKs). nginx uses the same default.
    """

    header: float = 10.0
    body_idle: float = 30.0
    body: float = 120.0
    keepalive: float = 75.0


class PlanRef:
    """One reference to the active plan; a reload swaps it, calls keep the plan they started with."""

    __slots__ = ("current", "loaded_at")

    def __init__(self, plan: Plan) -> None:
        self.current = plan
        self.loaded_at = time.time()

    def swap(self, plan: Plan) -> None:
        self.current = plan
        self.loaded_at = time.time()


@dataclass(slots=True)
class Settings:
    """Process settings from the command line (not hot-reloadable)."""

    host: str = "127.0.0.1"
    port: int = 8080
    admin_host: str = "127.0.0.1"
    admin_port: int = 9090
    shutdown_grace: float = 5.0
    drain_timeout: float = 60.0
    access_log: bool = True
    reload_interval: float = 2.0
    """How often the policy directory's digest is polled for changes."""
    admin_auth_disabled: bool = False
    """Serve the admin API without a token (the CLI allows it only on a loopback admin host)."""
    demo: bool = False
    """Serve the frontend helper's demo page on the public port (`serve --demo`; for development)."""
    stream: StreamSettings = field(default_factory=StreamSettings)
    client_timeouts: ClientTimeouts = field(default_factory=ClientTimeouts)
    """How long a client may take over a request's head and body, and stay idle between requests."""


@dataclass(slots=True)
class Runtime:
    plans: PlanRef
    settings: Settings
    clients: UpstreamClients = field(default_factory=UpstreamClients)
    metrics: Metrics = field(default_factory=Metrics)
    access_log: AccessLog = field(default_factory=AccessLog)
    in_flight: int = 0
    ready: bool = False
    draining: bool = False
    started_wall: float = field(default_factory=time.time)
    reloader: Reloader | None = None
    open_streams: set[Callable[[ProxyError], None]] = field(default_factory=set)
    """One `end(error)` per stream being relayed, so a drain can end them cleanly."""
    """Set when the policy came from files (the CLI); tests may build apps from a plan alone."""
    deadlines: Deadlines = field(default_factory=Deadlines)
    """Requests' total-time guards, sharing timers (see proxy.tasks.Deadlines)."""
    tracer: Tracer = OFF
    """Spans and trace propagation: `OFF` unless the OTEL_* variables turn tracing on (build_app)."""

    admission: Admission = field(init=False)
    """Limits: the limiter store (counters survive reloads) and its metrics."""
    scheduler: Scheduler = field(init=False)
    """Queues by name (slots, waiters, pause state survive reloads): the flow every call enters."""
    batcher: Batcher = field(init=False)
    """Open embedding batches by key, and their flushes (each takes one scheduler slot)."""
    upstreams: Registry = field(init=False)
    """Per-deployment circuit breakers, pacing holds and load (the same object as `clients.registry`)."""
    cache: ResponseCache = field(init=False)
    """The response cache of routes with `cache:` (proxy/cache/); its store is Redis's once the app opened it."""
    secrets: SecretsRef = field(init=False)
    """What every output is redacted with (responses, logs, metrics, the admin API); see proxy/policy/redact.py."""
    streams: Hub = field(init=False)
    """Resumable streams: their buffers, detached generations and process limits (proxy/streaming/resume/)."""

    def __post_init__(self) -> None:
        self.admission = Admission(metrics=self.metrics)
        self.scheduler = Scheduler(self.metrics, admission=self.admission)
        # A batch waits for its one slot with its first caller's priority.
        self.batcher = Batcher(
            self.metrics, self.clients, lambda call, hdrs: self.scheduler.slot(call, hdrs.get(PRIORITY_HEADER))
        )
        self.metrics.before_scrape += [self.admission.refresh_metrics, self.scheduler.refresh_metrics]
        self.metrics.in_flight.set_function(lambda: self.in_flight)  # read at scrape, not two locks per request
        self.cache = ResponseCache(self.metrics.cache, self.plans.current.cache_memory)
        self.upstreams = self.clients.registry
        self.upstreams.metrics = self.metrics
        # Upstream limits, per attempt, in admission's store; a finished attempt tells the queues.
        self.upstreams.quota = UpstreamQuota(self.admission, self.scheduler.kick)
        self.metrics.before_scrape.append(self.upstreams.refresh_metrics)
        self.streams = Hub(self.metrics, max_bytes=self.settings.stream.resume_max_bytes,
                           max_detached=self.settings.stream.resume_max_detached)
        self.secrets = SecretsRef()
        self.secrets.load(self.plans.current.secrets)
        redact_logs(self.secrets)

    @property
    def stream_settings(self) -> StreamSettings:
        return self.settings.stream


STATE: web.AppKey[Runtime] = web.AppKey("signalbox_state", Runtime)
