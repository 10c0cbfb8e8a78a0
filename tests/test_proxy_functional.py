"""End to end through the proxy with the official openai SDK: the built-in mock upstream behind it, real
sockets on loopback. Covers the happy paths, every proxy-made error's status/SDK class/body, relayed
upstream errors, mid-stream failures, the health endpoints and metrics, and that the upstream key never
leaks into a response or a log line."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import openai
import pytest
from conftest import UPSTREAM_KEY, Proxy, closed_port
from kit import UPSTREAM_KEY_REF, build_policy, route_spec, scrape, upstream_spec

pytestmark = pytest.mark.timeout(20)

StartProxy = Callable[..., Awaitable[Proxy]]
MakeAsync = Callable[..., openai.AsyncOpenAI]
MakeSync = Callable[..., openai.OpenAI]

EMBED_DIM = 12
OUTPUT_TOKENS = 6


def policy(*, max_body: str = "4KiB", dead_port: int | None = None) -> str:
    sizes = {"output_tokens": OUTPUT_TOKENS, "embedding_dim": EMBED_DIM}
    mock = {"provider": "mock", "api_key": UPSTREAM_KEY_REF, "mock": sizes}
    dead = upstream_spec(f"http://127.0.0.1:{dead_port or closed_port()}", timeouts={"connect": "2s"})
    tenants = {
        "alpha": {"keys": ["sk-alpha"]},
        "beta": {"keys": ["sk-beta"], "models": ["mock-chat"]},
        "gamma": {"keys": ["sk-gamma"]},
    }
    routes = [
        {"name": "gamma-only", "match": {"model": "gamma-chat", "tenants": ["gamma"]}, "upstream": "mock"},
        route_spec(
            "chat", "mock", path=["/v1/chat/completions", "/v1/completions"], model=["mock-chat", "mock-chat-*"]
        ),
        route_spec("embeddings", "mock", path="/v1/embeddings", model="mock-embed"),
        route_spec("slow", "mock", model="slow-chat", timeouts={"first_token": "300ms"}),
        route_spec("dead", "dead", model="dead-chat"),
    ]
    return build_policy({"mock": mock, "dead": dead}, routes, tenants=tenants, max_body_size=max_body)


@pytest.fixture
async def proxy(start_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch) -> Proxy:
    monkeypatch.setenv("TEST_UPSTREAM_KEY", UPSTREAM_KEY)
    return await start_proxy(policy())


@pytest.fixture(autouse=True)
def _capture_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)


def no_key_leaked(proxy: Proxy, caplog: pytest.LogCaptureFixture, *texts: str) -> None:
    for text in texts:
        assert UPSTREAM_KEY not in text
    assert UPSTREAM_KEY.encode() not in proxy.log.getvalue()
    assert UPSTREAM_KEY not in caplog.text
    for record in caplog.records:
        assert UPSTREAM_KEY not in record.getMessage()


MESSAGES: Any = [{"role": "user", "content": "say hello to the signal box"}]
WEATHER_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city", "days"],
        },
    },
}


# --- happy paths ------------------------------------------------------------------------------------


async def test_chat_non_stream_with_the_sync_sdk(proxy: Proxy, sync_openai: MakeSync) -> None:
    client = sync_openai(proxy)
    result = await asyncio.to_thread(client.chat.completions.create, model="mock-chat", messages=MESSAGES)
    assert result.object == "chat.completion"
    assert result.model == "mock-chat"
    assert result.choices[0].finish_reason == "stop"
    assert result.choices[0].message.content
    assert result.usage is not None and result.usage.completion_tokens == OUTPUT_TOKENS


async def test_chat_stream_with_the_sync_sdk(proxy: Proxy, sync_openai: MakeSync) -> None:
    client = sync_openai(proxy)

    def run() -> list[Any]:
        with client.chat.completions.create(model="mock-chat", messages=MESSAGES, stream=True) as stream:
            return list(stream)

    chunks = await asyncio.to_thread(run)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks)  # no usage chunk unless asked for
    whole = await asyncio.to_thread(client.chat.completions.create, model="mock-chat", messages=MESSAGES)
    assert text == whole.choices[0].message.content


async def test_chat_stream_include_usage_delivers_the_usage_chunk(
    proxy: Proxy, async_openai: MakeAsync
) -> None:
    client = async_openai(proxy)
    stream = await client.chat.completions.create(
        model="mock-chat", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens == OUTPUT_TOKENS
    assert last.usage.total_tokens == last.usage.prompt_tokens + OUTPUT_TOKENS
    assert all(c.usage is None for c in chunks[:-1])


async def test_tool_calls_stream_and_not(proxy: Proxy, async_openai: MakeAsync) -> None:
    client = async_openai(proxy)
    whole = await client.chat.completions.create(model="mock-chat", messages=MESSAGES, tools=[WEATHER_TOOL])
    call = whole.choices[0].message.tool_calls
    assert whole.choices[0].finish_reason == "tool_calls"
    assert call is not None and call[0].type == "function" and call[0].function.name == "get_weather"
    args = json.loads(call[0].function.arguments)
    assert isinstance(args["city"], str) and isinstance(args["days"], int)

    stream = await client.chat.completions.create(
        model="mock-chat", messages=MESSAGES, tools=[WEATHER_TOOL], stream=True
    )
    pieces: list[str] = []
    names: list[str] = []
    finish = None
    fragments = 0
    async for chunk in stream:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or []:
                assert delta.index == 0
                if delta.function and delta.function.name:
                    names.append(delta.function.name)
                if delta.function and delta.function.arguments:
                    pieces.append(delta.function.arguments)
                    fragments += 1
    assert names == ["get_weather"]
    assert finish == "tool_calls"
    assert fragments > 1  # really streamed in pieces
    assert json.loads("".join(pieces)) == args


async def test_embeddings_base64_default_and_float_agree(proxy: Proxy, async_openai: MakeAsync) -> None:
    client = async_openai(proxy)
    inputs = ["first text", "second text"]
    default = await client.embeddings.create(model="mock-embed", input=inputs)  # SDK asks for base64
    floats = await client.embeddings.create(model="mock-embed", input=inputs, encoding_format="float")
    assert [d.index for d in default.data] == [0, 1]
    for a, b in zip(default.data, floats.data, strict=True):
        assert len(a.embedding) == EMBED_DIM
        assert a.embedding == b.embedding
    assert default.data[0].embedding != default.data[1].embedding


async def test_embeddings_request_really_uses_base64_on_the_wire(proxy: Proxy) -> None:
    async with aiohttp.ClientSession() as http:
        body = {"model": "mock-embed", "input": "x", "encoding_format": "base64"}
        async with http.post(proxy.v1 + "/embeddings", json=body, headers=auth("sk-alpha")) as resp:
            data = await resp.json()
    assert resp.status == 200
    assert isinstance(data["data"][0]["embedding"], str)


async def test_models_list_shows_the_tenants_models(proxy: Proxy, async_openai: MakeAsync) -> None:
    alpha = [m.id async for m in async_openai(proxy, "sk-alpha").models.list()]
    assert alpha == ["mock-chat", "mock-embed", "slow-chat", "dead-chat"]  # route order, globs not listed
    beta = [m.id async for m in async_openai(proxy, "sk-beta").models.list()]
    assert beta == ["mock-chat"]  # the tenant's allow-list
    gamma = [m.id async for m in async_openai(proxy, "sk-gamma").models.list()]
    assert gamma[0] == "gamma-chat"  # a route restricted to gamma shows only for gamma
    assert "gamma-chat" not in alpha
    model = await async_openai(proxy, "sk-beta").models.retrieve("mock-chat")
    assert model.id == "mock-chat"
    with pytest.raises(openai.NotFoundError):
        await async_openai(proxy, "sk-beta").models.retrieve("mock-embed")
    with pytest.raises(openai.AuthenticationError):
        await async_openai(proxy, "sk-nobody").models.list()
    # Answered by the proxy, yet requests like any other: in the access log and the metrics.
    lines = [line for line in proxy.access_lines() if line["path"].startswith("/v1/models")]
    assert [(line["status"], line["tenant"]) for line in lines] == [
        (200, "alpha"), (200, "beta"), (200, "gamma"), (200, "beta"), (404, "beta"), (401, None),
    ]
    refused = {"route": "", "tenant": "", "upstream": "", "status": "401", "outcome": "rejected"}
    assert proxy.state.metrics.registry.get_sample_value("signalbox_requests_total", refused) == 1


async def test_response_headers_request_id_route_upstream_and_rate_limits(
    proxy: Proxy, async_openai: MakeAsync
) -> None:
    client = async_openai(proxy)
    raw = await client.chat.completions.with_raw_response.create(model="mock-chat", messages=MESSAGES)
    headers = raw.headers
    generated = headers["x-request-id"]
    assert len(generated) >= 16
    assert headers["x-signalbox-route"] == "chat"
    assert headers["x-signalbox-upstream"] == "mock"
    assert headers["x-ratelimit-limit-requests"] == "10000"
    assert headers["x-ratelimit-remaining-tokens"] == "1999000"
    assert headers["x-upstream-request-id"].startswith("req_")  # the mock's own id survives under a new name
    assert raw.parse().choices[0].message.content

    again = await client.chat.completions.with_raw_response.create(model="mock-chat", messages=MESSAGES)
    assert again.headers["x-request-id"] != generated

    mine = await client.chat.completions.with_raw_response.create(
        model="mock-chat", messages=MESSAGES, extra_headers={"x-request-id": "req-from-the-app-42"}
    )
    assert mine.headers["x-request-id"] == "req-from-the-app-42"
    assert mine.headers.get_list("x-request-id") == ["req-from-the-app-42"]
    lines = proxy.access_lines()
    assert lines[-1]["request_id"] == "req-from-the-app-42"
    assert lines[-1]["route"] == "chat" and lines[-1]["tenant"] == "alpha" and lines[-1]["status"] == 200


async def test_stream_response_headers(proxy: Proxy, async_openai: MakeAsync) -> None:
    client = async_openai(proxy)
    async with client.chat.completions.with_streaming_response.create(
        model="mock-chat", messages=MESSAGES, stream=True, extra_headers={"x-request-id": "stream-id-1"}
    ) as raw:
        assert raw.headers["content-type"].startswith("text/event-stream")
        assert raw.headers["x-request-id"] == "stream-id-1"
        assert raw.headers["x-signalbox-route"] == "chat"
        assert raw.headers["x-ratelimit-limit-tokens"] == "2000000"
        chunks = [c async for c in await raw.parse()]
    assert chunks[-1].choices[0].finish_reason == "stop"


# --- errors the proxy makes ---------------------------------------------------------------------------


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def raw_post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any], str]:
    async with aiohttp.ClientSession() as http:
        async with http.post(url, data=body, headers={"Content-Type": "application/json", **headers}) as resp:
            text = await resp.text()
            return resp.status, json.loads(text), text


def assert_openai_error(body: Any, code: str | None, etype: str | None = None) -> dict[str, Any]:
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["code"] == code
    if etype is not None:
        assert error["type"] == etype
    return error


async def test_invalid_json_is_400(proxy: Proxy, caplog: pytest.LogCaptureFixture) -> None:
    status, body, text = await raw_post(
        proxy.v1 + "/chat/completions", b'{"model": "mock-chat", ', auth("sk-alpha")
    )
    assert status == 400
    assert_openai_error(body, "invalid_json", "invalid_request_error")
    status, body, _ = await raw_post(proxy.v1 + "/chat/completions", b"[1, 2]", auth("sk-alpha"))
    assert status == 400
    assert_openai_error(body, "invalid_json", "invalid_request_error")  # JSON, but not an object
    no_key_leaked(proxy, caplog, text)


async def test_missing_model_is_400(
    proxy: Proxy, async_openai: MakeAsync, caplog: pytest.LogCaptureFixture
) -> None:
    status, body, _ = await raw_post(proxy.v1 + "/chat/completions", b'{"messages": []}', auth("sk-alpha"))
    assert status == 400
    assert assert_openai_error(body, "missing_model")["param"] == "model"
    with pytest.raises(openai.BadRequestError) as info:
        await async_openai(proxy).chat.completions.create(model="", messages=MESSAGES)
    assert info.value.status_code == 400
    assert info.value.code == "missing_model"
    no_key_leaked(proxy, caplog, info.value.response.text)


async def test_unknown_key_and_no_key_are_401(
    proxy: Proxy, async_openai: MakeAsync, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(openai.AuthenticationError) as info:
        await async_openai(proxy, "sk-wrong").chat.completions.create(model="mock-chat", messages=MESSAGES)
    assert info.value.status_code == 401
    assert info.value.code == "invalid_api_key"
    assert "sk-wrong" not in info.value.response.text  # the client's secret is not echoed either
    with pytest.raises(openai.AuthenticationError) as empty:
        await async_openai(proxy, "unused").chat.completions.create(
            model="mock-chat", messages=MESSAGES, extra_headers={"Authorization": openai.omit}
        )
    assert "no API key" in empty.value.message
    status, body, text = await raw_post(proxy.v1 + "/chat/completions", b'{"model": "mock-chat"}', {})
    assert status == 401
    assert_openai_error(body, "invalid_api_key")
    no_key_leaked(proxy, caplog, info.value.response.text, text)


async def test_no_route_is_404_and_lists_the_tenants_models(
    proxy: Proxy, async_openai: MakeAsync, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        await async_openai(proxy, "sk-beta").chat.completions.create(model="gpt-9", messages=MESSAGES)
    assert info.value.status_code == 404
    assert info.value.code == "model_not_found"
    assert info.value.param == "model"
    assert "- no route for model 'gpt-9' on /v1/chat/completions for tenant 'beta'." in info.value.message
    assert "mock-chat" in info.value.message
    assert "mock-embed" not in info.value.message  # beta's allow-list excludes it
    with pytest.raises(openai.NotFoundError) as no_model:  # a path no route takes, and no model to name
        await async_openai(proxy, "sk-beta").get("/nowhere/at/all", cast_to=object)
    assert "- no route for /v1/nowhere/at/all for tenant 'beta'." in no_model.value.message
    # A tenant-restricted route is invisible to other tenants.
    with pytest.raises(openai.NotFoundError):
        await async_openai(proxy, "sk-alpha").chat.completions.create(model="gamma-chat", messages=MESSAGES)
    no_key_leaked(proxy, caplog, info.value.response.text)


async def test_body_over_max_body_size_is_413(
    proxy: Proxy, async_openai: MakeAsync, caplog: pytest.LogCaptureFixture
) -> None:
    big = [{"role": "user", "content": "x" * 5000}]  # policy limit is 4KiB
    with pytest.raises(openai.APIStatusError) as info:
        await async_openai(proxy).chat.completions.create(model="mock-chat", messages=big)
    assert info.value.status_code == 413
    assert info.value.code == "request_too_large"
    assert "4096" in info.value.message

    async def chunked() -> Any:  # no Content-Length: the limit is enforced while reading
        for _ in range(10):
            yield b" " * 1000

    async with aiohttp.ClientSession() as http:
        async with http.post(
            proxy.v1 + "/chat/completions", data=chunked(), headers=auth("sk-alpha")
        ) as resp:
            assert resp.status == 413
            assert_openai_error(await resp.json(), "request_too_large")
    no_key_leaked(proxy, caplog, info.value.response.text)


async def test_unreachable_upstream_is_502(
    proxy: Proxy, async_openai: MakeAsync, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(openai.InternalServerError) as info:
        await async_openai(proxy).chat.completions.create(model="dead-chat", messages=MESSAGES)
    assert info.value.status_code == 502
    assert info.value.code == "upstream_unreachable"
    assert "dead" in info.value.message
    assert proxy.access_lines()[-1]["attempts"][0]["error"] == "upstream_unreachable"
    no_key_leaked(proxy, caplog, info.value.response.text, str(info.value.response.headers))


async def test_upstream_stall_past_first_token_is_504(
    proxy: Proxy, async_openai: MakeAsync, caplog: pytest.LogCaptureFixture
) -> None:
    client = async_openai(proxy)
    with pytest.raises(openai.InternalServerError) as info:
        await client.chat.completions.create(
            model="slow-chat", messages=MESSAGES, extra_headers={"x-mock-stall-ms": "5000"}
        )
    assert info.value.status_code == 504  # the proxy cut the 5 s stall: the mock would have answered 200
    assert info.value.code == "upstream_timeout"
    assert "first_token" in info.value.message
    # The same stall on a stream request fails before any byte went out: a plain 504 too.
    with pytest.raises(openai.InternalServerError) as streamed:
        await client.chat.completions.create(
            model="slow-chat", messages=MESSAGES, stream=True, extra_headers={"x-mock-stall-ms": "5000"}
        )
    assert streamed.value.status_code == 504
    no_key_leaked(proxy, caplog, info.value.response.text)


async def test_stream_without_a_first_event_ends_with_an_error_event(
    proxy: Proxy, async_openai: MakeAsync
) -> None:
    # Headers arrive at once but the first event takes longer than first_token: the SDK must raise.
    stream = await async_openai(proxy).chat.completions.create(
        model="slow-chat", messages=MESSAGES, stream=True, extra_headers={"x-mock-ttft-ms": "5000"}
    )
    with pytest.raises(openai.APIError) as info:
        async for _ in stream:
            pass
    assert "first_token" in info.value.message  # cut by the proxy, not ended by the 5 s upstream
    assert proxy.access_lines()[-1]["error"] == "upstream_timeout"


async def test_stream_events_further_apart_than_first_token_are_fine_within_idle(
    start_proxy: StartProxy, async_openai: MakeAsync
) -> None:
    # first_token bounds the wait for the first event only; between events the idle limit applies.
    proxy = await start_proxy(
        """
        upstreams:
          mock: {provider: mock, mock: {output_tokens: 1}}
        tenants:
          t: {keys: [sk-t]}
        routes:
          - name: r
            upstream: mock
            timeouts: {first_token: 200ms, idle: 5s}
        """
    )
    stream = await async_openai(proxy, "sk-t").chat.completions.create(
        model="m", messages=MESSAGES, stream=True, extra_headers={"x-mock-token-delay-ms": "350"}
    )
    chunks = [c async for c in stream]
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


async def test_stream_idle_limit_ends_the_stream_with_an_error_event(
    start_proxy: StartProxy, async_openai: MakeAsync
) -> None:
    proxy = await start_proxy(
        """
        upstreams:
          mock: {provider: mock, mock: {output_tokens: 4}}
        tenants:
          t: {keys: [sk-t]}
        routes:
          - name: r
            upstream: mock
            timeouts: {first_token: 2s, idle: 300ms}
        """
    )
    stream = await async_openai(proxy, "sk-t").chat.completions.create(
        model="m", messages=MESSAGES, stream=True, extra_headers={"x-mock-token-delay-ms": "3000"}
    )
    seen = 0
    with pytest.raises(openai.APIError) as info:
        async for _ in stream:
            seen += 1
    assert seen == 1  # the first event came at once; the second never within idle
    assert "idle" in info.value.message


async def test_upstream_429_is_relayed_unchanged(
    proxy: Proxy, async_openai: MakeAsync, caplog: pytest.LogCaptureFixture
) -> None:
    fault = {"x-mock-status": "429", "x-mock-retry-after": "7"}
    with pytest.raises(openai.RateLimitError) as info:
        await async_openai(proxy).chat.completions.create(
            model="mock-chat", messages=MESSAGES, extra_headers=fault
        )
    response = info.value.response
    assert response.status_code == 429
    assert response.headers["retry-after"] == "7"
    assert response.headers["retry-after-ms"] == "7000"
    # Byte-for-byte what the upstream said: ask the mock directly for the same fault.
    mock_url = proxy.state.clients.mock_url("mock")
    assert mock_url is not None
    async with aiohttp.ClientSession() as http:
        body = json.dumps({"model": "mock-chat", "messages": MESSAGES})
        async with http.post(mock_url + "/chat/completions", data=body, headers=fault) as direct:
            assert direct.status == 429
            assert response.content == await direct.read()
    assert proxy.access_lines()[-1]["status"] == 429
    no_key_leaked(proxy, caplog, response.text)


async def test_sdk_retries_a_relayed_503_and_honours_retry_after(
    proxy: Proxy, async_openai: MakeAsync
) -> None:
    client = async_openai(proxy, max_retries=2)
    with pytest.raises(openai.InternalServerError) as info:
        await client.chat.completions.create(
            model="mock-chat",
            messages=MESSAGES,
            extra_headers={"x-mock-status": "503", "x-mock-retry-after": "0.05"},
        )
    assert info.value.status_code == 503
    # The relayed hint is what makes the SDK wait 50 ms instead of its own backoff.
    assert info.value.response.headers["retry-after-ms"] == "50"
    statuses = [line["status"] for line in proxy.access_lines()]
    assert statuses == [503, 503, 503]  # one attempt plus two SDK retries, each seen by the proxy


async def test_mid_stream_drop_raises_in_the_sdk(
    proxy: Proxy, async_openai: MakeAsync, sync_openai: MakeSync, caplog: pytest.LogCaptureFixture
) -> None:
    stream = await async_openai(proxy).chat.completions.create(
        model="mock-chat", messages=MESSAGES, stream=True, extra_headers={"x-mock-drop-after": "3"}
    )
    seen = []
    with pytest.raises(openai.APIError) as info:
        async for chunk in stream:
            seen.append(chunk)
    assert len(seen) == 3  # what was sent before the drop arrived, then an error, not a silent end
    assert not isinstance(info.value, openai.APIStatusError)
    assert proxy.access_lines()[-1]["error"] == "upstream_unreachable"

    client = sync_openai(proxy)

    def run_sync() -> int:
        count = 0
        with client.chat.completions.create(
            model="mock-chat", messages=MESSAGES, stream=True, extra_headers={"x-mock-drop-after": "2"}
        ) as sync_stream:
            for _ in sync_stream:
                count += 1
        return count

    with pytest.raises(openai.APIError):
        await asyncio.to_thread(run_sync)
    no_key_leaked(proxy, caplog, info.value.message)


async def test_non_stream_drop_is_502(proxy: Proxy, async_openai: MakeAsync) -> None:
    with pytest.raises(openai.InternalServerError) as info:
        await async_openai(proxy).chat.completions.create(
            model="mock-chat", messages=MESSAGES, extra_headers={"x-mock-drop-after": "0"}
        )
    assert info.value.status_code == 502


# --- health and metrics -------------------------------------------------------------------------------


async def test_healthz_and_readyz(proxy: Proxy) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(proxy.url + "/healthz") as resp:
            assert resp.status == 200
            assert (await resp.json())["status"] == "ok"
        async with http.get(proxy.url + "/readyz") as resp:
            body = await resp.json()
            assert resp.status == 200
            assert body["ready"] is True and body["draining"] is False
            assert body["policy"] == proxy.state.plans.current.digest[:12]
        proxy.state.draining = True
        async with http.get(proxy.url + "/readyz") as resp:
            assert resp.status == 503
            assert (await resp.json())["draining"] is True
        async with http.get(proxy.url + "/healthz") as resp:
            assert resp.status == 200  # liveness never follows readiness


def requests_key(
    route: str, tenant: str, upstream: str, status: str, outcome: str
) -> tuple[str, tuple[tuple[str, str], ...]]:
    labels = {"route": route, "tenant": tenant, "upstream": upstream, "status": status, "outcome": outcome}
    return ("signalbox_requests_total", tuple(sorted(labels.items())))


async def test_metrics_count_requests_and_show_in_flight(proxy: Proxy, async_openai: MakeAsync) -> None:
    client = async_openai(proxy)
    for _ in range(2):
        await client.chat.completions.create(model="mock-chat", messages=MESSAGES)
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="nope", messages=MESSAGES)
    with pytest.raises(openai.AuthenticationError):
        await async_openai(proxy, "sk-bad").chat.completions.create(model="mock-chat", messages=MESSAGES)
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(
            model="mock-chat", messages=MESSAGES, extra_headers={"x-mock-status": "429"}
        )

    # One stream held open while we scrape: the in-flight gauge sees it.
    stream = await client.chat.completions.create(
        model="mock-chat", messages=MESSAGES, stream=True, extra_headers={"x-mock-token-delay-ms": "100"}
    )
    first = await stream.__anext__()
    assert first.choices
    during = await scrape(proxy)
    assert during[("signalbox_in_flight_requests", ())] == 1.0
    await stream.close()
    for _ in range(100):  # the proxy notices the client left and finishes its bookkeeping
        if proxy.state.in_flight == 0:
            break
        await asyncio.sleep(0.02)

    after = await scrape(proxy)
    # The abandoned stream had answered 200, but the client left: 499 and cancelled, not a success.
    assert after[requests_key("chat", "alpha", "mock", "200", "ok")] == 2.0
    assert after[requests_key("chat", "alpha", "mock", "499", "cancelled")] == 1.0
    assert requests_key("chat", "alpha", "mock", "200", "cancelled") not in after
    assert after[("signalbox_client_disconnects_total", (("route", "chat"),))] == 1.0
    assert after[requests_key("chat", "alpha", "mock", "429", "upstream_error")] == 1.0  # the upstream's 429
    assert after[requests_key("", "alpha", "", "404", "rejected")] == 1.0
    assert after[requests_key("", "", "", "401", "rejected")] == 1.0
    assert after[("signalbox_in_flight_requests", ())] == 0.0
    assert (
        after[("signalbox_request_duration_seconds_count", (("route", "chat"),))] == 4.0
    )  # 2 + 429 + stream
    assert ("signalbox_request_duration_seconds_bucket", (("le", "+Inf"), ("route", "chat"))) in after
    assert after[("signalbox_upstream_ttfb_seconds_count", (("upstream", "mock"),))] == 4.0
    assert after[("signalbox_proxy_errors_total", (("reason", "model_not_found"),))] == 1.0
    assert after[("signalbox_proxy_errors_total", (("reason", "invalid_api_key"),))] == 1.0
    digest = proxy.state.plans.current.digest[:12]
    assert after[("signalbox_policy_info", (("digest", digest),))] == 1.0
