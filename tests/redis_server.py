"""A real `redis-server` for the Redis limiter tests: started on a free loopback port with persistence
off, stopped by its PID, and restartable on the same port (the outage tests). `make test` installs
redis-server through scripts/install-redis.sh when it is missing."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

START_TIMEOUT = 10.0


# Cluster mode also listens on port + 10000 (the cluster bus) and refuses to start above 55535.
CLUSTER_BUS_OFFSET = 10000
HIGHEST_CLUSTER_PORT = 65535 - CLUSTER_BUS_OFFSET


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_cluster_port() -> int:
    """A free port whose cluster-bus port (port + 10000) is free too. The kernel's ephemeral range
    usually spans 32768-60999, so a random free port is above 55535 about a fifth of the time."""
    for _ in range(1000):
        port = free_port()
        if port <= HIGHEST_CLUSTER_PORT and _bindable(port + CLUSTER_BUS_OFFSET):
            return port
    for port in range(20000, HIGHEST_CLUSTER_PORT):  # an ephemeral range entirely above 55535
        if _bindable(port) and _bindable(port + CLUSTER_BUS_OFFSET):
            return port
    pytest.fail("no free loopback port pair for a cluster-mode redis-server")


class RedisServer:
    """One redis-server process; `url` stays the same across stop() and start()."""

    def __init__(self, directory: Path, *, cluster: bool = False) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed: run scripts/install-redis.sh (make test does)")
        self.binary = binary
        self.directory = directory
        self.cluster = cluster
        self.port = free_cluster_port() if cluster else free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        assert self.process is None, "already running"
        command = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(self.directory), "--daemonize", "no", "--loglevel", "warning",
        ]
        if self.cluster:
            command += ["--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{self.port}.conf"]
        log = (self.directory / f"redis-{self.port}.log").open("ab")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while self.command("PING") != "+PONG":
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"redis-server did not start on port {self.port}: {self._log_tail()}")
            time.sleep(0.02)
        if self.cluster:  # a one-node cluster owning every slot: scripts must keep to one slot
            assert self.command("CLUSTER ADDSLOTSRANGE 0 16383") == "+OK"
            while "cluster_state:ok" not in self.command("CLUSTER INFO", bulk=True):
                if time.monotonic() > deadline:
                    pytest.fail("the one-node cluster did not become ready")
                time.sleep(0.02)

    def _log_tail(self) -> str:
        log = self.directory / f"redis-{self.port}.log"
        lines = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
        return " | ".join(lines[-3:]) or "no output"

    def stop(self) -> None:
        """Terminate by PID and wait (kill after 5 s)."""
        process, self.process = self.process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)

    async def astop(self) -> None:
        await asyncio.to_thread(self.stop)

    async def astart(self) -> None:
        await asyncio.to_thread(self.start)

    def command(self, text: str, *, bulk: bool = False) -> str:
        """One inline command over a raw socket (no client library): the first reply line, or with
        `bulk` the whole bulk string."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as sock:
                sock.sendall(text.encode() + b"\r\n")
                data = b""
                while b"\r\n" not in data or (bulk and data.startswith(b"$") and not _complete(data)):
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    data += chunk
        except OSError:
            return ""
        if bulk and data.startswith(b"$"):
            return data.split(b"\r\n", 1)[1].decode()
        return data.split(b"\r\n", 1)[0].decode()


def _complete(data: bytes) -> bool:
    header, _, rest = data.partition(b"\r\n")
    return len(rest) >= int(header[1:]) + 2


@contextmanager
def running(directory: Path, *, cluster: bool = False) -> Iterator[RedisServer]:
    server = RedisServer(directory, cluster=cluster)
    server.start()
    try:
        yield server
    finally:
        server.stop()
