"""`signalbox explain` and `GET /admin/explain`: a table of (tenant, model, path) cases, each checked for
the route that matched (and why the earlier ones did not), and for every limit, queue, timeout and
stream setting that applies with the layer it came from. Also: the CLI and the admin API give the same
answer, keys and header values are never printed, and route capabilities added later (retry, breaker,
fallbacks, deployments, batch) are shown when the compiled route carries them."""

from __future__ import annotations

import json
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from test_ops_functional import PYTHON, ROOT

from proxy import lifecycle
from proxy.admin import build_admin_app
from proxy.app import build_app
from proxy.policy.compile import compile_plan
from proxy.policy.explain import Context, ExplainError, compiled_section, explain
from proxy.policy.explain_text import format_text
from proxy.policy.load import LoadedPolicy, load_policy
from proxy.policy.reload import Reloader
from proxy.runtime import STATE, Settings

pytestmark = pytest.mark.timeout(30)

HEADER_SECRET = "hdr-secret-value-123"
URL_PASSWORD = "url-PASSWORD-S3CRET-42"
POLICY = f"""
identify: {{mode: api_key}}
priorities: [high, standard, low]
queues:
  shared: {{concurrency: 4, max_wait: 10s}}
timeouts: {{connect: 3s}}
upstreams:
  mock: {{provider: mock, limits: {{requests_per_minute: 1000}}}}
  big:
    provider: openai
    base_url: "http://127.0.0.1:9/v1"
    timeouts: {{first_token: 90s}}
    headers: {{x-custom-auth: {HEADER_SECRET}}}
    hide_response_headers: [OpenAI-Organization, "x-ratelimit-*"]
  claude: {{provider: anthropic, base_url: "http://svc:{URL_PASSWORD}@127.0.0.1:9/v1/"}}
tenants:
  alpha: {{keys: [ka-secret-key], priority: high, limits: {{requests_per_minute: 60, concurrent: 5}}}}
  beta: {{keys: [kb-secret-key], models: ["small-*", "claude-*"], weight: 2}}
routes:
  - name: embed
    match: {{path: /v1/embeddings, model: "emb-*"}}
    upstream: mock
  - name: vip
    match: {{model: "big-*", tenants: [alpha]}}
    upstream: big
    model: big-model-v2
    timeouts: {{idle: 20s}}
    limits: {{tokens_per_minute: 100000, per_tenant: {{requests_per_minute: 30}}}}
    on_limit: queue
    queue: shared
    tokens: {{default_max_tokens: 256}}
    stream: {{heartbeat: 5s}}
  - name: claude
    match: {{model: "claude-*"}}
    upstream: claude
  - name: small
    match: {{model: "small-*"}}
    upstream: mock
"""
STREAM_DEFAULTS = {"heartbeat": 15.0, "slow_client": 60.0}


@dataclass(frozen=True)
class Case:
    tenant: str
    model: str
    path: str
    route: str | None
    skipped: tuple[str, ...] = ()
    limits: tuple[tuple[str, str], ...] = ()
    """(key, from) of every limit check, in the order admission applies them."""
    queue: str | None = None
    priority: tuple[str, str] = ("standard", "default (middle class)")
    protocol: str = "pass"


CASES = [
    Case("alpha", "emb-1", "/v1/embeddings", "embed",
         limits=(("tenant:alpha", "tenant"), ("upstream:mock", "upstream")), priority=("high", "tenant")),
    Case("alpha", "big-1", "/v1/chat/completions", "vip", skipped=("embed",),
         limits=(("tenant:alpha", "tenant"), ("route:vip", "route"),
                 ("route:vip/tenant:alpha", "route per tenant")),
         queue="shared", priority=("high", "tenant")),
    Case("beta", "big-1", "/v1/chat/completions", None),  # outside beta's model allow-list
    Case("alpha", "small-1", "/v1/chat/completions", "small", skipped=("embed", "vip", "claude"),
         limits=(("tenant:alpha", "tenant"), ("upstream:mock", "upstream")), priority=("high", "tenant")),
    Case("beta", "small-9", "/v1/completions", "small", skipped=("embed", "vip", "claude"),
         limits=(("upstream:mock", "upstream"),)),
    Case("beta", "claude-3", "/v1/chat/completions", "claude", skipped=("embed", "vip"),
         protocol="openai_to_anthropic"),
    Case("beta", "claude-3", "/v1/embeddings", "claude", skipped=("embed", "vip"),
         protocol="refused: /v1/embeddings cannot be served by an anthropic upstream"),
    Case("alpha", "other", "/v1/chat/completions", None, skipped=("embed", "vip", "claude", "small")),
]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> LoadedPolicy:
    folder = tmp_path_factory.mktemp("explain")
    (folder / "policy.yaml").write_text(POLICY)
    return load_policy(folder)


