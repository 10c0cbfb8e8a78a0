"""Non-streamed upstream answers larger than `max_buffered_response`: a pass-through success reaches the
client byte for byte while the proxy holds about the cap, not the body; one that must be translated or
normalised is a clean 502 in the client's protocol."""

from __future__ import annotations

import hashlib
import tracemalloc
from collections.abc import Awaitable, Callable

import aiohttp
import orjson
import pytest
from aiohttp import web
from conftest import Proxy
from kit import Loopback, build_policy, route_spec, upstream_spec

pytestmark = pytest.mark.timeout(60)

CAP = 1024 * 1024
SIZE = 16 * 1024 * 1024
BLOCK = bytes(range(256)) * 256  # 64 KiB
EXPECTED = hashlib.sha256(BLOCK * (SIZE // len(BLOCK))).hexdigest()


@pytest.fixture
async def big(loopback: Loopback) -> str:
    """An OpenAI-compatible upstream whose answer is SIZE bytes, written 64 KiB at a time (so that it holds
    no copy of its own): `model` says how: `length` (Content-Length), `chunked`, or `error` (a 500)."""

    async def answer(request: web.Request) -> web.StreamResponse:
        model = (await request.json())["model"]
        headers = {"Content-Type": "application/json"}
        if model != "chunked":
            headers["Content-Length"] = str(SIZE)
        response = web.StreamResponse(status=500 if model == "error" else 200, headers=headers)
        await response.prepare(request)
        for _ in range(SIZE // len(BLOCK)):
            await response.write(BLOCK)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    return await loopback.serve(app)


def policy(url: str) -> str:
    return build_policy(
        {"big": upstream_spec(url)},
        [route_spec("all", "big", model="*")],
        tenants={"team": {"keys": ["sk-alpha"]}},
        version=1,
        max_buffered_response="1MiB",
    )


async def test_a_pass_through_answer_over_the_cap_streams_through_with_the_buffer_bounded(
    start_proxy: Callable[..., Awaitable[Proxy]], big: str
) -> None:
    proxy = await start_proxy(policy(big))
    async with aiohttp.ClientSession() as session:
        for model in ("length", "chunked"):
            digest = hashlib.sha256()
            received = 0
            tracemalloc.start()
            try:
                async with session.post(
                    proxy.v1 + "/chat/completions", json={"model": model, "messages": []},
                    headers={"Authorization": "Bearer sk-alpha"},
                ) as response:
                    assert response.status == 200
                    assert response.content_length == (SIZE if model == "length" else None)
                    async for chunk in response.content.iter_chunked(64 * 1024):
                        digest.update(chunk)
                        received += len(chunk)
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            assert (received, digest.hexdigest()) == (SIZE, EXPECTED), model
            # Everything in this process (proxy, upstream, client) stayed near the 1 MiB cap, far from 16 MiB.
            assert peak < 6 * 1024 * 1024, (model, peak)
    lines = proxy.access_lines()
    assert [(line["status"], line["bytes"]) for line in lines] == [(200, SIZE), (200, SIZE)]


async def test_an_answer_over_the_cap_that_must_be_transformed_is_a_clean_502(
    start_proxy: Callable[..., Awaitable[Proxy]], big: str
) -> None:
    proxy = await start_proxy(policy(big))
    async with aiohttp.ClientSession() as session:
        # An error body is normalised (and redacted) before it is relayed: over the cap, in OpenAI's shape.
        for model in ("error", "chunked"):
            url, body, headers = proxy.v1 + "/chat/completions", {"model": model, "messages": []}, {
                "Authorization": "Bearer sk-alpha"
            }
            if model == "chunked":  # an Anthropic client: the answer must be translated, in Anthropic's shape
                url = proxy.v1 + "/messages"
                body = {"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
                headers = {"x-api-key": "sk-alpha", "anthropic-version": "2023-06-01"}
            async with session.post(url, json=body, headers=headers) as response:
                assert response.status == 502, model
                error = orjson.loads(await response.read())
            message = error["error"]["message"]
            assert "max_buffered_response" in message and "1048576" in message
            if model == "chunked":
                assert error["type"] == "error" and error["error"]["type"] == "api_error"
            else:
                assert error["error"]["code"] == "upstream_bad_response"
    assert [line["status"] for line in proxy.access_lines()] == [502, 502]
