"""Pass-through fidelity and routing against an echo upstream that records exactly what reached it.

What crosses the proxy unchanged (request and response bytes, unknown fields, custom headers, SSE
formatting), what it changes on purpose (credentials, hop-by-hop headers, a model rewrite, configured
upstream headers and query), and how tenants are identified and routes chosen.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import openai
import pytest
from conftest import UPSTREAM_KEY, EchoUpstream, Proxy, Reply
from openai._streaming import SSEDecoder as OpenAISSEDecoder

pytestmark = pytest.mark.timeout(20)

StartProxy = Callable[..., Awaitable[Proxy]]
# A block of its own until an `id:` reached the client, a lone line glued to the next block after.
HEARTBEATS = (b": ping\n\n", b": ping\n")


def echo_policy(echo: EchoUpstream, *, upstream_extra: str = "", routes: str = "", head: str = "") -> str:
    routes = (
        routes
        or """
      - name: all
        upstream: echo
    """
    )
    return f"""
    {head or "identify: {mode: api_key}"}
    upstreams:
      echo:
        provider: openai
        base_url: {echo.url}/v1
        api_key: ${{TEST_UPSTREAM_KEY}}
        {upstream_extra}
    tenants:
      alpha: {{keys: [sk-alpha]}}
    routes:
    {routes}
    """


async def post(
    url: str, body: bytes, headers: dict[str, str] | list[tuple[str, str]] | None = None
) -> tuple[int, aiohttp.typedefs.LooseHeaders, bytes]:
    async with aiohttp.ClientSession() as http:
        async with http.post(url, data=body, headers=headers) as resp:
            return resp.status, resp.headers, await resp.read()


ALPHA = {"Authorization": "Bearer sk-alpha", "Content-Type": "application/json"}


# --- request fidelity ---------------------------------------------------------------------------------


async def test_request_body_bytes_reach_the_upstream_unchanged(
    start_proxy: StartProxy, echo: EchoUpstream
) -> None:
    proxy = await start_proxy(echo_policy(echo))
    body = (
        b'{ "zeta" :1,\n  "model"  : "any-model",'
        b' "messages":[{"role":"user","content":"h\\u00e9llo \xc3\xa9 \\ud83d\\ude00"}],'
        b'\t"x_vendor_extension": {"nested": [1, 2.50, 1e3, null, true]},  "alpha": "last"   }\n'
    )
    status, _, answer = await post(proxy.v1 + "/chat/completions", body, ALPHA)
    assert status == 200
    assert answer == echo.default.body
    assert echo.last.method == "POST"
    assert echo.last.path == "/v1/chat/completions"
    assert echo.last.body == body
    assert echo.last.header("content-length") == str(len(body))

    async def chunked() -> Any:  # a chunked upload arrives as the same bytes
        for i in range(0, len(body), 7):
            yield body[i : i + 7]

    status, _, _ = await post(proxy.v1 + "/chat/completions", chunked(), ALPHA)  # type: ignore[arg-type]
    assert status == 200
    assert echo.last.body == body


async def test_client_headers_forwarded_except_hop_by_hop_and_proxy_credentials(
    start_proxy: StartProxy, echo: EchoUpstream
) -> None:
    proxy = await start_proxy(echo_policy(echo))
    sent = [
        ("Authorization", "Bearer sk-alpha"),
        ("Content-Type", "application/json"),
        ("X-Custom-Thing", "Value  With Spaces, and commas"),
        ("OpenAI-Organization", "org-123"),
        ("OpenAI-Beta", "assistants=v2"),
        ("User-Agent", "my-app/1.0"),
        ("x-stainless-retry-count", "0"),
        ("Keep-Alive", "timeout=5"),
        ("TE", "trailers"),
        ("Trailer", "x-checksum"),
        ("Proxy-Authorization", "Basic c2VjcmV0"),
        ("Proxy-Connection", "keep-alive"),
        ("Connection", "keep-alive, X-Hop-Only"),
        ("X-Hop-Only", "named in Connection, so hop-by-hop"),
        ("X-Signalbox-Priority", "standard"),  # an instruction to the proxy, not to the upstream
    ]
    status, headers, _ = await post(proxy.v1 + "/chat/completions", b'{"model":"m"}', sent)
    assert status == 200
    got = echo.last
    assert got.header("x-custom-thing") == "Value  With Spaces, and commas"
    assert got.header("openai-organization") == "org-123"
    assert got.header("openai-beta") == "assistants=v2"
    assert got.header("user-agent") == "my-app/1.0"
    assert got.header_all("user-agent") == ["my-app/1.0"]  # the client's own, and only it
    assert got.header("x-stainless-retry-count") == "0"
    assert got.header("content-type") == "application/json"
    hop = ("keep-alive", "te", "trailer", "proxy-authorization", "proxy-connection", "x-hop-only")
    hop += ("x-signalbox-priority",)
    for name in hop:
        assert name not in got.header_names, name
    # The proxy credential is replaced by the upstream's key, sent once.
    assert got.header_all("authorization") == [f"Bearer {UPSTREAM_KEY}"]
    assert all("sk-alpha" not in value for _, value in got.headers)
    assert got.header("host") == echo.url.removeprefix("http://")
    assert got.header("accept-encoding") == "identity"  # the proxy relays bytes, so it asks for none
    # The upstream sees the same request id the client gets back.
    assert got.header("x-request-id") == headers["x-request-id"]


async def test_x_api_key_proxy_credential_is_not_forwarded(
    start_proxy: StartProxy, echo: EchoUpstream
) -> None:
    proxy = await start_proxy(echo_policy(echo))
    status, _, _ = await post(
        proxy.v1 + "/chat/completions",
        b'{"model":"m"}',
        {"x-api-key": "sk-alpha", "Content-Type": "application/json"},
    )
    assert status == 200
    assert "x-api-key" not in echo.last.header_names
    assert echo.last.header("authorization") == f"Bearer {UPSTREAM_KEY}"


@pytest.mark.parametrize(
    ("auth_header", "expected_name", "expected_value"),
    [
        ("authorization", "authorization", f"Bearer {UPSTREAM_KEY}"),
        ("api-key", "api-key", UPSTREAM_KEY),
        ("x-api-key", "x-api-key", UPSTREAM_KEY),
    ],
)
async def test_upstream_key_sent_as_configured(
    start_proxy: StartProxy, echo: EchoUpstream, auth_header: str, expected_name: str, expected_value: str
) -> None:
    proxy = await start_proxy(echo_policy(echo, upstream_extra=f"auth_header: {auth_header}"))
    status, _, _ = await post(proxy.v1 + "/chat/completions", b'{"model":"m"}', ALPHA)
    assert status == 200
    assert echo.last.header_all(expected_name) == [expected_value]
    credential_headers = {"authorization", "api-key", "x-api-key"}
    assert echo.last.header_names & credential_headers == {expected_name}


async def test_a_request_without_user_agent_goes_upstream_as_signalbox(
    start_proxy: StartProxy, echo: EchoUpstream
) -> None:
    proxy = await start_proxy(echo_policy(echo))
    async with aiohttp.ClientSession(skip_auto_headers=("User-Agent",)) as http:
        async with http.post(proxy.v1 + "/chat/completions", data=b'{"model":"m"}', headers=ALPHA) as resp:
            assert resp.status == 200
    assert echo.last.header_all("user-agent") == ["signalbox"]


async def test_upstream_headers_query_and_base_path(start_proxy: StartProxy, echo: EchoUpstream) -> None:
    policy = f"""
    upstreams:
      azure:
        provider: openai
        base_url: {echo.url}/openai/deployments/gpt/v1/
        api_key: ${{TEST_UPSTREAM_KEY}}
        auth_header: api-key
        headers: {{X-Team: ml-platform, OpenAI-Beta: from-policy}}
        query: {{api-version: "2024-10-21"}}
    tenants:
      alpha: {{keys: [sk-alpha]}}
    routes:
      - name: azure
        upstream: azure
    """
    proxy = await start_proxy(policy)
    headers = {**ALPHA, "OpenAI-Beta": "from-client"}
    status, _, _ = await post(
        proxy.v1 + "/chat/completions?foo=bar&x=1%202&q=a%26b", b'{"model":"m"}', headers
    )
    assert status == 200
    got = echo.last
    assert got.path == "/openai/deployments/gpt/v1/chat/completions"
    assert got.query_string == "foo=bar&x=1%202&q=a%26b&api-version=2024-10-21"
    assert got.header("x-team") == "ml-platform"
    assert got.header_all("openai-beta") == ["from-policy"]  # the policy's header wins over the client's
    status, _, _ = await post(proxy.v1 + "/embeddings", b'{"model":"m","input":"x"}', ALPHA)
    assert echo.last.query_string == "api-version=2024-10-21"


async def test_get_requests_and_unknown_paths_pass_through(
    start_proxy: StartProxy, echo: EchoUpstream
) -> None:
    proxy = await start_proxy(echo_policy(echo))
    echo.reply(Reply(body=b'{"id":"file-1","bytes":3}'))
    async with aiohttp.ClientSession() as http:
        async with http.get(proxy.v1 + "/files/file-1?limit=2", headers=ALPHA) as resp:
            assert resp.status == 200
            assert await resp.read() == b'{"id":"file-1","bytes":3}'
        assert echo.last.method == "GET"
        assert echo.last.path == "/v1/files/file-1"
        assert echo.last.query_string == "limit=2"
        assert echo.last.body == b""
        # Percent-encoding in the path is forwarded as sent, not decoded (%2F is not a path separator).
        async with http.delete(proxy.v1 + "/files/my%20file%2Fv2", headers=ALPHA) as resp:
            assert resp.status == 200
        assert (echo.last.method, echo.last.path) == ("DELETE", "/v1/files/my%20file%2Fv2")


async def test_route_model_rewrite_changes_only_the_model(
    start_proxy: StartProxy, echo: EchoUpstream
) -> None:
    routes = """
      - name: llama
        match: {model: llama-3-8b}
        upstream: echo
        model: meta-llama/Meta-Llama-3-8B-Instruct
    """
    proxy = await start_proxy(echo_policy(echo, routes=routes))
    sent = {
        "stream_options": None,
        "model": "llama-3-8b",
        "messages": [{"role": "user", "content": "héllo 😀"}],
        "x_unknown": {"b": 1, "a": [0.5, 1e-7, 123456789012]},
        "temperature": 0.25,
    }
    status, headers, _ = await post(proxy.v1 + "/chat/completions", json.dumps(sent).encode(), ALPHA)
    assert status == 200
    assert headers["x-signalbox-route"] == "llama"
    forwarded = json.loads(echo.last.body)
    assert forwarded == {**sent, "model": "meta-llama/Meta-Llama-3-8B-Instruct"}
    assert list(forwarded) == list(sent)  # key order kept
    assert echo.last.header("content-length") == str(len(echo.last.body))


# --- response fidelity --------------------------------------------------------------------------------


async def test_upstream_response_arrives_unchanged(start_proxy: StartProxy, echo: EchoUpstream) -> None:
    proxy = await start_proxy(echo_policy(echo))
    body = b'{"id":"chatcmpl-1",  "object":"chat.completion","x_unknown_field":{"deep":[1,2]},\n"choices":[]}'
    echo.reply(
        Reply(
            status=200,
            headers=[
                ("Content-Type", "application/json; charset=utf-8"),
                ("X-Custom-Response", "kept"),
                ("openai-processing-ms", "42"),
                ("x-ratelimit-remaining-requests", "17"),
                ("Set-Cookie", "a=1"),
                ("Set-Cookie", "b=2"),
                ("x-request-id", "upstream-req-9"),
                ("Keep-Alive", "timeout=5"),
                ("Connection", "keep-alive, X-Upstream-Hop"),
                ("X-Upstream-Hop", "named in Connection"),
                ("Proxy-Authenticate", "Basic"),
                ("Trailer", "x-checksum"),
                ("Server", "upstream-server/1.0"),
            ],
            body=body,
        )
    )
    async with aiohttp.ClientSession() as http:
        async with http.post(proxy.v1 + "/chat/completions", data=b'{"model":"m"}', headers=ALPHA) as resp:
            got = await resp.read()
            headers = resp.headers
    assert got == body
    assert headers["content-type"] == "application/json; charset=utf-8"
    assert headers["x-custom-response"] == "kept"
    assert headers["openai-processing-ms"] == "42"
    assert headers["x-ratelimit-remaining-requests"] == "17"
    assert headers.getall("set-cookie") == ["a=1", "b=2"]
    assert headers["x-upstream-request-id"] == "upstream-req-9"
    assert headers.getall("x-request-id") == [echo.last.header("x-request-id")]
    assert headers["x-signalbox-route"] == "all" and headers["x-signalbox-upstream"] == "echo"
    for name in ("keep-alive", "proxy-authenticate", "trailer", "x-upstream-hop"):
        assert name not in headers, name
    assert headers.get("server") != "upstream-server/1.0"


async def test_upstream_cookies_are_relayed_but_never_kept_or_replayed(
    start_proxy: StartProxy, echo: EchoUpstream
) -> None:
    """Providers set cookies (OpenAI's Cloudflare `__cf_bm`, `_cfuvid`). They belong to the client that got
    them: a shared cookie jar would replay one tenant's cookies on every later request, from any tenant."""
    two_tenants = "alpha: {keys: [sk-alpha]}\n      beta: {keys: [sk-beta]}"
    policy = echo_policy(echo).replace("alpha: {keys: [sk-alpha]}", two_tenants)
    policy = policy.replace("127.0.0.1", "localhost")  # aiohttp's jar ignores cookies from IP addresses
    proxy = await start_proxy(policy)
    echo.reply(Reply(status=200, headers=[("Set-Cookie", "__cf_bm=tenant-alpha; Path=/; HttpOnly")], body=b"{}"))
    status, headers, _ = await post(proxy.v1 + "/chat/completions", b'{"model":"m"}', ALPHA)
    assert status == 200 and headers["set-cookie"].startswith("__cf_bm=tenant-alpha")
    beta = {**ALPHA, "Authorization": "Bearer sk-beta"}
    for caller in (ALPHA, beta):
        status, _, _ = await post(proxy.v1 + "/chat/completions", b'{"model":"m"}', caller)
        assert status == 200
        assert "cookie" not in echo.last.header_names
    status, _, _ = await post(proxy.v1 + "/chat/completions", b'{"model":"m"}', {**beta, "Cookie": "mine=1"})
    assert echo.last.header_all("cookie") == ["mine=1"]  # a client's own cookie is its to send


ACCOUNT_HEADERS = [
    ("openai-organization", "org-platform-team"),
    ("openai-project", "proj_platform"),
    ("x-ratelimit-remaining-requests", "17"),
    ("X-RateLimit-Reset-Tokens", "1m2s"),
    ("openai-processing-ms", "42"),
    ("x-request-id", "upstream-req-9"),
]
EMBEDDING = (
    b'{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.5,0.25]}],'
    b'"model":"m","usage":{"prompt_tokens":2,"total_tokens":2}}'
)


async def test_hidden_response_headers_never_reach_the_client(start_proxy: StartProxy, echo: EchoUpstream) -> None:
    """A shared key's organisation, project and quota are the platform's business: an upstream's
    `hide_response_headers` keeps them from every response (whole, streamed and batched), globs and
    any case included, while the other headers are still relayed."""
    routes = """
      - {name: batched, match: {path: /v1/embeddings}, upstream: echo, batch: {max_wait: 10ms}}
      - {name: all, upstream: echo}
    """
    hide = 'hide_response_headers: [OpenAI-Organization, openai-project, "x-ratelimit-*", x-request-id, content-type]'
    proxy = await start_proxy(echo_policy(echo, upstream_extra=hide, routes=routes))
    whole = [("Content-Type", "application/json"), *ACCOUNT_HEADERS]
    stream = [("Content-Type", "text/event-stream"), *ACCOUNT_HEADERS]
    chunk = b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[]}\n\n'
    echo.reply(
        Reply(headers=whole, body=b'{"id":"c","object":"chat.completion","created":1,"model":"m","choices":[]}'),
        Reply(headers=stream, chunks=[chunk, b"data: [DONE]\n\n"]),
        Reply(headers=whole, body=EMBEDDING),
    )
    async with openai.AsyncOpenAI(base_url=proxy.v1, api_key="sk-alpha", max_retries=0) as client:
        messages = [{"role": "user", "content": "hi"}]
        completion = await client.chat.completions.with_raw_response.create(model="m", messages=messages)
        async with client.chat.completions.with_streaming_response.create(
            model="m", messages=messages, stream=True
        ) as streamed:
            assert [line async for line in streamed.iter_lines() if line] == [chunk.decode().strip(), "data: [DONE]"]
        embedded = await client.embeddings.with_raw_response.create(model="m", input="hi")
        assert embedded.parse().data[0].embedding == [0.5, 0.25]
        for response in (completion, streamed, embedded):
            headers = response.headers
            for name in ("openai-organization", "openai-project", "x-ratelimit-remaining-requests",
                         "x-ratelimit-reset-tokens", "x-upstream-request-id"):
                assert name not in headers, (name, response.http_request.url)
            assert headers["openai-processing-ms"] == "42"
            assert headers["content-type"].startswith(("application/json", "text/event-stream"))  # always relayed
            assert headers["x-request-id"] == response.request_id  # our own id, not the upstream's
    assert embedded.headers["x-signalbox-route"] == "batched"


