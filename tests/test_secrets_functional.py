"""No configured secret leaves the proxy, in any form it was sent, by any way out.

The secrets: an OpenAI-style key, an Azure key (32 hex digits, no `sk-`), Basic credentials from a base_url
(the password percent-encoded in the URL), an upstream header value, a tenant key, the admin token and the
Redis password. Each is echoed by a loopback upstream in every form the proxy could have sent it (as is,
`Bearer x`, the Basic base64, percent-encoded, JSON-escaped, OpenAI's masked `sk-proj-****abcd`), in error
bodies of every status, whole and inside a stream, translated or not, and in response headers; the proxy's
own errors (connect error, timeout, a refused reload) are provoked too. Then every response, the access
log, the python logs, /metrics, the admin API and `signalbox explain` are searched: 0 occurrences."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from urllib.parse import quote

import aiohttp
import orjson
import pytest
from conftest import EchoUpstream, Proxy, Reply, closed_port
from test_admin_functional import Admin, attach_reloader, serve_admin

from proxy.cli import main as cli_main

pytestmark = pytest.mark.timeout(60)
__all__ = ["serve_admin"]  # the fixture

OPENAI_KEY = "sk-proj-Q7vR2xK9mT4wZ8pL3nB6yH1cD5fJ0sA"
AZURE_KEY = "9f86d081884c7d659a2feaa0c55ad015"
BASIC_USER = "svc-user"
BASIC_PASSWORD = "p@ss/W0rd-7e1c"  # needs percent-encoding in a URL: p%40ss%2FW0rd-7e1c
GATEWAY_VALUE = "gw-7c0ffee-5eed-header-value"
TENANT_KEY = "tk-tenant-9b2d4e6f8a1c3e5"
ADMIN_TOKEN = "adm-5f3e2d1c0b9a8877-token"
REDIS_PASSWORD = "rds-pw-4a5b6c7d8e9f"
SECRETS = (OPENAI_KEY, AZURE_KEY, BASIC_PASSWORD, GATEWAY_VALUE, TENANT_KEY, ADMIN_TOKEN, REDIS_PASSWORD)
BASIC_TOKEN = base64.b64encode(f"{BASIC_USER}:{BASIC_PASSWORD}".encode()).decode()


def forms_of(secret: str) -> list[str]:
    return [
        secret,
        quote(secret, safe=""),
        json.dumps(secret)[1:-1].replace("/", "\\/"),
        secret[:8] + "*" * 24 + secret[-4:],  # OpenAI's "Incorrect API key provided: sk-proj-****abcd"
    ]


FORMS = sorted(
    {f for s in SECRETS for f in forms_of(s)} | {BASIC_TOKEN, f"{BASIC_USER}:{BASIC_PASSWORD}"}, key=len
)
ECHO = " | ".join([*FORMS, f"Bearer {OPENAI_KEY}", f"Basic {BASIC_TOKEN}", f"api-key: {AZURE_KEY}"])
"""What the upstreams quote back: every form of every secret."""
HEADER_ECHO = " ".join(f for f in FORMS if "*" not in f)  # header values: printable ASCII
SENT = {
    "oai": (OPENAI_KEY, GATEWAY_VALUE), "azure": (AZURE_KEY,), "claude": (AZURE_KEY,), "basic": (BASIC_PASSWORD,)
}
"""What each upstream is sent (so what it can quote back in a success's headers: tenant keys, the admin
token and the Redis password never travel upstream; error answers are searched for every secret)."""


def sent_echo(upstream: str) -> str:
    echoed = " ".join(f for secret in SENT[upstream] for f in forms_of(secret) if "*" not in f)
    return echoed + (f" Basic {BASIC_TOKEN} {BASIC_USER}:{BASIC_PASSWORD}" if upstream == "basic" else "")


def policy(echo: str, silent: str) -> str:
    closed = closed_port()
    userinfo = f"{BASIC_USER}:${{T_BASIC_URL}}@"
    host = echo.removeprefix("http://")
    return f"""
version: 1
identify: {{mode: api_key}}
state: {{backend: redis, url: "redis://:${{T_REDIS}}@127.0.0.1:{closed_port()}/0"}}
upstreams:
  oai: {{provider: openai, base_url: "{echo}/v1", api_key: "${{T_OPENAI}}", headers: {{x-gateway: "${{T_GATEWAY}}"}}}}
  azure: {{provider: openai, base_url: "{echo}/v1", api_key: "${{T_AZURE}}", auth_header: api-key}}
  basic: {{provider: openai, base_url: "http://{userinfo}{host}/v1"}}
  claude: {{provider: anthropic, base_url: "{echo}/v1", api_key: "${{T_AZURE}}"}}
  dead: {{provider: openai, base_url: "http://{userinfo}127.0.0.1:{closed}/v1", api_key: "${{T_OPENAI}}",
          auth_header: x-api-key}}
  silent: {{provider: openai, base_url: "http://{userinfo}{silent.removeprefix('http://')}/v1",
            timeouts: {{first_token: 300ms}}}}
