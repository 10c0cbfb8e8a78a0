"""Opening the limiter store's Redis client from a policy URL (standalone, Sentinel or Cluster).

redis-py's asyncio clients do the work (connection pooling, Sentinel discovery, Cluster slot routing);
this module only maps URL schemes onto them with the store's settings: no client-side retries (the
store decides what may be sent again) and a bounded pool. Connecting and waiting for a pooled
connection get the store's longest wait, LATE_LIMIT bounds: whether a call is slow or lost is decided
around it (`health.py`), and a cold pool on a busy replica connects slowly without Redis being down.

    redis://[user:pass@]host:6379/0   rediss://... (TLS)   unix:///run/redis.sock?db=0
    redis+sentinel://[user:pass@]host:26379[,host:port...]/<service>[/db]   (rediss+sentinel: TLS)
    redis+cluster://[user:pass@]host:6379[,host:port...]                   (rediss+cluster: TLS)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.retry import Retry

from proxy.admission.redis.health import LATE_LIMIT
from proxy.policy.plan import StateRule


@dataclass(frozen=True, slots=True)
class Target:
    """A parsed store URL; `where` is safe to log (no credentials)."""

    kind: str
    """standalone | sentinel | cluster"""
    tls: bool
    hosts: tuple[tuple[str, int], ...]
    username: str | None
    password: str | None
    service: str | None
    db: int
    where: str


def parse(url: str) -> Target:
    """Split a store URL into its parts (pure). Raises ValueError without echoing the URL."""
    scheme, _, rest = url.partition("://")
    scheme = scheme.lower()
    base, _, mode = scheme.partition("+")
    if base not in ("redis", "rediss", "unix") or mode not in ("", "sentinel", "cluster"):
        raise ValueError(f"unsupported Redis URL scheme {scheme}://")
    tls = base == "rediss"
    if base == "unix" or not mode:
        return _standalone(url, base, tls)
    credentials, _, location = rest.rpartition("@")
    username, password = _credentials(credentials)
    netloc, _, path = location.partition("/")
    default_port = 26379 if mode == "sentinel" else 6379
    hosts = tuple(_host_port(item, default_port) for item in netloc.split(",") if item)
    if not hosts:
        raise ValueError(f"{scheme}:// needs at least one host:port")
    service, db = _service_and_db(scheme, mode, [s for s in path.split("?")[0].split("/") if s])
    where = f"{scheme}://" + ",".join(f"{h}:{p}" for h, p in hosts) + (f"/{service}" if service else "")
    return Target(mode, tls, hosts, username, password, service, db, where)


def _standalone(url: str, base: str, tls: bool) -> Target:
    """redis://, rediss:// and unix:// (redis-py reads their credentials and db from the URL itself)."""
    parts = urlsplit(url)
    host = parts.path if base == "unix" else (parts.hostname or "localhost")
    where = f"{base}://{host}" + (f":{parts.port or 6379}" if base != "unix" else "")
    return Target("standalone", tls, ((host, parts.port or 6379),), None, None, None, 0, where)


def _credentials(credentials: str) -> tuple[str | None, str | None]:
    if not credentials:
        return None, None
    user, _, secret = credentials.partition(":")
    return (unquote(user) or None), (unquote(secret) or None)


def _service_and_db(scheme: str, mode: str, segments: list[str]) -> tuple[str | None, int]:
    """Sentinel: /<service>[/db]; Cluster: database 0 only."""
    if mode == "sentinel":
        if not segments:
            raise ValueError(f"{scheme}:// needs the service name: {scheme}://host:26379/<service>")
        return unquote(segments[0]), int(segments[1]) if len(segments) > 1 else 0
    if segments and segments[0] != "0":
        raise ValueError("a Redis Cluster has only database 0")
    return None, 0


def _host_port(item: str, default: int) -> tuple[str, int]:
    if item.startswith("["):  # [::1]:6379
        host, _, port = item[1:].partition("]")
        return host, int(port.lstrip(":") or default)
    host, _, port = item.rpartition(":") if ":" in item else (item, "", "")
    return host, int(port) if port else default


def connect(rule: StateRule) -> tuple[Any, Target]:
    """The client for `rule.url` (nothing connects until the first command)."""
    assert rule.url is not None
    target = parse(rule.url)
    common: dict[str, Any] = {
        # Reads carry no socket timeout of their own: the store bounds every call as a whole
        # (health.Call), and a second timer per read costs ~15 % of a call's CPU.
        "socket_timeout": None,
        "socket_connect_timeout": rule.timeout * LATE_LIMIT,
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 0,
    }
    if target.kind == "standalone":
        # A blocking pool waits (bounded) for a free connection instead of failing at once when all
        # `max_connections` are busy.
        pool = BlockingConnectionPool.from_url(
            rule.url, max_connections=rule.max_connections, timeout=rule.timeout * LATE_LIMIT, **common
        )
        return Redis.from_pool(pool), target  # the client owns the pool: aclose() closes both
    auth: dict[str, Any] = {"username": target.username, "password": target.password}
    if target.kind == "sentinel":
        tls: dict[str, Any] = {"ssl": True} if target.tls else {}
        # The URL's credentials are the master's; sentinels are asked without them.
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            list(target.hosts), sentinel_kwargs={**common, **tls}, **common
        )
        assert target.service is not None
        client = sentinel.master_for(
            target.service, db=target.db, max_connections=rule.max_connections, **auth, **tls
        )
        return client, target
    nodes = [ClusterNode(host, port) for host, port in target.hosts]
    cluster = RedisCluster(
        startup_nodes=nodes, max_connections=rule.max_connections, ssl=target.tls, **auth, **common
    )
    return cluster, target