@pytest.mark.parametrize(
    ("status", "headers", "body"),
    [
        (
            400,
            [("Content-Type", "application/json")],
            b'{"error": {"message": "bad \\"x\\"", "type": "invalid_request_error",'
            b' "param": "x", "code": null}}',
        ),
        (
            429,
            [
                ("Content-Type", "application/json"),
                ("Retry-After", "13"),
                ("x-ratelimit-reset-tokens", "1m2s"),
            ],
            b'{"error":{"message":"slow down","type":"tokens","param":null,"code":"rate_limit_exceeded"}}\n',
        ),
        (
            503,
            [("Content-Type", "application/json"), ("Retry-After", "2"), ("x-should-retry", "true")],
            b'{"error":{"message":"overloaded","type":"server_error","param":null,"code":null}}',
        ),
    ],
)
async def test_openai_shaped_upstream_errors_are_relayed_byte_for_byte(
    start_proxy: StartProxy, echo: EchoUpstream, status: int, headers: list[tuple[str, str]], body: bytes
) -> None:
    proxy = await start_proxy(echo_policy(echo))
    echo.reply(Reply(status=status, headers=headers, body=body))
    got_status, got_headers, got = await post(
        proxy.v1 + "/chat/completions", b'{"model":"m","stream":true}', ALPHA
    )
    assert (got_status, got) == (status, body)
    for name, value in headers:
        assert got_headers[name] == value
    line = proxy.access_lines()[-1]
    assert line["status"] == status and line["error"] is None


