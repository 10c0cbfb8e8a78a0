"""`${NAME}` in a policy reads the file `NAME_FILE` names when NAME itself is not set: how the Helm chart's
secretFiles (a Kubernetes Secret mounted as files) and Docker secrets reach the proxy without putting a
key in its environment."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

import aiohttp
import openai
import pytest
from conftest import EchoUpstream, Proxy
from kit import until
from test_ops_functional import Serve

from proxy.policy.load import PolicyError, load_policy

POLICY = """\
version: 1
identify: {mode: api_key}
tenants:
  app: {keys: ["${APP_KEY}"]}
upstreams:
  up: {provider: openai, base_url: "http://127.0.0.1:9/v1", api_key: "${UPSTREAM_KEY}"}
routes:
  - {name: default, upstream: up}
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def load(tmp_path: Path, environ: dict[str, str]) -> tuple[str, str]:
    folder = tmp_path / "policies"
    folder.mkdir(exist_ok=True)
    write(folder / "p.yaml", POLICY)
    policy = load_policy(folder, environ=environ).policy
    key = policy.upstreams["up"].api_key
    assert key is not None
    return key.get_secret_value(), policy.tenants["app"].keys[0].get_secret_value()


def test_a_variable_is_read_from_the_file_its_FILE_variable_names(tmp_path: Path) -> None:
    upstream = write(tmp_path / "upstream", "sk-from-file\n")  # as `echo` or kubectl wrote it
    app = write(tmp_path / "app", "app-key-no-newline")
    assert load(tmp_path, {"UPSTREAM_KEY_FILE": str(upstream), "APP_KEY_FILE": str(app)}) == (
        "sk-from-file", "app-key-no-newline"
    )
    # The variable itself wins when both are set; a rotated file is read at the next load.
    write(upstream, "sk-rotated\r\n")
    assert load(tmp_path, {"UPSTREAM_KEY_FILE": str(upstream), "APP_KEY": "app-env"}) == ("sk-rotated", "app-env")
    assert load(tmp_path, {"UPSTREAM_KEY": "sk-env", "UPSTREAM_KEY_FILE": str(upstream), "APP_KEY": "a"})[0] == (
        "sk-env"
    )


def test_an_unreadable_file_is_a_problem_at_its_place_without_its_content(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    binary = write(tmp_path / "bin", "")
    binary.write_bytes(b"\xff\xfe secret-bytes")
    with pytest.raises(PolicyError) as caught:
        load(tmp_path, {"UPSTREAM_KEY_FILE": str(missing), "APP_KEY_FILE": str(binary)})
    messages = sorted(f"{p.path}: {p.message}" for p in caught.value.problems)
    assert messages == [
        f"tenants.app.keys[0]: environment variable APP_KEY_FILE names {binary}, which cannot be read "
        "(not UTF-8 text)",
        f"upstreams.up.api_key: environment variable UPSTREAM_KEY_FILE names {missing}, which cannot be read "
        "(No such file or directory)",
    ]
    assert "secret-bytes" not in str(caught.value)


async def test_the_proxy_sends_upstream_the_key_from_the_file(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    echo: EchoUpstream,
    start_proxy: Callable[..., object],
    async_openai: Callable[..., openai.AsyncOpenAI],
) -> None:
    monkeypatch.delenv("TEST_UPSTREAM_KEY", raising=False)
    monkeypatch.setenv("TEST_UPSTREAM_KEY_FILE", str(write(tmp_path / "k", "sk-mounted-secret-41\n")))
    monkeypatch.setenv("TEST_APP_KEY_FILE", str(write(tmp_path / "a", "app-mounted-key-17\n")))
    assert "TEST_UPSTREAM_KEY" not in os.environ
    proxy = await start_proxy(  # type: ignore[operator]
        f"""
        version: 1
        identify: {{mode: api_key}}
        tenants:
          app: {{keys: ["${{TEST_APP_KEY}}"]}}
        upstreams:
          up: {{provider: openai, base_url: "{echo.url}/v1", api_key: "${{TEST_UPSTREAM_KEY}}"}}
        routes:
          - {{name: default, upstream: up}}
        """
    )
    assert isinstance(proxy, Proxy)
    client = async_openai(proxy, key="app-mounted-key-17")
    await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert echo.last.header("authorization") == "Bearer sk-mounted-secret-41"
    with pytest.raises(openai.AuthenticationError):
        await async_openai(proxy, key="sk-mounted-secret-41").chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}]
        )


async def test_a_rotated_key_file_is_applied_without_a_restart_or_a_policy_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kubernetes updates a mounted Secret in place; the policy files do not change. The watcher sees
    the new file content and reloads: the new key is served and the old one refused."""
    policies = tmp_path / "policies"
    policies.mkdir()
    write(policies / "p.yaml", ROTATING_POLICY)
    key_file = write(tmp_path / "app-key", "app-key-before-rotation\n")
    monkeypatch.setenv("ROTATING_APP_KEY_FILE", str(key_file))
    monkeypatch.delenv("ROTATING_APP_KEY", raising=False)
    proxy = Serve(policies, "--reload-interval", "0.1")
    try:
        await proxy.wait_ready()
        async with aiohttp.ClientSession() as session:

            async def chat(key: str) -> int:
                body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
                headers = {"Authorization": f"Bearer {key}"}
                async with session.post(proxy.url + "/v1/chat/completions", json=body, headers=headers) as resp:
                    await resp.read()
                    return resp.status

            assert await chat("app-key-before-rotation") == 200
            assert await chat("app-key-after-rotation") == 401
            replacement = write(tmp_path / "app-key.new", "app-key-after-rotation\n")
            replacement.replace(key_file)  # an atomic swap, as the kubelet does

            async def rotated() -> bool:
                return await chat("app-key-after-rotation") == 200

            assert await until(rotated, within=15)
            assert await chat("app-key-before-rotation") == 401
            status, policy = await proxy.admin(session, "GET", "/admin/policy")
            assert status == 200 and policy["version"] == 2 and policy["last_attempt"]["trigger"] == "watch"
            assert "app-key" not in str(policy)
            await asyncio.sleep(0.5)  # further polls see nothing new: no reload loop
            assert (await proxy.admin(session, "GET", "/admin/policy"))[1]["version"] == 2
    finally:
        proxy.stop()


ROTATING_POLICY = """\
version: 1
identify: {mode: api_key}
tenants:
  app: {keys: ["${ROTATING_APP_KEY}"]}
upstreams:
  mock: {provider: mock}
routes:
  - {name: default, upstream: mock}
"""
