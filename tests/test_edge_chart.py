"""The Helm chart passes the client timeouts to `signalbox serve`, and refuses values the proxy would."""

from __future__ import annotations

from pathlib import Path

from test_deploy_artifacts import arg, helm, pod_spec, proxy_container, template

__all__ = ["helm"]  # the fixture, shared with the deployment tests

FLAGS = ("--header-timeout", "--body-idle-timeout", "--body-timeout", "--keepalive-timeout")


def test_the_chart_passes_the_client_timeouts(helm: Path) -> None:
    container = proxy_container(pod_spec(template(helm)))
    assert [arg(container, f) for f in FLAGS] == ["10s", "30s", "120s", "75s"]
    docs = template(helm, "--set", "server.clientTimeouts.keepAliveSeconds=620")
    assert arg(proxy_container(pod_spec(docs)), "--keepalive-timeout") == "620s"


def test_the_chart_refuses_a_zero_timeout(helm: Path) -> None:
    proc = template(helm, "--set", "server.clientTimeouts.headerSeconds=0", check=False)
    assert proc.returncode != 0 and "headerSeconds" in proc.stderr, proc.stderr