@pytest.mark.parametrize(
    ("status", "content_type", "body", "message"),
    [
        (500, "text/html", b"<html>upstream broke</html>", "upstream broke"),
        (503, "text/plain", b"overloaded, try later", "overloaded, try later"),
        (
            400,
            "application/json",
            b'{"object":"error","message":"vllm says no","type":"BadRequestError","code":400}',
            "vllm says no",
        ),
    ],
)
async def test_other_upstream_error_shapes_become_openai_errors_with_status_and_headers_kept(
    start_proxy: StartProxy, echo: EchoUpstream, status: int, content_type: str, body: bytes, message: str
) -> None:
    proxy = await start_proxy(echo_policy(echo))
    echo.reply(
        Reply(status=status, headers=[("Content-Type", content_type), ("Retry-After", "3")], body=body)
    )
    got_status, got_headers, got = await post(proxy.v1 + "/chat/completions", b'{"model":"m"}', ALPHA)
    assert got_status == status
    assert got_headers["retry-after"] == "3"
    assert got_headers["content-type"].startswith("application/json")
    error = json.loads(got)["error"]
    assert {"message", "type", "param", "code"} <= set(error)
    assert message in error["message"]


async def test_openai_sdk_sees_a_relayed_upstream_error_as_its_own(
    start_proxy: StartProxy, echo: EchoUpstream
) -> None:
    proxy = await start_proxy(echo_policy(echo))
    echo.reply(
        Reply(
            status=404,
            body=b'{"error":{"message":"The model `x` does not exist","type":"invalid_request_error",'
            b'"param":null,"code":"model_not_found"}}',
        )
    )
    async with openai.AsyncOpenAI(base_url=proxy.v1, api_key="sk-alpha", max_retries=0, timeout=10) as client:
        with pytest.raises(openai.NotFoundError) as info:
            await client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}])
    assert info.value.message.startswith("Error code: 404 - ") and "does not exist" in info.value.message
    assert info.value.code == "model_not_found"


