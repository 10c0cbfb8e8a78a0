"""Splitting end to end with the openai SDK: an embeddings request above its upstream's `batch_limits` becomes
several upstream calls (counted at the upstream), merged back in order with usage summed; a failing part
stops the rest; each part is retried like any call; batching never merges past the limits.

The upstream here enforces its limits the way a vendor does (400 above them), so an unsplit request fails;
its vectors come from the mock's deterministic `embeddings_response`, a function of each input alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import openai
import orjson
import pytest
from aiohttp import web
from conftest import Proxy
from kit import Loopback
from kit.metrics import scrape, total

from proxy.batching.flush import BATCH_SIZE_HEADER
from proxy.batching.keys import text_tokens
from proxy.batching.split import PARTS_HEADER
from proxy.mock import embeddings as mc

pytestmark = pytest.mark.timeout(90)
StartProxy = Callable[..., Awaitable[Proxy]]
MakeClient = Callable[..., openai.AsyncOpenAI]


@dataclass
class LimitedUpstream:
    """An OpenAI-compatible embeddings server that refuses requests above its limits with 400."""

    max_inputs: int = 2048
    max_tokens: int = 10**9
    url: str = ""
    inputs: list[list[Any]] = field(default_factory=list)
    fail_first: int = 0
    """Answer 503 to this many calls first."""
    delay: float = 0.0
    in_flight: int = 0
    peak: int = 0
    cancelled: int = 0
    usage: list[int] = field(default_factory=list)
    """prompt_tokens of each answer given."""

    async def handle(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        items = body["input"] if isinstance(body["input"], list) else [body["input"]]
        self.inputs.append(items)
        if self.fail_first:
            self.fail_first -= 1
            return web.json_response({"error": {"message": "overloaded", "type": "server_error"}}, status=503)
        if len(items) > self.max_inputs or sum(text_tokens(i) for i in items) > self.max_tokens:
            error = {"message": f"too many inputs or tokens in one request ({len(items)})",
                     "type": "invalid_request_error", "param": "input", "code": None}
            return web.json_response({"error": error}, status=400)
        if any("BAD" in i for i in items):
            error = {"message": "input[0] is not allowed", "type": "invalid_request_error", "param": "input",
                     "code": "bad_input"}
            return web.json_response({"error": error}, status=400)
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            if self.delay or any(i.startswith("SLOW") for i in items):
                await asyncio.sleep(self.delay or 5.0)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.in_flight -= 1
        answer = mc.embeddings_response(body, 8)
        self.usage.append(answer["usage"]["prompt_tokens"])
        return web.json_response(answer, headers={"x-request-id": f"up-{len(self.inputs)}"})


@pytest.fixture
async def limited(loopback: Loopback) -> LimitedUpstream:
    upstream = LimitedUpstream()
    app = web.Application()
    app.router.add_post("/v1/embeddings", upstream.handle)
    upstream.url = await loopback.serve(app, handler_cancellation=True)
    return upstream


def policy(url: str, limits: str, batch: str = "", retry: str = "{attempts: 1}") -> str:
    return f"""
    identify: {{mode: api_key}}
    upstreams:
      up: {{provider: openai, base_url: "{url}/v1", api_key: sk-up, batch_limits: {limits}}}
    tenants:
      alpha: {{keys: [sk-alpha]}}
    routes:
      - name: emb
        match: {{path: /v1/embeddings}}
        upstream: up
        retry: {retry}
        {"batch: " + batch if batch else ""}
    """


def expected(texts: list[str]) -> list[list[float]]:
    """The vectors the upstream gives each input (a function of the input alone)."""
    out: list[list[float]] = []
    for start in range(0, len(texts), 1000):
        body = {"model": "m", "input": texts[start : start + 1000], "encoding_format": "float"}
        out.extend(d["embedding"] for d in mc.embeddings_response(body, 8)["data"])
    return out


async def test_five_thousand_inputs_make_three_upstream_calls_and_come_back_in_order(
    start_proxy: StartProxy, limited: LimitedUpstream, async_openai: MakeClient
) -> None:
    proxy = await start_proxy(policy(limited.url, "{max_inputs: 2048}"))
    client = async_openai(proxy)
    texts = [f"document {i}" for i in range(5000)]
    raw = await client.embeddings.with_raw_response.create(model="text-embedding-3-small", input=texts)
    got = raw.parse()  # the SDK asked for base64 and decoded it
    assert [len(i) for i in limited.inputs] == [2048, 2048, 904]
    assert [x for part in limited.inputs for x in part] == texts  # contiguous, in order, each input once
    assert [d.index for d in got.data] == list(range(5000))
    assert [d.embedding for d in got.data] == expected(texts)
    assert got.usage.prompt_tokens == got.usage.total_tokens == sum(limited.usage) > 0  # summed over the parts
    assert raw.headers[PARTS_HEADER] == "3" and raw.headers[BATCH_SIZE_HEADER] == "1"
    lines = proxy.access_lines()
    assert len(lines) == 1 and lines[0]["status"] == 200 and len(lines[0]["attempts"]) == 3
    found = await scrape(proxy)
    assert total(found, "signalbox_split_requests_total", route="emb") == 1
    assert total(found, "signalbox_split_parts_total", route="emb") == 3
    assert total(found, "signalbox_upstream_requests_total", deployment="up") == 3  # each part is counted


async def test_a_request_within_the_limits_is_sent_whole_and_untouched(
    start_proxy: StartProxy, limited: LimitedUpstream, async_openai: MakeClient
) -> None:
    proxy = await start_proxy(policy(limited.url, "{max_inputs: 2048}"))
    raw = await async_openai(proxy).embeddings.with_raw_response.create(model="m", input=["a"] * 2048)
    assert [len(i) for i in limited.inputs] == [2048]
    assert PARTS_HEADER not in raw.headers


async def test_max_tokens_splits_by_the_token_estimate(
    start_proxy: StartProxy, limited: LimitedUpstream, async_openai: MakeClient
) -> None:
    limited.max_tokens = 100
    proxy = await start_proxy(policy(limited.url, "{max_tokens: 100}"))
    texts = [f"{i:02d}" + "x" * 38 for i in range(25)]  # 40 bytes: 10 estimated tokens each
    got = await async_openai(proxy).embeddings.create(model="m", input=texts, encoding_format="float")
    assert [len(i) for i in limited.inputs] == [10, 10, 5]
    assert [d.embedding for d in got.data] == expected(texts)
    assert got.usage.prompt_tokens == sum(limited.usage) and len(limited.usage) == 3


async def test_a_failing_part_stops_the_rest_and_the_caller_gets_its_error(
    start_proxy: StartProxy, limited: LimitedUpstream, async_openai: MakeClient
) -> None:
    limited.max_inputs = 10
    proxy = await start_proxy(policy(limited.url, "{max_inputs: 10, concurrency: 1}"))
    texts = [f"t{i}" for i in range(50)]
    texts[15] = "BAD input"  # in the second of five parts
    with pytest.raises(openai.BadRequestError) as info:
        await async_openai(proxy, max_retries=0).embeddings.create(model="m", input=texts)
    assert [len(i) for i in limited.inputs] == [10, 10]  # parts 3 to 5 were never sent
    assert total(await scrape(proxy), "signalbox_split_parts_total", route="emb") == 2
    assert info.value.status_code == 400 and info.value.code == "bad_input"
    assert info.value.response.headers[PARTS_HEADER] == "5"
    assert proxy.access_lines()[-1]["status"] == 400


async def test_a_failing_part_cancels_the_part_in_flight(
    start_proxy: StartProxy, limited: LimitedUpstream, async_openai: MakeClient
) -> None:
    limited.max_inputs = 10
    proxy = await start_proxy(policy(limited.url, "{max_inputs: 10, concurrency: 2}"))
    texts = [f"t{i}" for i in range(40)]
    texts[0] = "SLOW first part"  # part 1 sleeps at the upstream while part 2 fails
    texts[12] = "BAD input"
    with pytest.raises(openai.BadRequestError):
        await async_openai(proxy, max_retries=0).embeddings.create(model="m", input=texts)
    assert len(limited.inputs) == 2  # parts 3 and 4 never went
    for _ in range(200):  # the cancelled part's connection closes just after the answer
        if limited.cancelled:
            break
        await asyncio.sleep(0.01)
    assert limited.cancelled == 1


async def test_each_part_is_retried_like_any_upstream_call(
    start_proxy: StartProxy, limited: LimitedUpstream, async_openai: MakeClient
) -> None:
    limited.max_inputs, limited.fail_first = 10, 1
    proxy = await start_proxy(policy(limited.url, "{max_inputs: 10, concurrency: 1}",
                                     retry="{attempts: 3, backoff: {base: 10ms, max: 20ms}}"))
    texts = [f"t{i}" for i in range(30)]
    got = await async_openai(proxy, max_retries=0).embeddings.create(model="m", input=texts, encoding_format="float")
    assert [len(i) for i in limited.inputs] == [10, 10, 10, 10]  # the first part went twice
    assert [d.embedding for d in got.data] == expected(texts)


async def test_parts_go_out_at_most_concurrency_at_a_time(
    start_proxy: StartProxy, limited: LimitedUpstream, async_openai: MakeClient
) -> None:
    limited.max_inputs, limited.delay = 4, 0.3
    proxy = await start_proxy(policy(limited.url, "{max_inputs: 4, concurrency: 2}"))
    got = await async_openai(proxy).embeddings.create(model="m", input=[f"t{i}" for i in range(24)])
    assert len(limited.inputs) == 6 and len(got.data) == 24
    assert limited.peak == 2


async def test_batching_never_merges_past_the_upstream_limits(
    start_proxy: StartProxy, limited: LimitedUpstream, async_openai: MakeClient
) -> None:
    limited.max_inputs = 8
    proxy = await start_proxy(policy(limited.url, "{max_inputs: 8}", batch="{max_items: 256, max_wait: 300ms}"))
    client = async_openai(proxy)
    callers = [[f"c{c}-{i}" for i in range(3)] for c in range(12)]
    got = await asyncio.gather(*(client.embeddings.create(model="m", input=t, encoding_format="float")
                                 for t in callers))
    assert limited.inputs and all(len(i) <= 8 for i in limited.inputs)
    assert sum(len(i) for i in limited.inputs) == 36 and len(limited.inputs) < 12  # merged, within the limit
    for texts, answer in zip(callers, got, strict=True):
        assert [d.embedding for d in answer.data] == expected(texts)
    # one caller alone above the limit on the batching route: split
    limited.inputs.clear()
    big = [f"big-{i}" for i in range(20)]
    answer = await client.embeddings.create(model="m", input=big, encoding_format="float")
    assert [len(i) for i in limited.inputs] == [8, 8, 4]
    assert [d.embedding for d in answer.data] == expected(big)


async def test_the_held_answers_are_bounded_by_max_buffered_response(
    start_proxy: StartProxy, limited: LimitedUpstream, async_openai: MakeClient
) -> None:
    limited.max_inputs = 10
    text = "\n    max_buffered_response: 5000" + policy(limited.url, "{max_inputs: 10, concurrency: 1}")
    proxy = await start_proxy(text)
    with pytest.raises(openai.InternalServerError) as info:
        await async_openai(proxy, max_retries=0).embeddings.create(
            model="m", input=[f"t{i}" for i in range(50)], encoding_format="float")
    assert info.value.status_code == 502 and "max_buffered_response" in info.value.message
    assert 2 <= len(limited.inputs) < 5  # stopped once the answers held passed the bound


async def test_the_built_in_mock_upstream_gets_a_request_split_to_its_limit(
    start_proxy: StartProxy, async_openai: MakeClient
) -> None:
    """The mock refuses more than 2,048 inputs, as OpenAI does; declared limits make it answer 5,000."""
    proxy = await start_proxy("""
    identify: {mode: api_key}
    upstreams:
      mock: {provider: mock, batch_limits: {max_inputs: 2048, concurrency: 3}}
    tenants:
      alpha: {keys: [sk-alpha]}
    routes:
      - {name: emb, match: {path: /v1/embeddings}, upstream: mock}
    """)
    texts = [f"mock input {i}" for i in range(5000)]
    got = await async_openai(proxy).embeddings.create(model="text-embedding-3-small", input=texts)
    assert [d.index for d in got.data] == list(range(5000))
    assert [d.embedding for d in got.data] == expected(texts)
    found = await scrape(proxy)
    assert total(found, "signalbox_upstream_requests_total", status="200") == 3
