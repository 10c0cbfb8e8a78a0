"""Malformed HTTP and paths the proxy does not serve, on raw sockets and through the SDKs: every answer is
JSON in the client's protocol (where the request got far enough to tell), quotes no header (the tenant
key rides in most of these requests), and the log has one INFO/DEBUG line per connection, no traceback,
no key. Ends with a bounded, seeded fuzz run."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable

import anthropic
import openai
import pytest
from conftest import UPSTREAM_KEY, EchoUpstream, Proxy
from edge_helpers import TENANT_KEY, Conversation, converse, policy, serve_admin

from proxy.runtime import ClientTimeouts, Settings

pytestmark = pytest.mark.timeout(60)

StartProxy = Callable[..., Awaitable[Proxy]]
QUICK = ClientTimeouts(header=0.3, body_idle=0.3, body=1.0, keepalive=0.3)
AUTH = f"Authorization: Bearer {TENANT_KEY}\r\n".encode()
CHAT = b'{"model": "gpt-x", "messages": [{"role": "user", "content": "hi"}]}'
ANTHROPIC_HEAD = (
    b"POST /v1/messages HTTP/1.1\r\nHost: proxy\r\nanthropic-version: 2023-06-01\r\n"
    b"content-type: application/json\r\n"
)
GET_MODELS = b"GET /v1/models HTTP/1.1\r\nHost: proxy\r\n"


def post(extra: bytes, body: bytes = CHAT, path: bytes = b"/v1/chat/completions") -> bytes:
    return b"POST " + path + b" HTTP/1.1\r\nHost: proxy\r\n" + extra + b"\r\n" + body


@pytest.fixture
async def proxy(start_proxy: StartProxy, echo: EchoUpstream) -> Proxy:
    return await start_proxy(policy(echo.url), settings=Settings(client_timeouts=QUICK))


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)
    return caplog


def port_of(proxy: Proxy) -> int:
    return int(proxy.url.rsplit(":", 1)[1])


def assert_clean_logs(logs: pytest.LogCaptureFixture, connections: int, *secrets: str) -> None:
    """No traceback, nothing at WARNING or above, no secret, and at most one edge line per connection."""
    for record in logs.records:
        assert record.exc_info is None and record.levelno < logging.WARNING, logs.text
    for secret in (TENANT_KEY, UPSTREAM_KEY, *secrets):
        assert secret not in logs.text
    assert "Traceback" not in logs.text
    edge_lines = [r for r in logs.records if r.name == "signalbox.edge"]
    assert len(edge_lines) <= connections, [r.getMessage() for r in edge_lines]


def assert_error(talk: Conversation, status: int, *, anthropic_shape: bool = False, code: str | None = None) -> None:
    assert talk.closed_by_server
    assert [a.status for a in talk.answers] == [status], talk.raw[:400]
    assert TENANT_KEY.encode() not in talk.raw and b"sk-alpha" not in talk.raw
    body = talk.answers[0].json()
    if anthropic_shape:
        assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
    else:
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
        assert code is None or body["error"]["code"] == code


MALFORMED = {
    "control byte in the Authorization header": (
        post(f"Authorization: Bearer {TENANT_KEY}\x01x\r\nContent-Length: {len(CHAT)}\r\n".encode()),
        400, "malformed_request",
    ),
    "NUL in a header name": (post(b"Au\x00th: x\r\n" + AUTH + b"Content-Length: 2\r\n", b"{}"), 400, None),
    "a space before a header's colon": (post(AUTH + b"Host : again\r\nContent-Length: 2\r\n", b"{}"), 400, None),
    "obsolete line folding": (GET_MODELS + b"Authorization: Bearer\r\n " + TENANT_KEY.encode() + b"\r\n\r\n", 400,
                              None),
    "no Host header": (b"GET /v1/models HTTP/1.1\r\n" + AUTH + b"\r\n", 400, None),
    "two Host headers": (b"GET /v1/models HTTP/1.1\r\nHost: a\r\nHost: b\r\n" + AUTH + b"\r\n", 400, None),
    "bad request line": (b"GET /v1 /models HTTP/1.1\r\nHost: proxy\r\n" + AUTH + b"\r\n", 400, None),
    "bad method": (b"G\x00T /v1/models HTTP/1.1\r\n" + AUTH + b"\r\n", 400, None),
    "TLS on the HTTP port": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(40)), 400, None),
    "HTTP/2 preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400, None),
    "header line over the limit": (post(b"X-Big: " + TENANT_KEY.encode() * 400 + b"\r\n" + AUTH), 431, None),
    "request line over the limit": (
        b"GET /v1/models?" + b"k" * 9000 + b" HTTP/1.1\r\nHost: proxy\r\n" + AUTH + b"\r\n", 431, None
    ),
    "too many headers": (GET_MODELS + AUTH + b"X-H: 1\r\n" * 200 + b"\r\n", 431, None),
    "negative Content-Length": (post(AUTH + b"Content-Length: -1\r\n"), 400, None),
    "Content-Length not a number": (post(AUTH + b"Content-Length: 1x\r\n"), 400, None),
    "two different Content-Lengths": (post(AUTH + b"Content-Length: 2\r\nContent-Length: 3\r\n", b"{}"), 400, None),
    "Content-Length with chunked": (
        post(AUTH + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n"), 400, None
    ),
    "bad chunk size": (post(AUTH + b"Transfer-Encoding: chunked\r\n", b"zz\r\n{}\r\n0\r\n\r\n"), 400, None),
    "body not gzip though it says so": (
        post(AUTH + b"Content-Encoding: gzip\r\nContent-Length: 5\r\n", b"abcde"), 400, "malformed_request"
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
async def test_malformed_http_gets_json_that_quotes_nothing(
    proxy: Proxy, logs: pytest.LogCaptureFixture, case: str
) -> None:
    raw, status, code = MALFORMED[case]
    talk = await converse(port_of(proxy), raw)
    assert_error(talk, status, code=code)
    reason = talk.answers[0].json()["error"]["code"]
    assert proxy.state.metrics.errors.get(reason) == 1  # counted with the proxy's other refusals
    assert_clean_logs(logs, 1)
    assert len([r for r in logs.records if r.name == "signalbox.edge"]) == 1  # logged, once


@pytest.mark.parametrize(
    ("header", "status"),
    [
        (b"Authorization: Bearer sk-\xf1" + TENANT_KEY.encode()[3:] + b"\r\n", 401),  # no key matches
        (AUTH + b"X-Request-Id: req-\xe9\r\n", 200),  # not echoed: the proxy makes its own id
    ],
    ids=["in the key", "in x-request-id"],
)
async def test_header_values_that_are_not_utf8_are_answered_in_json(
    proxy: Proxy, logs: pytest.LogCaptureFixture, header: bytes, status: int
) -> None:
    raw = post(header + f"Content-Length: {len(CHAT)}\r\nConnection: close\r\n".encode())
    talk = await converse(port_of(proxy), raw)
    assert [a.status for a in talk.answers] == [status]
    talk.answers[0].json()
    assert "\\x" not in talk.answers[0].headers["x-request-id"] and talk.answers[0].headers["x-request-id"].isalnum()
    assert_clean_logs(logs, 1)


async def test_a_tenant_header_that_is_not_utf8_is_refused_without_echo(
    start_proxy: StartProxy, echo: EchoUpstream, logs: pytest.LogCaptureFixture
) -> None:
    proxy = await start_proxy(policy(echo.url, identify={"mode": "header", "header": "x-tenant"}))
    raw = post(b"X-Tenant: n\xe9body-secret\r\nContent-Length: 2\r\nConnection: close\r\n", b"{}")
    talk = await converse(port_of(proxy), raw)
    assert [a.status for a in talk.answers] == [401]
    assert b"body-secret" not in talk.raw
    assert "x-tenant" in talk.answers[0].json()["error"]["message"]
    assert_clean_logs(logs, 1)


async def test_an_anthropic_client_gets_its_own_error_shape_for_a_bad_header(
    proxy: Proxy, logs: pytest.LogCaptureFixture
) -> None:
    raw = ANTHROPIC_HEAD + f"x-api-key: {TENANT_KEY}\x7f\r\nContent-Length: 2\r\n\r\n{{}}".encode()
    talk = await converse(port_of(proxy), raw)
    assert_error(talk, 400, anthropic_shape=True)
    assert talk.answers[0].json()["error"]["type"] == "invalid_request_error"
    assert_clean_logs(logs, 1)


async def test_bad_chunk_framing_after_the_head_gets_exactly_one_answer(
    proxy: Proxy, echo: EchoUpstream, logs: pytest.LogCaptureFixture
) -> None:
    """The head goes to the handler first, then the body turns out malformed: the handler's read fails
    and it answers 400; aiohttp does not queue a second answer behind it."""

    async def split(writer: asyncio.StreamWriter) -> None:
        writer.write(post(AUTH + b"Transfer-Encoding: chunked\r\n", b"5\r\n{\"mod\r\n"))
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.write(b"zz\r\n")
        await asyncio.Event().wait()

    talk = await converse(port_of(proxy), split)
    assert_error(talk, 400, code="malformed_request")
    assert echo.received == []
    assert_clean_logs(logs, 1)


async def test_pipelined_requests_are_answered_in_order_and_garbage_after_them_gets_its_400(proxy: Proxy) -> None:
    health = b"GET /healthz HTTP/1.1\r\nHost: proxy\r\n\r\n"
    body = f"Content-Length: {len(CHAT)}\r\n".encode()

    async def pipeline(writer: asyncio.StreamWriter) -> None:
        writer.write(health + post(AUTH + body) + health)  # one write: three requests
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.write(b"\x01\x02 nonsense\r\n\r\n")
        await asyncio.Event().wait()

    talk = await converse(port_of(proxy), pipeline)
    assert [a.status for a in talk.answers] == [200, 200, 200, 400]
    assert talk.answers[-1].json()["error"]["code"] == "malformed_request"
    assert talk.closed_by_server


async def test_an_unknown_expect_value_is_refused_without_echoing_it(
    proxy: Proxy, logs: pytest.LogCaptureFixture
) -> None:
    raw = post(AUTH + f"Expect: {TENANT_KEY}\r\nContent-Length: {len(CHAT)}\r\nConnection: close\r\n".encode())
    talk = await converse(port_of(proxy), raw)
    assert_error(talk, 417)
    assert_clean_logs(logs, 1)


@pytest.mark.parametrize(
    ("request_line", "status", "hint"),
    [
        (b"GET //v1/models", 404, "'//'"),
        (b"GET /admin/queues", 404, "admin port"),
        (b"POST /chat/completions", 404, "forget /v1"),
        (b"POST /healthz", 405, "GET"),
        (b"GET /", 404, "/v1/"),
    ],
)
async def test_paths_the_proxy_does_not_serve_get_json_with_a_hint(
    proxy: Proxy, logs: pytest.LogCaptureFixture, request_line: bytes, status: int, hint: str
) -> None:
    raw = request_line + b"?key=" + TENANT_KEY.encode() + b" HTTP/1.1\r\nHost: proxy\r\n" + AUTH
    raw += b"Connection: close\r\n\r\n"
    talk = await converse(port_of(proxy), raw)
    assert_error(talk, status)
    assert hint in talk.answers[0].json()["error"]["message"]
    assert_clean_logs(logs, 1)


async def test_an_openai_sdk_without_v1_in_its_base_url_is_told_so(proxy: Proxy) -> None:
    async with openai.AsyncOpenAI(base_url=proxy.url, api_key=TENANT_KEY, max_retries=0, timeout=10) as client:
        with pytest.raises(openai.NotFoundError) as failure:
            await client.chat.completions.create(model="gpt-x", messages=[{"role": "user", "content": "hi"}])
    error = failure.value.response.json()["error"]
    assert error["code"] == "not_found" and "forget /v1" in error["message"]


async def test_an_anthropic_sdk_with_a_prefixed_base_url_gets_an_anthropic_404(proxy: Proxy) -> None:
    async with anthropic.AsyncAnthropic(
        base_url=proxy.url + "/api", api_key=TENANT_KEY, max_retries=0, timeout=10
    ) as client:
        with pytest.raises(anthropic.NotFoundError) as failure:
            await client.messages.create(model="claude-x", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    body = failure.value.response.json()
    assert body["type"] == "error" and body["error"]["type"] == "not_found_error"
    assert "http://host:port for Anthropic" in body["error"]["message"]


async def test_the_admin_port_answers_bad_http_and_unknown_paths_in_json(
    proxy: Proxy, logs: pytest.LogCaptureFixture
) -> None:
    runner, port = await serve_admin(proxy.app, QUICK)
    token = "admin-token-SECRET-91f2"
    try:
        head = f"HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {token}"
        garbled = await converse(port, f"GET /admin/queues {head}\x01\r\n\r\n".encode())
        assert_error(garbled, 400)
        assert token.encode() not in garbled.raw
        unknown = await converse(port, f"GET /admin/nothing {head}\r\nConnection: close\r\n\r\n".encode())
        assert_error(unknown, 404)
        assert "/admin/queues" in unknown.answers[0].json()["error"]["message"]
    finally:
        await runner.cleanup()
    assert_clean_logs(logs, 2, token)


# --- fuzz ---------------------------------------------------------------------------------------------

TEMPLATES = [
    post(AUTH + b"Content-Type: application/json\r\n" + f"Content-Length: {len(CHAT)}\r\n".encode()),
    post(AUTH + b"Transfer-Encoding: chunked\r\n", b"%x\r\n%s\r\n0\r\n\r\n" % (len(CHAT), CHAT)),
    ANTHROPIC_HEAD + f"x-api-key: {TENANT_KEY}\r\nContent-Length: {len(CHAT)}\r\n\r\n".encode() + CHAT,
    GET_MODELS + AUTH + b"\r\n",
]
CASES = 240
AT_ONCE = 24


def mutate(data: bytes, rng: random.Random) -> bytes:
    """1-3 small edits: a random or control byte inserted or replacing one, a few bytes deleted, a CRLF
    inserted, a digit changed, or the tail cut. Edits are small, so key bytes never move into the path."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        at = rng.randrange(len(out) + 1)
        kind = rng.randrange(6)
        if kind == 0:
            out[at:at] = bytes([rng.choice([0, 1, 9, 10, 13, 27, 127, rng.randrange(256)])])
        elif kind == 1 and at < len(out):
            out[at] = rng.randrange(256)
        elif kind == 2:
            del out[at : at + rng.randint(1, 8)]
        elif kind == 3:
            out[at:at] = rng.choice([b"\r\n", b"\n", b"\r", b"\r\n\r\n", b": ", b" "])
        elif kind == 4:
            digits = [i for i, b in enumerate(out) if 48 <= b <= 57]
            if digits:
                out[rng.choice(digits)] = rng.randrange(48, 58)
        else:
            del out[at:]
    return bytes(out)


async def test_fuzzed_requests_get_json_answers_and_leave_no_traceback(
    proxy: Proxy, logs: pytest.LogCaptureFixture
) -> None:
    rng = random.Random(20261203)
    inputs = [mutate(rng.choice(TEMPLATES), rng) for _ in range(CASES)]
    port = port_of(proxy)
    talks: list[Conversation] = []
    for start in range(0, CASES, AT_ONCE):
        talks += await asyncio.gather(*(converse(port, raw) for raw in inputs[start : start + AT_ONCE]))
    statuses: dict[int, int] = {}
    for raw, talk in zip(inputs, talks, strict=True):
        assert talk.closed_by_server, raw
        assert TENANT_KEY.encode() not in talk.raw, raw
        for answer in talk.answers:
            answer.json()  # JSON, whatever the status
            statuses[answer.status] = statuses.get(answer.status, 0) + 1
    assert_clean_logs(logs, CASES)
    assert statuses.get(400, 0) > CASES // 10 and sum(statuses.values()) >= CASES // 2, statuses