tenants:
  team: {{keys: ["${{T_TENANT}}"]}}
routes:
  - {{name: oai, match: {{model: oai}}, upstream: oai}}
  - {{name: azure, match: {{model: azure}}, upstream: azure}}
  - {{name: basic, match: {{model: basic}}, upstream: basic}}
  - {{name: claude, match: {{model: claude}}, upstream: claude}}
  - {{name: dead, match: {{model: dead}}, upstream: dead}}
  - {{name: silent, match: {{model: silent}}, upstream: silent}}
"""


@pytest.fixture(autouse=True)
def _secrets_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in (
        ("T_OPENAI", OPENAI_KEY), ("T_AZURE", AZURE_KEY), ("T_BASIC_URL", quote(BASIC_PASSWORD, safe="")),
        ("T_GATEWAY", GATEWAY_VALUE), ("T_TENANT", TENANT_KEY), ("T_REDIS", REDIS_PASSWORD),
    ):
        monkeypatch.setenv(name, value)


@pytest.fixture
async def silent() -> AsyncIterator[str]:
    """A server that accepts and never answers (the proxy's first_token timeout fires)."""

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(65536):  # until the proxy gives up and closes
            pass
        writer.close()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    server.close()


class Seen:
    """Every byte that left the proxy, by where it was seen."""

    def __init__(self) -> None:
        self.outputs: list[tuple[str, str]] = []

    def add(self, where: str, text: str) -> None:
        self.outputs.append((where, text))

    def leaks(self) -> list[tuple[str, str]]:
        return [(where, form) for where, text in self.outputs for form in FORMS if form in text]


async def call(
    session: aiohttp.ClientSession, seen: Seen, url: str, body: dict[str, object], where: str,
    anthropic: bool = False,
) -> tuple[int, str]:
    headers = {"x-api-key": TENANT_KEY, "anthropic-version": "2023-06-01"} if anthropic else {
        "Authorization": f"Bearer {TENANT_KEY}"
    }
    async with session.post(url, json=body, headers=headers) as response:
        text = await response.text()
        seen.add(where, text)
        seen.add(where + " headers", "\n".join(f"{k}: {v}" for k, v in response.headers.items()))
        return response.status, text


def error_reply(status: int, kind: str = "openai") -> Reply:
    if kind == "anthropic":
        body = orjson.dumps({"type": "error", "error": {"type": "invalid_request_error", "message": ECHO}})
    elif kind == "text":
        body = ECHO.encode()
    else:
        body = orjson.dumps({"error": {"message": ECHO, "type": "invalid_request_error", "code": "x"}})
    content_type = "text/plain" if kind == "text" else "application/json"
    return Reply(status=status, headers=[("Content-Type", content_type), ("x-debug-echo", HEADER_ECHO)], body=body)


def stream_reply(kind: str, upstream: str) -> Reply:
    headers = [("Content-Type", "text/event-stream"), ("x-debug-echo", sent_echo(upstream))]
    if kind == "anthropic":
        start = {"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant",
                                                      "model": "m", "content": [], "usage": {"input_tokens": 1}}}
        error = {"type": "error", "error": {"type": "overloaded_error", "message": ECHO}}
        chunks = [b"event: message_start\ndata: " + orjson.dumps(start) + b"\n\n",
                  b"event: error\ndata: " + orjson.dumps(error) + b"\n\n"]
    else:
        first = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                 "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]}
        chunks = [b"data: " + orjson.dumps(first) + b"\n\n",
                  b"data: " + orjson.dumps({"error": {"message": ECHO, "type": "server_error"}}) + b"\n\n"]
    return Reply(status=200, headers=headers, chunks=chunks, gap=0.01)