# --- stream fidelity ----------------------------------------------------------------------------------

SSE_HEADERS = [
    ("Content-Type", "text/event-stream"),
    ("Cache-Control", "no-cache"),
    ("X-Stream-Custom", "yes"),
]

# What a pass-through stream guarantees, precisely: the client receives the upstream's event blocks
# (a block = bytes up to and including its blank line) in order, each byte-identical, with two liberties:
#   * comment-only blocks (upstream keep-alives) may be dropped;
#   * `: ping` heartbeats may be added, but only between blocks, never inside one.
# Framing bytes in front of a block's first line are not forwarded: a stream-start BOM, or the LF that
# completes a CRLF split across two upstream reads (that block then ends in CR alone, which every SSE
# parser reads as the same line end). Nothing else may change.
#
# (block bytes, may the proxy drop it?) Mixed line endings, multi-line data, unknown fields and event
# names, a `retry:` line, `data:` without a space and a comment inside an event block are all legal SSE.
ODD_BLOCKS: list[tuple[bytes, bool]] = [
    (b": upstream hello\r\n\r\n", True),
    (b'data: {"id":"c1","choices":[{"index":0,"delta":{"content":"a"}}],"x_unknown":1}\r\n\r\n', False),
    (b": keep-alive\n\n", True),
    (b'data: {"id":"c1",\r\ndata:  "choices":[]}\r\n\r\n', False),
    (b'event: vendor.custom\ndata: {"part": 2}\n: a comment inside an event\nretry: 3000\n\n', False),
    (b'data:{"nospace":true}\r\n\r\n', False),
    (b"data: [DONE]\r\n\r\n", False),
]


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    edges = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:], strict=False) if a < b]