def answer_for(loaded: LoadedPolicy, case: Case) -> dict[str, Any]:
    return explain(
        loaded, compile_plan(loaded), model=case.model, path=case.path, tenant=case.tenant,
        stream_defaults=STREAM_DEFAULTS,
    )


@pytest.mark.parametrize("case", CASES, ids=[f"{c.tenant}-{c.model}-{c.path}" for c in CASES])
def test_explain_table(loaded: LoadedPolicy, case: Case) -> None:
    answer = answer_for(loaded, case)
    assert (answer["route"] or {}).get("name") == case.route
    if case.route is None:
        assert answer["why"]
        if case.skipped:
            assert [s["route"] for s in answer["skipped"]] == list(case.skipped)
            assert answer["models_available"] == []  # every route here matches by glob
        return
    assert [s["route"] for s in answer["skipped"]] == list(case.skipped)
    assert all(s["reason"] for s in answer["skipped"])
    assert [(c["key"], c["from"]) for c in answer["limits"]["checks"]] == list(case.limits)
    assert ("queue" in answer) == (case.queue is not None)
    priority = answer["priority"]["class"]
    assert (priority["value"], priority["from"]) == case.priority
    assert answer["protocol"].startswith(case.protocol)
    # Every setting says where it came from.
    for section in ("timeouts", "stream"):
        assert all(v["from"] for v in answer[section].values())
    assert set(answer["timeouts"]) == {"connect", "first_token", "idle", "total"}


def test_explain_reports_each_value_with_its_layer(loaded: LoadedPolicy) -> None:
    answer = answer_for(loaded, CASES[1])  # alpha -> vip
    assert answer["model_sent_upstream"] == "big-model-v2"
    assert answer["timeouts"] == {
        "connect": {"value": "3s", "from": "policy"},
        "first_token": {"value": "90s", "from": "upstream"},
        "idle": {"value": "20s", "from": "route"},
        "total": {"value": "30m", "from": "default"},
    }
    checks = {c["key"]: c for c in answer["limits"]["checks"]}
    assert checks["tenant:alpha"]["requests_per_minute"] == 60 and checks["tenant:alpha"]["concurrent"] == 5
    assert checks["route:vip"]["tokens_per_minute"] == 100000
    assert checks["route:vip/tenant:alpha"]["requests_per_minute"] == 30
    assert answer["limits"]["on_limit"] == {"value": "queue", "from": "route"}
    assert answer["limits"]["default_max_tokens"] == {"value": 256, "from": "route"}
    queue = answer["queue"]
    assert queue["name"] == {"value": "shared", "from": "route"}
    assert queue["concurrency"] == {"value": 4, "from": "queues.shared"}
    assert queue["max_wait"] == {"value": "10s", "from": "queues.shared"}
    assert queue["max_waiting"] == {"value": 1000, "from": "default"}
    assert answer["stream"] == {
        "heartbeat": {"value": "5s", "from": "route"},
        "slow_client": {"value": "1m", "from": "process setting"},
    }
    small = answer_for(loaded, CASES[4])  # beta -> small: defaults everywhere
    assert small["limits"]["on_limit"] == {"value": "reject", "from": "default"}
    assert small["priority"]["weight"] == {"value": 2.0, "from": "tenant"}


