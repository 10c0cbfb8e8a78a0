"""The chart deploys as documented: a user's policy files replace the example, the demo values start,
Kubernetes 1.28 works without native sidecars, the admin API needs a token by default, sidecar mode
gets a PodMonitor, secrets can be files, and a changed secret rolls the pods (a policy edit does not)."""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
from test_deploy_artifacts import CHART, REPO, Doc, arg, ci, helm, one, pod_spec, proxy_container, template

__all__ = ["helm"]  # the fixture, shared with the deployment tests

SIGNALBOX = Path(sys.executable).parent / "signalbox"
AGENTS = """\
version: 1
identify: {mode: api_key}
tenants:
  agents: {keys: ["${AGENTS_APP_KEY}"]}
upstreams:
  anthropic: {provider: anthropic, base_url: "https://api.anthropic.com", api_key: "${ANTHROPIC_API_KEY}"}
routes:
  - {name: agents, upstream: anthropic}
"""


@pytest.fixture
def agents_file(tmp_path: Path) -> Path:
    path = tmp_path / "agents.yaml"
    path.write_text(AGENTS)
    return path


def user_policy(agents_file: Path) -> list[str]:
    """The documented way: --set-file, the dot in the file name escaped."""
    return ["--set-file", f"policies.agents\\.yaml={agents_file}"]


def validate_all(docs: list[Doc], kube_version: str) -> None:
    for doc in docs:
        if not doc["apiVersion"].startswith("monitoring.coreos.com/"):
            kubernetes_validate.validate(doc, kube_version, strict=True)


def provided_env(container: Doc, secrets_dir: Path) -> dict[str, str]:
    """The environment the rendered container would get, with stand-in secret values: secretKeyRef
    values become dummies, and files the chart mounts (<NAME>_FILE) are written under secrets_dir."""
    env: dict[str, str] = {"PATH": os.environ["PATH"]}
    assert "envFrom" not in container, "keys behind envFrom are unknown here: use secretEnv or secretFiles"
    for item in container.get("env", []):
        name = item["name"]
        if "valueFrom" in item:
            env[name] = f"stand-in-{name.lower()}"
        elif item["value"].startswith("/etc/signalbox/secrets/"):
            secrets_dir.mkdir(exist_ok=True)
            file = secrets_dir / item["value"].rsplit("/", 1)[1]
            file.write_text(f"stand-in-from-file-{file.name.lower()}\n")
            env[name] = str(file)
        else:
            env[name] = item["value"]
    return env