def match_stream(received: bytes, blocks: list[tuple[bytes, bool]]) -> int:
    """Assert `received` is the blocks in order, optional ones present or not, with `: ping` heartbeat lines
    allowed only between blocks (never inside one). Returns how many heartbeats were seen."""
    pos = beats = 0

    def skip_beats() -> None:
        nonlocal pos, beats
        while beat := next((b for b in HEARTBEATS if received.startswith(b, pos)), None):
            pos, beats = pos + len(beat), beats + 1

    for block, optional in blocks:
        skip_beats()
        if received.startswith(block, pos):
            pos += len(block)
        else:
            assert optional, f"missing or altered block {block!r} at {pos}: {received[pos : pos + 80]!r}"
    skip_beats()
    assert pos == len(received), f"unexpected trailing bytes {received[pos:]!r}"
    return beats


async def stream_through(proxy: Proxy) -> tuple[int, Any, bytes, float]:
    started = time.monotonic()
    async with aiohttp.ClientSession() as http:
        async with http.post(
            proxy.v1 + "/chat/completions", data=b'{"model":"m","stream":true}', headers=ALPHA
        ) as resp:
            body = await resp.read()
            return resp.status, resp.headers, body, time.monotonic() - started


@pytest.mark.parametrize("heartbeat", [0.0, 0.03])
async def test_stream_bytes_arrive_unchanged(
    start_proxy: StartProxy, echo: EchoUpstream, heartbeat: float
) -> None:
    proxy = await start_proxy(echo_policy(echo), heartbeat=heartbeat)
    stream = b"".join(block for block, _ in ODD_BLOCKS)
    # Cut inside a comment, inside a data line, between the CR and LF that end a data block followed by
    # another event, inside `event:` and near the end.
    crlf_before_event = stream.index(b"event:") - 1
    cuts = sorted(
        {5, 40, crlf_before_event, stream.index(b"event:") + 3, stream.index(b"nospace"), len(stream) - 4}
    )
    echo.reply(Reply(headers=SSE_HEADERS, chunks=split_at(stream, cuts), gap=0.08 if heartbeat else 0.02))
    status, headers, received, _ = await stream_through(proxy)
    assert status == 200
    assert headers["content-type"].startswith("text/event-stream")
    assert headers["x-stream-custom"] == "yes"
    # The block whose final CRLF was split keeps its CR; the LF came as framing of the next read. (Should
    # the proxy read two of our writes at once under load, there is no split and the block arrives whole.)
    split = [
        (
            block[:-1]
            if block.endswith(b"\r\n\r\n") and stream.index(block) + len(block) - 1 == crlf_before_event
            else block,
            optional,
        )
        for block, optional in ODD_BLOCKS
    ]
    assert split != ODD_BLOCKS
    try:
        beats, expected = match_stream(received, split), split
    except AssertionError:
        beats, expected = match_stream(received, ODD_BLOCKS), ODD_BLOCKS
    if heartbeat:
        assert beats >= 2  # silence between upstream chunks was filled, only at block boundaries
    else:
        assert beats == 0
        # Exactly the event blocks, nothing added.
        assert received == b"".join(block for block, optional in expected if not optional)
    assert proxy.access_lines()[-1]["events"] == sum(1 for _, optional in ODD_BLOCKS if not optional)
    assert sse_events([received]) == sse_events([stream])  # and what an SDK parses is the same, too


