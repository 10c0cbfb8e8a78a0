"""The Node SDKs against `make run`'s policies: the openai package's `client.responses` and the Vercel AI SDK's
default OpenAI model (the Responses API: a tool loop that ends, streamText, generateObject), through the
proxy to the built-in mock. The SDKs are pinned in tests/node/package-lock.json and installed the same way
the helm test installs helm: by a script, when missing."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
SDKS = REPO / ".tools" / "node-sdks"
DEFAULT_POLICY = (REPO / "policies" / "default.yaml").read_text()

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def node_sdks() -> Path:
    if shutil.which("node") is None:
        pytest.fail("node is needed (Debian's nodejs); the Node SDKs are half of the mock's clients")
    # Never skip: missing SDKs are installed as the script does it for a developer.
    subprocess.run(["bash", str(REPO / "scripts" / "install-node-sdks.sh")], check=True, timeout=280)
    script = SDKS / "sdks.mjs"
    shutil.copyfile(REPO / "tests" / "node" / "sdks.mjs", script)  # ESM resolves packages beside the script
    return script


async def test_node_sdks_through_the_proxy(node_sdks: Path, start_proxy: Callable[..., Awaitable[Any]]) -> None:
    proxy = await start_proxy(DEFAULT_POLICY)
    child = await asyncio.create_subprocess_exec(
        "node", str(node_sdks), proxy.v1, "sk-signalbox-dev",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(child.communicate(), timeout=120)
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    assert child.returncode == 0, stderr.decode()[-3000:]
    got = json.loads(stdout.decode().strip().splitlines()[-1])

    assert got["responses"]["status"] == "completed" and got["responses"]["text"].startswith("mock")
    assert got["responses"]["outputTokens"] > 0
    stream = got["responsesStream"]
    assert (stream["first"], stream["last"]) == ("response.created", "response.completed")
    assert stream["text"] == got["responses"]["text"] and stream["deltas"] > 1

    loop = got["toolLoop"]
    assert loop["calls"] == 1 and loop["steps"] == 2 and loop["finish"] == "stop"
    assert loop["text"].startswith("mock")
    assert got["streamText"]["text"].startswith("mock") and got["streamText"]["finish"] == "stop"

    made = got["generateObject"]
    assert made["valid"] is True and len(made["object"]["days"]) >= 2
    chat = [line for line in proxy.access_lines() if line.get("route") == "chat"]
    assert len(chat) == 6 and all(line["status"] == 200 for line in chat)
