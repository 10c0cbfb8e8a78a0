"""`${NAME}` in a policy reads the file `NAME_FILE` names when NAME itself is not set: how the Helm chart's
secretFiles (a Kubernetes Secret mounted as files) and Docker secrets reach the proxy without putting a
key in its environment."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import openai
import pytest
from conftest import EchoUpstream, Proxy

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