def sse_events(chunks: list[bytes]) -> list[tuple[str | None, str, str | None, int | None]]:
    return [(e.event, e.data, e.id, e.retry) for e in OpenAISSEDecoder().iter_bytes(iter(chunks))]


async def test_dropped_comment_block_after_a_split_crlf_keeps_the_events_intact(
    start_proxy: StartProxy, echo: EchoUpstream
) -> None:
    # A CRLF split across reads right before a comment-only block: the LF is framing, not forwarded.
    first = b'data: {"a":1}\r\n\r'
    chunks = [first, b"\n: upstream keep-alive\r\n\r\n", b"data: [DONE]\r\n\r\n"]
    echo.reply(Reply(headers=SSE_HEADERS, chunks=chunks, gap=0.05))
    status, _, received, _ = await stream_through(proxy := await start_proxy(echo_policy(echo)))
    assert status == 200 and proxy.access_lines()[-1]["events"] == 2
    assert received == first + chunks[2] or received == first + b"\n" + chunks[2]  # split, or one read
    assert (
        sse_events([received])
        == sse_events(chunks)
        == [(None, '{"a":1}', None, None), (None, "[DONE]", None, None)]
    )


@pytest.mark.parametrize(
    ("done_chunks", "done_block"),
    [
        ([b"\ndata: [DONE]\n\n"], b"data: [DONE]\n\n"),
        ([b"\ndata: [DONE]\r\n\r\n"], b"data: [DONE]\r\n\r\n"),
        ([b"\n", b"data: [DONE]\r\n\r\n"], b"data: [DONE]\r\n\r\n"),  # the LF alone, then DONE
        ([b"\ndata:[DONE]\n\n"], b"data:[DONE]\n\n"),  # no space after the colon: still the end for the SDK
    ],
    ids=["lf", "crlf", "lf-alone", "no-space"],
)
async def test_stream_finishes_promptly_after_done_while_upstream_lingers(
    start_proxy: StartProxy, echo: EchoUpstream, done_chunks: list[bytes], done_block: bytes
) -> None:
    proxy = await start_proxy(echo_policy(echo))
    first = (
        b'data: {"choices":[{"index":0,"delta":{"content":"x"}}]}\r\n\r'  # its LF comes with the next read
    )
    echo.reply(Reply(headers=SSE_HEADERS, chunks=[first, *done_chunks], gap=0.02, linger=5.0))
    status, _, received, _ = await stream_through(proxy)
    assert status == 200
    # The client's read ended while the upstream still lingers (5 s): the proxy ended at [DONE].
    assert echo.finished == 0
    assert received in (first + done_block, first + b"\n" + done_block)  # the LF split off, or one read
    for _ in range(100):  # the proxy also lets go of the upstream connection
        if echo.cancelled:
            break
        await asyncio.sleep(0.02)
    assert echo.cancelled == 1


async def test_sdk_stream_finishes_promptly_after_done(start_proxy: StartProxy, echo: EchoUpstream) -> None:
    proxy = await start_proxy(echo_policy(echo))
    chunk = {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}],
    }
    events = [b"data: " + json.dumps(chunk).encode() + b"\n\n", b"data: [DONE]\n\n"]
    echo.reply(Reply(headers=SSE_HEADERS, chunks=events, linger=5.0))
    client = openai.OpenAI(base_url=proxy.v1, api_key="sk-alpha", max_retries=0, timeout=10)

    def run() -> list[str]:
        with client, client.chat.completions.create(model="m", messages=[], stream=True) as stream:
            return [c.choices[0].delta.content or "" for c in stream]

    assert await asyncio.to_thread(run) == ["hi"]
    assert echo.finished == 0  # the SDK's stream ended while the upstream still held its connection


async def test_stream_cut_before_done_gets_an_error_event(
    start_proxy: StartProxy, echo: EchoUpstream
) -> None:
    proxy = await start_proxy(echo_policy(echo))
    event = b'data: {"choices":[{"index":0,"delta":{"content":"partial"}}]}\n\n'
    echo.reply(Reply(headers=SSE_HEADERS, chunks=[event]))  # a clean EOF, but no [DONE]
    status, _, received, _ = await stream_through(proxy)
    assert status == 200
    assert received.startswith(event)
    tail = received[len(event) :]
    assert tail.startswith(b"data: ") and tail.endswith(b"\n\n")
    error = json.loads(tail[6:])["error"]
    assert error["code"] == "upstream_unreachable"
    assert "ended the stream early" in error["message"]