def test_text_output_lists_every_setting_with_its_source(loaded: LoadedPolicy) -> None:
    text = format_text(answer_for(loaded, CASES[1]))
    for fragment in (
        "route:    vip (#1)",
        "skipped route embed: match.path",
        "idle=20s (from route)",
        "connect=3s (from policy)",
        "route 'vip' for tenant 'alpha' [route:vip/tenant:alpha] (from route per tenant): "
        "requests_per_minute=30",
        "queue:    shared: concurrency=4 (from queues.shared)",
        "class=high (from tenant)",
        "heartbeat=5s (from route)",
        "response headers not relayed: openai-organization, x-ratelimit-*",
    ):
        assert fragment in text, text
    assert HEADER_SECRET not in text and HEADER_SECRET not in json.dumps(answer_for(loaded, CASES[1]))


def test_cli_by_key_prints_json_without_the_key_or_header_values(loaded: LoadedPolicy) -> None:
    folder = Path(loaded.files[0]).parent
    cli = [PYTHON, "-m", "proxy", "explain", "--policies", str(folder)]
    result = subprocess.run(
        [*cli, "--model", "big-x", "--key", "ka-secret-key", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["route"]["name"] == "vip" and answer["tenant"] == {"name": "alpha", "identified_by": "key"}
    assert answer["upstream"]["extra_headers"] == ["x-custom-auth"]
    assert answer["upstream"]["hide_response_headers"] == ["openai-organization", "x-ratelimit-*"]
    assert "ka-secret-key" not in result.stdout and HEADER_SECRET not in result.stdout
    text = subprocess.run(
        [*cli, "--model", "small-1", "--tenant", "beta"],
        cwd=ROOT, capture_output=True, text=True, timeout=30, check=True,
    ).stdout
    assert "route:    small (#3)" in text and "(from default)" in text


def test_base_url_credentials_are_masked_in_every_rendering(loaded: LoadedPolicy) -> None:
    claude = next(c for c in CASES if c.route == "claude")
    answer = answer_for(loaded, claude)
    assert answer["upstream"]["base_url"] == "http://svc:***@127.0.0.1:9/v1"
    assert "upstream: claude (anthropic, http://svc:***@127.0.0.1:9/v1)" in format_text(answer)
    result = subprocess.run(
        [PYTHON, "-m", "proxy", "explain", "--policies", str(Path(loaded.files[0]).parent), "--model", "claude-3",
         "--tenant", "beta"],
        cwd=ROOT, capture_output=True, text=True, timeout=30, check=True,
    )
    assert "http://svc:***@127.0.0.1:9/v1" in result.stdout
    assert URL_PASSWORD not in json.dumps(answer) + result.stdout + result.stderr


def test_cli_explain_errors_exit_2(loaded: LoadedPolicy) -> None:
    folder = Path(loaded.files[0]).parent
    result = subprocess.run(
        [PYTHON, "-m", "proxy", "explain", "--policies", str(folder), "--model", "m", "--tenant", "nobody"],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2 and "unknown tenant 'nobody'" in result.stderr


def test_capabilities_on_the_compiled_route_are_shown_defensively(loaded: LoadedPolicy) -> None:
    @dataclass(frozen=True)
    class RetrySpec:
        attempts: int
        on: tuple[int, ...]

    plan = compile_plan(loaded)
    route = SimpleNamespace(index=0, retry=RetrySpec(3, (429, 503)), batch=None)
    ctx = Context(plan, loaded.policy, route, plan.tenants["alpha"], "m", "/v1/x", {})  # type: ignore[arg-type]
    assert compiled_section("retry")(ctx) == {"value": {"attempts": 3, "on": [429, 503]}, "from": "default"}
    assert compiled_section("batch")(ctx) is None  # not set on this route
    assert compiled_section("breaker")(ctx) is None  # not an attribute of this (older) route at all


# --- GET /admin/explain -----------------------------------------------------------------------------


@pytest.fixture
async def admin_url(loaded: LoadedPolicy) -> AsyncIterator[str]:
    app = build_app(compile_plan(loaded), Settings())
    runtime = app[STATE]
    runtime.reloader = Reloader(Path(loaded.files[0]).parent, loaded, runtime.plans.swap)
    lifecycle.attach(runtime)
    admin = build_admin_app(app, environ={"SIGNALBOX_ADMIN_TOKEN": "t0ken"})
    runner = web.AppRunner(admin, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


async def test_admin_explain_matches_the_cli(admin_url: str, loaded: LoadedPolicy) -> None:
    headers = {"Authorization": "Bearer t0ken"}
    async with aiohttp.ClientSession(headers=headers) as session:
        query = {"model": "big-1", "tenant": "alpha"}
        async with session.get(admin_url + "/admin/explain", params=query) as resp:
            assert resp.status == 200
            assert await resp.json() == answer_for(loaded, CASES[1])
        async with session.get(admin_url + "/admin/explain", params={"model": "emb-1", "key": "ka-secret-key",
                                                                     "path": "/v1/embeddings"}) as resp:
            body = await resp.json()
            assert body["route"]["name"] == "embed" and "ka-secret-key" not in json.dumps(body)
        async with session.get(admin_url + "/admin/explain", params={"model": "claude-3", "tenant": "beta"}) as resp:
            text = await resp.text()
            assert "http://svc:***@127.0.0.1:9/v1" in text and URL_PASSWORD not in text
        for params, status, message in (
            ({"tenant": "alpha"}, 400, "model"),
            ({"model": "m", "tenant": "nobody"}, 400, "unknown tenant"),
            ({"model": "m", "tenant": "alpha", "key": "x"}, 400, "not both"),
            ({"model": "m", "key": "no-such-key"}, 400, "no tenant owns this key"),
        ):
            async with session.get(admin_url + "/admin/explain", params=params) as resp:
                assert resp.status == status and message in (await resp.json())["error"]["message"]
    async with aiohttp.ClientSession() as anonymous:
        async with anonymous.get(admin_url + "/admin/explain", params={"model": "m"}) as resp:
            assert resp.status == 401


ONE_TENANT = """
upstreams:
  main: {provider: mock, breaker: {consecutive_failures: 3}}
tenants:
  only: {keys: [k-only]}
routes:
  - name: models
    match: {path: /v1/models}
    upstream: main
  - name: chat
    match: {model: "m-*"}
    upstream: main
    retry: {attempts: 3}
"""


@pytest.fixture
def one_tenant(tmp_path: Path) -> Path:
    (tmp_path / "policy.yaml").write_text(ONE_TENANT)
    return tmp_path


def test_cli_defaults_to_the_only_tenant_and_takes_a_request_without_a_model(one_tenant: Path) -> None:
    result = subprocess.run(
        [PYTHON, "-m", "proxy", "explain", "--policies", str(one_tenant), "--path", "/v1/models"],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert "tenant:   only (identified by the only tenant)" in result.stdout
    assert "request:  /v1/models (no model)" in result.stdout
    assert "route:    models (#0)" in result.stdout and "model sent upstream: (none" in result.stdout


def test_a_model_route_does_not_match_a_request_without_a_model(one_tenant: Path) -> None:
    loaded = load_policy(one_tenant)
    answer = explain(loaded, compile_plan(loaded), path="/v1/chat/completions")
    assert answer["route"] is None
    assert answer["skipped"][1]["reason"] == "match.model ['m-*'] does not match a request without a model"


def test_several_tenants_still_need_a_name(loaded: LoadedPolicy) -> None:
    with pytest.raises(ExplainError, match="tenants: alpha, beta"):
        explain(loaded, compile_plan(loaded), model="small-1")


def test_text_names_the_upstream_shorthand_and_prints_values_as_yaml(one_tenant: Path) -> None:
    loaded = load_policy(one_tenant)
    text = format_text(explain(loaded, compile_plan(loaded), model="m-1"))
    lines = text.splitlines()
    assert "deployments (from route (upstream: main, a pool of one deployment)):" in lines
    start = lines.index("retry (from route):")
    retry = yaml.safe_load("\n".join(line[2:] for line in lines[start + 1:] if line.startswith("  ")))
    assert retry["attempts"] == 3 and retry["statuses"] == [429, 500, 502, 503, 504, 529]
    assert "{'" not in text  # no Python reprs
    upstream_breaker = lines.index("breaker (from upstream):")
    assert lines[upstream_breaker + 1] == "  consecutive_failures: 3"
