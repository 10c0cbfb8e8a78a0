"""Wire-level edges found by an audit of the data path, each against the real proxy on loopback:
dot segments in paths, resends that could bill twice, a stream request answered with a stalled whole
body, repeated request headers, multipart uploads, Anthropic-shaped errors and models, key fragments
quoted by an upstream's 401.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Awaitable, Callable

import aiohttp
import anthropic
import openai
import pytest
from aiohttp import web
from conftest import EchoUpstream, Proxy, Reply
from kit import Loopback

from proxy.providers import multipart

pytestmark = pytest.mark.timeout(20)

StartProxy = Callable[..., Awaitable[Proxy]]
ALPHA = {"Authorization": "Bearer sk-alpha", "Content-Type": "application/json"}
ANTHROPIC = {"x-api-key": "sk-alpha", "anthropic-version": "2023-06-01", "content-type": "application/json"}
HTML_502 = b"<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1><hr>nginx</body></html>"


def policy(base_url: str, *, provider: str = "openai", route: str = "", upstream_extra: str = "") -> str:
    return f"""
    identify: {{mode: api_key}}
    upstreams:
      up: {{provider: {provider}, base_url: "{base_url}", api_key: "${{TEST_UPSTREAM_KEY}}" {upstream_extra}}}
    tenants:
      alpha: {{keys: [sk-alpha]}}
    routes:
      - {{name: all, upstream: up {route}}}
    """


class RawUpstream:
    """A TCP server that reads each request (head and Content-Length body) and lets `act` answer it."""

    def __init__(self, act: Callable[[asyncio.StreamWriter], Awaitable[None]]) -> None:
        self.act = act
        self.requests = 0
        self.server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/v1"

    async def __aenter__(self) -> RawUpstream:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while not writer.is_closing():
                head = await reader.readuntil(b"\r\n\r\n")
                self.requests += 1
                length = next(
                    (int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                     if line.lower().startswith(b"content-length:")),
                    0,
                )
                await reader.readexactly(length)
                await self.act(writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def serve(servers: Loopback, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> str:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    return await servers.serve(app, shutdown_timeout=0.2) + "/v1"


# --- paths ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/chat/../files", "/v1/chat/%2e%2e/files", "/v1/chat/%2E./files", "/v1/./files"])
async def test_a_dot_segment_cannot_step_out_of_a_route_limited_by_path(
    start_proxy: StartProxy, echo: EchoUpstream, path: str
) -> None:
    # The upstream (or the CDN before it) resolves dot segments: /v1/chat/../files is /v1/files there.
    proxy = await start_proxy(policy(echo.url + "/v1", route=', match: {path: "/v1/chat/*"}'))
    host, port = proxy.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    head = f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-alpha\r\nConnection: close\r\n\r\n"
    writer.write(head.encode())
    answer = await reader.read()
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400")
    assert json.loads(body)["error"]["param"] == "path"
    assert echo.received == []


async def test_dots_inside_a_segment_are_an_ordinary_path(start_proxy: StartProxy, echo: EchoUpstream) -> None:
    proxy = await start_proxy(policy(echo.url + "/v1"))
    async with aiohttp.ClientSession() as http:
        async with http.get(proxy.v1 + "/files/file-abc.jsonl/content", headers=ALPHA) as resp:
            assert resp.status == 200
    assert echo.last.path == "/v1/files/file-abc.jsonl/content"


# --- no resend that could bill twice -------------------------------------------------------------------------


async def _close_after(delay: float, writer: asyncio.StreamWriter, first: bytes = b"") -> None:
    if first:
        writer.write(first)
        await writer.drain()
    await asyncio.sleep(delay)
    writer.close()


@pytest.mark.parametrize(
    "first", [b"", b"HTTP/1.1 200 OK\r\nContent-Type: appl"], ids=["nothing-back", "part-of-a-status-line"]
)
async def test_a_post_is_never_resent_when_the_upstream_may_have_taken_it(
    start_proxy: StartProxy, first: bytes
) -> None:
    # A fresh connection that drops after the request, or any response byte: the upstream may be generating
    # (and billing). Only a reused keep-alive connection closing before any byte is safe to resend.
    async with RawUpstream(lambda writer: _close_after(0.2, writer, first)) as up:
        proxy = await start_proxy(policy(up.url))
        async with aiohttp.ClientSession() as http:
            async with http.post(proxy.v1 + "/chat/completions", headers=ALPHA, data=b'{"model":"m"}') as resp:
                assert resp.status == 502
        assert up.requests == 1


async def test_a_reused_connection_closed_before_any_byte_is_resent_once(start_proxy: StartProxy) -> None:
    answers = iter([True, False, True])

    async def act(writer: asyncio.StreamWriter) -> None:
        if next(answers, False):  # the first request gets an answer on a keep-alive connection...
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
            await writer.drain()
        else:  # ...the next one, on the same connection, finds it closed without a byte; the resend, on a
            writer.close()  # new connection, is answered

    async with RawUpstream(act) as up:
        proxy = await start_proxy(policy(up.url))
        async with aiohttp.ClientSession() as http:
            for _ in range(2):
                async with http.post(proxy.v1 + "/chat/completions", headers=ALPHA, data=b'{"model":"m"}') as resp:
                    assert resp.status == 200
        assert up.requests == 3  # the stale one was resent, once, on a new connection


# --- a stream request answered by a whole body ---------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 200])
async def test_a_stream_request_answered_with_a_stalled_whole_body_ends_within_first_token(
    start_proxy: StartProxy, loopback: Loopback, status: int
) -> None:
    async def stall(request: web.Request) -> web.StreamResponse:
        await request.read()
        framing = {"Content-Type": "application/json", "Content-Length": "99"}
        response = web.StreamResponse(status=status, headers=framing)
        await response.prepare(request)
        await response.write(b'{"error":')
        await asyncio.sleep(30)
        return response

    url = await serve(loopback, stall)
    proxy = await start_proxy(policy(url, route=", timeouts: {first_token: 1s, total: 20s}"))
    async with aiohttp.ClientSession() as http:
        body = b'{"model":"m","stream":true}'
        async with http.post(proxy.v1 + "/chat/completions", headers=ALPHA, data=body) as resp:
            assert resp.status == 504
            error = (await resp.json())["error"]
    # The read timeout (first_token) ended it, not the 20 s total deadline.
    assert error["code"] == "upstream_timeout" and "stopped sending" in error["message"]


# --- request headers -----------------------------------------------------------------------------------------


async def test_repeated_request_headers_all_reach_the_upstream(start_proxy: StartProxy, echo: EchoUpstream) -> None:
    proxy = await start_proxy(policy(echo.url + "/v1"))
    headers = [
        *ALPHA.items(),
        ("OpenAI-Beta", "assistants=v2"),
        ("OpenAI-Beta", "realtime=v1"),
        ("Cookie", "a=1"),
        ("Cookie", "b=2"),
    ]
    async with aiohttp.ClientSession() as http:
        async with http.post(proxy.v1 + "/chat/completions", data=b'{"model":"m"}', headers=headers) as resp:
            assert resp.status == 200
    assert echo.last.header_all("openai-beta") == ["assistants=v2, realtime=v1"]  # one list (RFC 9110 §5.3)
    assert echo.last.header_all("cookie") == ["a=1; b=2"]  # RFC 6265 §5.4


# --- uploads -------------------------------------------------------------------------------------------------


async def test_sdk_uploads_go_through_as_sent_and_route_on_their_model_field(
    start_proxy: StartProxy, echo: EchoUpstream
) -> None:
    routes = f"""
    identify: {{mode: api_key}}
    upstreams:
      up: {{provider: openai, base_url: "{echo.url}/v1", api_key: "${{TEST_UPSTREAM_KEY}}"}}
    tenants:
      alpha: {{keys: [sk-alpha]}}
    routes:
      - {{name: speech, match: {{model: "whisper-1"}}, upstream: up, model: whisper-large-v3}}
      - {{name: files, match: {{path: "/v1/files"}}, upstream: up}}
    """
    proxy = await start_proxy(routes)
    client = openai.AsyncOpenAI(base_url=proxy.v1, api_key="sk-alpha", max_retries=0, timeout=10)
    audio = b"RIFF\x00\x01WAVEfmt \x00\xff" * 100
    try:
        echo.reply(Reply(body=b'{"text": "hello"}'))
        wav = ("a.wav", io.BytesIO(audio), "audio/wav")
        result = await client.audio.transcriptions.create(model="whisper-1", file=wav)
        assert result.text == "hello"
        got = echo.last
        assert got.path == "/v1/audio/transcriptions"
        assert (got.header("content-type") or "").startswith("multipart/form-data")
        assert b"whisper-large-v3" in got.body and b"whisper-1" not in got.body  # the route's rewrite
        assert audio in got.body
        assert got.header("content-length") == str(len(got.body))

        echo.reply(Reply(body=b'{"id":"file-1","object":"file","bytes":3,"created_at":1,"filename":"a.jsonl",'
                              b'"purpose":"batch","status":"processed"}'))
        jsonl = ("a.jsonl", io.BytesIO(b"{}\n"), "application/jsonl")
        uploaded = await client.files.create(file=jsonl, purpose="batch")
        assert uploaded.id == "file-1" and echo.last.path == "/v1/files"
    finally:
        await client.close()
    lines = proxy.access_lines()
    assert [line["route"] for line in lines[-2:]] == ["speech", "files"]


def test_multipart_field_spans() -> None:
    boundary = b"xYz"
    body = (
        b"--xYz\r\nContent-Disposition: form-data; name=\"file\"; filename=\"model\"\r\n\r\nmodel=\r\n--xYz\r\n"
        b"--notit\r\n"
        b"--xYz\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n"
        b"--xYz\r\nContent-Disposition: form-data; name=\"stream\"\r\n\r\ntrue\r\n--xYz--\r\n"
    )
    assert multipart.boundary_of('multipart/form-data; charset=utf-8; boundary="xYz"') == boundary
    assert multipart.boundary_of("application/json") is None
    span = multipart.field_span(body, boundary, "model")
    assert span is not None and body[span[0] : span[1]] == b"whisper-1"  # not the file named "model"
    assert multipart.field_value(body, boundary, "stream") == "true"
    assert multipart.field_value(body, boundary, "absent") is None
    assert multipart.field_value(body[:40], boundary, "model") is None  # truncated: nothing, no error
    rewritten = multipart.with_field(body, span, "large-v3")
    assert multipart.field_value(rewritten, boundary, "model") == "large-v3"
    assert multipart.field_value(rewritten, boundary, "stream") == "true"


# --- the Anthropic front -------------------------------------------------------------------------------------


async def test_an_html_error_page_before_anthropic_reaches_the_client_as_anthropic_json(
    start_proxy: StartProxy, echo: EchoUpstream
) -> None:
    proxy = await start_proxy(policy(echo.url + "/v1", provider="anthropic"))
    echo.reply(Reply(status=502, headers=[("Content-Type", "text/html")], body=HTML_502))
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="sk-alpha", max_retries=0, timeout=10)
    try:
        with pytest.raises(anthropic.InternalServerError) as info:
            await client.messages.create(model="claude-x", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    finally:
        await client.close()
    assert info.value.status_code == 502
    assert info.value.response.headers["content-type"].startswith("application/json")
    body = info.value.body
    assert isinstance(body, dict) and body["type"] == "error" and body["error"]["type"] == "api_error"
    assert "502 Bad Gateway" in body["error"]["message"]

    anthropic_error = b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}'
    echo.reply(Reply(status=529, headers=[("Content-Type", "application/json")], body=anthropic_error))
    async with aiohttp.ClientSession() as http:
        body_bytes = b'{"model":"claude-x","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}'
        async with http.post(proxy.v1 + "/messages", data=body_bytes, headers=ANTHROPIC) as resp:
            assert resp.status == 529 and await resp.read() == anthropic_error  # already Anthropic's: as sent


async def test_the_anthropic_sdk_lists_models_in_anthropic_shape(start_proxy: StartProxy, echo: EchoUpstream) -> None:
    proxy = await start_proxy(policy(echo.url + "/v1", provider="anthropic", route=', match: {model: "claude-x"}'))
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="sk-alpha", max_retries=0, timeout=10)
    wrong = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="sk-wrong", max_retries=0, timeout=10)
    try:
        page = await client.models.list()
        assert [(m.id, m.type, m.display_name) for m in page.data] == [("claude-x", "model", "claude-x")]
        assert page.data[0].created_at.year >= 2026 and page.has_more is False
        one = await client.models.retrieve("claude-x")
        assert one.id == "claude-x" and one.type == "model"
        with pytest.raises(anthropic.NotFoundError) as missing:
            await client.models.retrieve("gpt-4o")
        assert missing.value.body["type"] == "error"  # type: ignore[index]
        with pytest.raises(anthropic.AuthenticationError) as refused:
            await wrong.models.list()
        assert refused.value.body["type"] == "error"  # type: ignore[index]
    finally:
        await client.close()
        await wrong.close()
    openai_client = openai.AsyncOpenAI(base_url=proxy.v1, api_key="sk-alpha", max_retries=0, timeout=10)
    try:
        assert [m.id for m in (await openai_client.models.list()).data] == ["claude-x"]  # still OpenAI's shape
    finally:
        await openai_client.close()


# --- keys ----------------------------------------------------------------------------------------------------


async def test_an_upstream_401_quoting_part_of_the_platform_key_reaches_no_tenant(
    start_proxy: StartProxy, echo: EchoUpstream
) -> None:
    quoted = (
        b'{"error":{"message":"Incorrect API key provided: sk-proj-********************do-not-leak. You can find '
        b'your API key at https://platform.openai.com/account/api-keys.","type":"invalid_request_error",'
        b'"param":null,"code":"invalid_api_key"}}'
    )
    proxy = await start_proxy(policy(echo.url + "/v1"))
    echo.reply(Reply(status=401, headers=[("Content-Type", "application/json")], body=quoted))
    client = openai.AsyncOpenAI(base_url=proxy.v1, api_key="sk-alpha", max_retries=0, timeout=10)
    try:
        with pytest.raises(openai.AuthenticationError) as info:
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    finally:
        await client.close()
    error = info.value.body
    assert isinstance(error, dict)
    assert "do-not-leak" not in info.value.response.text and "sk-proj" not in info.value.response.text
    assert error["code"] == "invalid_api_key" and "[redacted]" in error["message"]