# --- identification and routing -----------------------------------------------------------------------


def two_upstreams(echo: EchoUpstream, identify: str, tenants: str, routes: str) -> str:
    return f"""
    identify: {identify}
    upstreams:
      a:
        provider: openai
        base_url: {echo.url}/a/v1
        api_key: ${{TEST_UPSTREAM_KEY}}
      b:
        provider: openai
        base_url: {echo.url}/b/v1
        api_key: ${{TEST_UPSTREAM_KEY}}
    tenants:
    {tenants}
    routes:
    {routes}
    """


async def call(proxy: Proxy, model: str, headers: dict[str, str]) -> tuple[int, Any, Any]:
    body = json.dumps({"model": model, "messages": []}).encode()
    status, got_headers, raw = await post(proxy.v1 + "/chat/completions", body, headers)
    return status, got_headers, json.loads(raw)


async def test_api_key_mode_bearer_and_x_api_key(start_proxy: StartProxy, echo: EchoUpstream) -> None:
    tenants = """
      alpha: {keys: [sk-alpha, sk-alpha-2]}
      beta: {keys: [sk-beta]}
    """
    routes = """
      - name: beta
        match: {tenants: [beta]}
        upstream: b
      - name: rest
        upstream: a
    """
    proxy = await start_proxy(two_upstreams(echo, "{mode: api_key}", tenants, routes))
    for headers, route in [
        ({"Authorization": "Bearer sk-alpha"}, "rest"),
        ({"Authorization": "bearer sk-alpha-2"}, "rest"),
        ({"x-api-key": "sk-beta"}, "beta"),
        ({"Authorization": "Bearer sk-beta"}, "beta"),
    ]:
        status, got, _ = await call(proxy, "m", headers)
        assert status == 200, headers
        assert got["x-signalbox-route"] == route
    assert [r.path for r in echo.received] == ["/a/v1/chat/completions"] * 2 + ["/b/v1/chat/completions"] * 2
    status, _, body = await call(proxy, "m", {"Authorization": "Basic sk-alpha"})
    assert status == 401 and body["error"]["code"] == "invalid_api_key"


async def test_header_mode_names_the_tenant_and_is_not_forwarded(
    start_proxy: StartProxy, echo: EchoUpstream
) -> None:
    tenants = """
      alpha: {}
      beta: {}
    """
    routes = """
      - name: beta
        match: {tenants: [beta]}
        upstream: b
      - name: rest
        upstream: a
    """
    proxy = await start_proxy(two_upstreams(echo, "{mode: header, header: X-Team}", tenants, routes))
    status, got, _ = await call(proxy, "m", {"x-team": "beta", "Authorization": "Bearer app-token"})
    assert status == 200 and got["x-signalbox-route"] == "beta"
    assert "x-team" not in echo.last.header_names
    assert echo.last.header_all("authorization") == [f"Bearer {UPSTREAM_KEY}"]
    status, got, _ = await call(proxy, "m", {"X-TEAM": "alpha"})
    assert status == 200 and got["x-signalbox-route"] == "rest"
    status, _, body = await call(proxy, "m", {})
    assert status == 401 and "x-team" in body["error"]["message"]
    status, _, body = await call(proxy, "m", {"x-team": "nobody"})
    assert status == 401 and "nobody" in body["error"]["message"]
    assert len(echo.received) == 2


async def test_single_mode_needs_no_credentials(start_proxy: StartProxy, echo: EchoUpstream) -> None:
    routes = """
      - name: only
        upstream: a
    """
    proxy = await start_proxy(two_upstreams(echo, "{mode: single, tenant: solo}", "  solo: {}", routes))
    status, got, _ = await call(proxy, "m", {})
    assert status == 200 and got["x-signalbox-route"] == "only"
    assert echo.last.header("authorization") == f"Bearer {UPSTREAM_KEY}"
    assert proxy.access_lines()[-1]["tenant"] == "solo"


async def test_passthrough_mode_forwards_the_clients_own_credentials(
    start_proxy: StartProxy, echo: EchoUpstream
) -> None:
    tenants = """
      apps: {}
      batch: {}
    """
    routes = """
      - name: batch
        match: {tenants: [batch]}
        upstream: b
      - name: rest
        upstream: a
    """
    proxy = await start_proxy(two_upstreams(echo, "{mode: passthrough, tenant: apps}", tenants, routes))
    status, got, _ = await call(proxy, "m", {"Authorization": "Bearer sk-users-own-key"})
    assert status == 200 and got["x-signalbox-route"] == "rest"
    assert echo.last.header_all("authorization") == ["Bearer sk-users-own-key"]
    assert all(UPSTREAM_KEY not in value for _, value in echo.last.headers)
    status, got, _ = await call(proxy, "m", {"api-key": "azure-own", "x-signalbox-tenant": "batch"})
    assert status == 200 and got["x-signalbox-route"] == "batch"
    assert echo.last.header("api-key") == "azure-own"
    assert "authorization" not in echo.last.header_names
    assert "x-signalbox-tenant" not in echo.last.header_names