CHAT: dict[str, object] = {"messages": [{"role": "user", "content": "hi"}]}
MESSAGES: dict[str, object] = {"max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}


async def test_no_secret_in_any_form_leaves_by_any_way(
    start_proxy: Callable[..., Awaitable[Proxy]], echo: EchoUpstream, silent: str,
    serve_admin: Callable[..., Awaitable[Admin]], write_policy: Callable[..., Path], caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    text = policy(echo.url, silent)
    source = write_policy(text, name="serving/proxy-policy.yaml")
    proxy = await start_proxy(text)
    attach_reloader(proxy, source.parent)
    admin = await serve_admin(proxy, environ={"SIGNALBOX_ADMIN_TOKEN": ADMIN_TOKEN})
    seen = Seen()
    chat_url, messages_url = proxy.v1 + "/chat/completions", proxy.v1 + "/messages"
    async with aiohttp.ClientSession() as session:
        # Whole error bodies of every status, relayed as they came (pass-through) from every upstream kind.
        for model in ("oai", "azure", "basic"):
            for status in (400, 401, 403, 429, 500, 502):
                echo.reply(error_reply(status))
                got, body = await call(session, seen, chat_url, {"model": model, **CHAT}, f"{model} {status}")
                assert got == status and "[redacted]" in body, (model, status, body)
        echo.reply(error_reply(500, "text"))  # a plain-text error page becomes an OpenAI error
        got, body = await call(session, seen, chat_url, {"model": "oai", **CHAT}, "text 500")
        assert got == 500 and "[redacted]" in orjson.loads(body)["error"]["message"]
        # Translated both ways: Anthropic's error to an OpenAI client, OpenAI's to an Anthropic client.
        echo.reply(error_reply(401, "anthropic"))
        got, body = await call(session, seen, chat_url, {"model": "claude", **CHAT}, "claude 401")
        assert got == 401 and "[redacted]" in body
        echo.reply(error_reply(403))
        got, body = await call(session, seen, messages_url, {"model": "oai", **MESSAGES}, "front 403", anthropic=True)
        assert got == 403 and orjson.loads(body)["type"] == "error" and "[redacted]" in body
        # A success's headers quoting what went upstream.
        echo.reply(Reply(headers=[("Content-Type", "application/json"), ("x-debug-echo", sent_echo("basic"))]))
        assert (await call(session, seen, chat_url, {"model": "basic", **CHAT}, "basic 200"))[0] == 200
        # Mid-stream error events: pass-through, and translated both ways.
        for model, kind, url, anthropic in (
            ("oai", "openai", chat_url, False),
            ("claude", "anthropic", chat_url, False),
            ("azure", "openai", messages_url, True),
        ):
            echo.reply(stream_reply(kind, model))
            body_in = {"model": model, "stream": True, **(MESSAGES if anthropic else CHAT)}
            got, body = await call(session, seen, url, body_in, f"stream {model}", anthropic)
            assert got == 200 and "[redacted]" in body, (model, body)
        # The proxy's own errors: a connect error, a timeout (both to base_urls carrying credentials).
        got, body = await call(session, seen, chat_url, {"model": "dead", **CHAT}, "dead")
        assert got == 502
        got, body = await call(session, seen, chat_url, {"model": "silent", **CHAT}, "silent")
        assert got == 504
        # A reload refused: the new files quote the secrets as literals next to a base_url that cannot parse.
        broken = text.replace(f'"{echo.url}/v1", api_key: "${{T_AZURE}}"', f'"{echo.url}:x/v1", api_key: "{AZURE_KEY}"')
        broken = broken.replace("${T_BASIC_URL}", quote(BASIC_PASSWORD, safe="")).replace("${T_TENANT}", TENANT_KEY)
        source.write_text(broken + "bogus: 1\n")
        status, reloaded = await admin.call("POST", "/admin/reload", token=ADMIN_TOKEN)
        assert status == 422
        seen.add("admin reload", json.dumps(reloaded))
        # Python logs from anywhere in the process.
        logging.getLogger("signalbox.test").warning("an upstream said: %s", ECHO)
        logging.getLogger("aiohttp.test").error("failed", exc_info=ValueError(ECHO))
        # What operators read.
        async with session.get(proxy.url + "/metrics") as response:
            seen.add("/metrics", await response.text())
        for path in (
            "/admin/policy", "/admin/queues", "/admin/upstreams", "/admin/explain?model=basic&tenant=team",
            f"/admin/explain?model=oai&key={TENANT_KEY}",
        ):
            status, answer = await admin.call("GET", path, token=ADMIN_TOKEN)
            assert status == 200, (path, answer)
            seen.add(path, json.dumps(answer))
        status, answer = await admin.call("GET", "/admin/queues", token="wrong-" + ADMIN_TOKEN)
        seen.add("admin 401", json.dumps(answer))
    source.write_text(text)
    capsys.readouterr()
    for model in ("basic", "oai", "dead"):
        for extra in ([], ["--json"]):
            assert cli_main(["explain", "--policies", str(source), "--model", model, "--key", TENANT_KEY, *extra]) == 0
    out = capsys.readouterr()
    seen.add("signalbox explain", out.out + out.err)
    proxy.state.access_log.flush()
    seen.add("access log", proxy.log.getvalue().decode())
    seen.add("python logs", caplog.text)
    seen.add("python log records", "\n".join(r.getMessage() for r in caplog.records))
    assert "[redacted]" in caplog.text  # the logs above were written, without their secrets
    assert len(proxy.access_lines()) == 27
    assert seen.leaks() == []