def signalbox_validate(docs: list[Doc], container: Doc, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """`signalbox validate` on the rendered policy ConfigMap, with only what the container is given."""
    folder = tmp_path / "policies"
    folder.mkdir()
    for name, text in one(docs, "ConfigMap")["data"].items():
        (folder / name).write_text(text)
    return subprocess.run([str(SIGNALBOX), "validate", str(folder)], capture_output=True, text=True, timeout=60,
                          env=provided_env(container, tmp_path / "secrets"))


# --- Policies: the user's files replace the example --------------------------------------------------


@pytest.mark.parametrize("mode", ["deployment", "sidecar"])
def test_a_user_policy_replaces_the_example_in_both_modes(
    helm: Path, agents_file: Path, tmp_path: Path, mode: str
) -> None:
    extra = ["--set", "mode=sidecar", "--set", "sidecar.demo.enabled=true"] if mode == "sidecar" else []
    docs = template(helm, *extra, *user_policy(agents_file), "--set-json",
                    'secretEnv=[{"name":"ANTHROPIC_API_KEY","secretName":"llm","key":"anthropic"},'
                    '{"name":"AGENTS_APP_KEY","secretName":"llm","key":"agents"}]')
    validate_all(docs, "1.33.0")
    assert one(docs, "ConfigMap")["data"] == {"agents.yaml": AGENTS}, "the example must not be merged in"
    proc = signalbox_validate(docs, proxy_container(pod_spec(docs)), tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith("ok: 1 file(s), 1 upstream(s)"), proc.stdout + proc.stderr


def test_the_example_policy_is_served_only_without_user_files(helm: Path) -> None:
    example = (CHART / "files" / "openai.yaml").read_text()
    assert one(template(helm), "ConfigMap")["data"] == {"openai.yaml": example}
    assert not [d for d in template(helm, "--set", "existingConfigMap=mine") if d["kind"] == "ConfigMap"]


@pytest.mark.parametrize("values", ["sidecar-native", "sidecar-plain"])
def test_the_demo_values_give_the_proxy_every_variable_its_policy_needs(
    helm: Path, tmp_path: Path, values: str
) -> None:
    # The proxy exits 1 at start when a ${VARIABLE} of its policy is unset: validate says the same.
    kube = "1.33.0" if values == "sidecar-native" else "1.28.0"
    docs = template(helm, *ci(values), "--kube-version", kube)
    validate_all(docs, kube)
    spec = pod_spec(docs)
    proc = signalbox_validate(docs, proxy_container(spec), tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The demo app authenticates to the proxy with the tenant key, not the upstream key.
    app = next(c for c in spec["containers"] if c["name"] == "app")
    app_key = next(e for e in app["env"] if e["name"] == "OPENAI_API_KEY")
    assert app_key["valueFrom"]["secretKeyRef"] == {"name": "llm-api-keys", "key": "app"}


# --- Kubernetes 1.28: plain sidecar container -------------------------------------------------------


def test_kubernetes_1_28_renders_without_native_sidecars(helm: Path) -> None:
    for args in ([], ci("sidecar-plain")):
        docs = template(helm, *args, "--kube-version", "1.28.0")
        validate_all(docs, "1.28.0")
        spec = pod_spec(docs)
        assert "initContainers" not in spec
        assert proxy_container(spec)["lifecycle"]["preStop"] == {"exec": {"command": ["sleep", "2"]}}
    lint = subprocess.run([str(helm), "lint", "--strict", str(CHART), "--kube-version", "1.28.0", *ci("sidecar-plain")],
                          capture_output=True, text=True, timeout=60)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_native_sidecars_on_1_28_fail_with_the_way_out(helm: Path) -> None:
    proc = template(helm, *ci("sidecar-native"), "--kube-version", "1.28.0", check=False)
    assert proc.returncode != 0
    assert "sidecar.native: true needs Kubernetes >= 1.29" in proc.stderr and "set sidecar.native: false" in proc.stderr
    assert template(helm, *ci("sidecar-native"), "--kube-version", "1.29.0")  # and 1.29 is fine
    old = template(helm, "--kube-version", "1.27.0", check=False)
    assert old.returncode != 0 and "kubeVersion" in old.stderr + old.stdout


# --- Admin API: token by default --------------------------------------------------------------------


def secrets_of(docs: list[Doc]) -> dict[str, Doc]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}


@pytest.mark.parametrize("values", [None, "sidecar-native"])
def test_admin_api_needs_a_generated_token_by_default(helm: Path, values: str | None) -> None:
    docs = template(helm, *(ci(values) if values else []))
    c = proxy_container(pod_spec(docs))
    assert "--admin-no-auth" not in c["args"]
    ref = next(e for e in c["env"] if e["name"] == "SIGNALBOX_ADMIN_TOKEN")["valueFrom"]["secretKeyRef"]
    secret = secrets_of(docs)[ref["name"]]
    kubernetes_validate.validate(secret, "1.33.0", strict=True)
    token = base64.b64decode(secret["data"][ref["key"]]).decode()
    assert re.fullmatch(r"[A-Za-z0-9]{40}", token)
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_admin_token_from_an_existing_secret_and_no_auth_only_when_asked(helm: Path) -> None:
    docs = template(helm, "--set", "admin.existingSecret=ops-admin", "--set", "admin.secretKey=t")
    c = proxy_container(pod_spec(docs))
    assert not secrets_of(docs) and "--admin-no-auth" not in c["args"]
    token = {"name": "SIGNALBOX_ADMIN_TOKEN", "valueFrom": {"secretKeyRef": {"name": "ops-admin", "key": "t"}}}
    assert token in c["env"]
    docs = template(helm, "--set", "admin.auth=false")
    c = proxy_container(pod_spec(docs))
    assert "--admin-no-auth" in c["args"] and not secrets_of(docs)
    assert all(e["name"] != "SIGNALBOX_ADMIN_TOKEN" for e in c.get("env", []))


def test_an_exposed_admin_api_uses_the_generated_token(helm: Path) -> None:
    docs = template(helm, "--set", "admin.host=0.0.0.0")
    c = proxy_container(pod_spec(docs))
    assert arg(c, "--admin-host") == "0.0.0.0" and "--admin-no-auth" not in c["args"]
    assert [p["name"] for p in one(docs, "Service")["spec"]["ports"]] == ["http", "admin"]
    assert "rel-signalbox-admin" in secrets_of(docs)


# --- PodMonitor in sidecar mode ---------------------------------------------------------------------


def test_sidecar_mode_renders_a_pod_monitor_for_the_sidecar_port(helm: Path) -> None:
    docs = template(helm, *ci("sidecar-native"))
    monitor = one(docs, "PodMonitor")
    pod = one(docs, "Deployment")["spec"]["template"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    endpoint = monitor["spec"]["podMetricsEndpoints"][0]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in [p["name"] for p in proxy_container(pod["spec"])["ports"]]
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["ns"]}
    # The app pods of another chart: their labels, given.
    docs = template(helm, "--set", "mode=sidecar", "--set", "podMonitor.enabled=true",
                    "--set", "podMonitor.podSelector.app=myapp")
    assert one(docs, "PodMonitor")["spec"]["selector"]["matchLabels"] == {"app": "myapp"}
    proc = template(helm, "--set", "mode=sidecar", "--set", "podMonitor.enabled=true", check=False)
    assert proc.returncode != 0 and "podMonitor.podSelector is required" in proc.stderr
    # Deployment mode keeps its ServiceMonitor and renders no PodMonitor.
    docs = template(helm, "--set", "podMonitor.enabled=true")
    assert not [d for d in docs if d["kind"] == "PodMonitor"]


# --- Secrets as files, and the checksum that rolls the pods ----------------------------------------


def test_secret_files_are_mounted_and_named_by_FILE_variables(helm: Path) -> None:
    docs = template(helm, *ci("sidecar-plain"))
    spec = pod_spec(docs)
    c = proxy_container(spec)
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["OPENAI_API_KEY_FILE"] == "/etc/signalbox/secrets/OPENAI_API_KEY"
    assert env["SIGNALBOX_APP_KEY_FILE"] == "/etc/signalbox/secrets/SIGNALBOX_APP_KEY"
    assert "OPENAI_API_KEY" not in env, "a file-mounted key is never in the environment too"
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/etc/signalbox/secrets")
    assert mount["readOnly"] is True and "subPath" not in mount
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    sources = [s["secret"] for s in volume["projected"]["sources"]]
    assert sources == [
        {"name": "llm-api-keys", "items": [{"key": "openai", "path": "OPENAI_API_KEY"}]},
        {"name": "llm-api-keys", "items": [{"key": "app", "path": "SIGNALBOX_APP_KEY"}]},
    ]


def checksum(helm: Path, *args: str) -> str:
    docs = template(helm, "--set", "admin.existingSecret=adm", *args)
    value: str = one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/secrets"]
    return value


def test_a_changed_secret_value_rolls_the_pods_and_a_policy_edit_does_not(helm: Path, agents_file: Path) -> None:
    first = checksum(helm, "--set", "secretValues.OPENAI_API_KEY=sk-one")
    assert first == checksum(helm, "--set", "secretValues.OPENAI_API_KEY=sk-one")
    assert first != checksum(helm, "--set", "secretValues.OPENAI_API_KEY=sk-two")
    assert first == checksum(helm, "--set", "secretValues.OPENAI_API_KEY=sk-one", *user_policy(agents_file))
    docs = template(helm, "--set", "secretValues.OPENAI_API_KEY=sk-one")
    env_secret = secrets_of(docs)["rel-signalbox-env"]
    kubernetes_validate.validate(env_secret, "1.33.0", strict=True)
    assert {"secretRef": {"name": "rel-signalbox-env"}} in proxy_container(pod_spec(docs))["envFrom"]
    # The sidecar's annotations helper carries it too, for the app pods of another chart.
    sidecar = template(helm, *ci("sidecar-native"), "--set-string", "secretValues.X=1")
    sidecar2 = template(helm, *ci("sidecar-native"), "--set-string", "secretValues.X=2")
    annotations: list[Any] = [
        one(d, "Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/secrets"]
        for d in (sidecar, sidecar2)
    ]
    assert annotations[0] != annotations[1]
    off = template(helm, "--set", "rollOnSecretChange=false")
    assert "checksum/secrets" not in one(off, "Deployment")["spec"]["template"]["metadata"]["annotations"]


def test_the_operator_page_documents_the_new_values() -> None:
    page = (REPO / "docs" / "operators" / "helm.md").read_text()
    for key in ("kubeVersion", "sidecar.native", "policies", "admin.auth", "admin.existingSecret", "secretFiles",
                "secretValues", "rollOnSecretChange", "podMonitor", "grafanaDashboard", "extraRules", "groupBy",
                "queueWait", "cancellations", "_FILE", "install-prometheus.sh"):
        assert key in page, key
    # Only relative links (the site is built from the repository alone).
    assert not re.search(r"\]\((https?:)?//", page)