async def test_base_url_credentials_are_sent_as_basic_auth_in_every_mode(
    start_proxy: StartProxy, echo: EchoUpstream
) -> None:
    # aiohttp refuses URL credentials next to an Authorization header: the app's own, in passthrough mode,
    # was a 500 for every request. The proxy now sends them as an explicit header; the URL carries none.
    host = echo.url.removeprefix("http://")
    policy = f"""
    identify: {{mode: passthrough, tenant: apps}}
    upstreams:
      basic: {{provider: openai, base_url: "http://svc:p%40ss@{host}/v1"}}
      keyed: {{provider: anthropic, base_url: "http://svc:p%40ss@{host}/v1", api_key: sk-keyed}}
    tenants:
      apps: {{}}
    routes:
      - {{name: basic, match: {{model: m}}, upstream: basic}}
      - {{name: keyed, upstream: keyed}}
    """
    proxy = await start_proxy(policy)
    status, _, _ = await call(proxy, "m", {})
    assert status == 200 and echo.last.header_all("authorization") == ["Basic c3ZjOnBAc3M="]  # svc:p@ss
    status, _, _ = await call(proxy, "m", {"Authorization": "Bearer sk-users-own-key"})
    assert status == 200 and echo.last.header_all("authorization") == ["Bearer sk-users-own-key"]
    status, _, _ = await call(proxy, "claude", {"Authorization": "Bearer sk-users-own-key"})
    assert status == 200 and echo.last.header_all("authorization") == ["Bearer sk-users-own-key"]
    status, _, _ = await call(proxy, "claude", {})
    assert status == 200 and echo.last.header_all("authorization") == ["Basic c3ZjOnBAc3M="]
    assert echo.last.header("x-api-key") == "sk-keyed"
    assert all("p%40ss" not in value for _, value in echo.last.headers)


async def test_passthrough_without_a_default_tenant_needs_the_header(
    start_proxy: StartProxy, echo: EchoUpstream
) -> None:
    routes = """
      - name: rest
        upstream: a
    """
    proxy = await start_proxy(two_upstreams(echo, "{mode: passthrough}", "  apps: {}", routes))
    status, _, body = await call(proxy, "m", {"Authorization": "Bearer own"})
    assert status == 401 and "x-signalbox-tenant" in body["error"]["message"]
    status, _, _ = await call(proxy, "m", {"Authorization": "Bearer own", "x-signalbox-tenant": "apps"})
    assert status == 200
    assert echo.last.header("authorization") == "Bearer own"


async def test_tenant_model_allow_list(start_proxy: StartProxy, echo: EchoUpstream) -> None:
    tenants = """
      alpha: {keys: [sk-alpha]}
      beta: {keys: [sk-beta], models: ["echo-*", exact-one]}
    """
    routes = """
      - name: all
        match: {model: ["echo-1", "echo-2", "exact-one", "other"]}
        upstream: a
    """
    proxy = await start_proxy(two_upstreams(echo, "{mode: api_key}", tenants, routes))
    beta = {"Authorization": "Bearer sk-beta"}
    assert (await call(proxy, "echo-2", beta))[0] == 200
    assert (await call(proxy, "exact-one", beta))[0] == 200
    status, _, body = await call(proxy, "other", beta)
    assert status == 404
    assert (
        "echo-1, echo-2, exact-one" in body["error"]["message"]
        and "other" not in body["error"]["message"].split(":")[-1]
    )
    assert (await call(proxy, "other", {"Authorization": "Bearer sk-alpha"}))[0] == 200
    assert len(echo.received) == 3


async def test_first_matching_route_wins(start_proxy: StartProxy, echo: EchoUpstream) -> None:
    tenants = """
      alpha: {keys: [sk-alpha]}
      beta: {keys: [sk-beta]}
    """
    routes = """
      - name: embeddings-only
        match: {path: /v1/embeddings}
        upstream: b
      - name: family
        match: {model: "m-*"}
        upstream: a
      - name: shadowed
        match: {model: m-1}
        upstream: b
      - name: x-for-beta
        match: {model: x, tenants: [beta]}
        upstream: b
      - name: x-for-all
        match: {model: x}
        upstream: a
    """
    proxy = await start_proxy(two_upstreams(echo, "{mode: api_key}", tenants, routes))
    alpha, beta = {"Authorization": "Bearer sk-alpha"}, {"Authorization": "Bearer sk-beta"}
    cases = [
        ("m-1", alpha, "family", "/a/"),
        ("x", alpha, "x-for-all", "/a/"),
        ("x", beta, "x-for-beta", "/b/"),
    ]
    for model, headers, route, prefix in cases:
        status, got, _ = await call(proxy, model, headers)
        assert status == 200
        assert got["x-signalbox-route"] == route
        assert echo.last.path.startswith(prefix)
    status, got, _ = await post(proxy.v1 + "/embeddings", b'{"model":"m-1","input":"x"}', alpha)
    assert status == 200 and got["x-signalbox-route"] == "embeddings-only"
    assert echo.last.path == "/b/v1/embeddings"
