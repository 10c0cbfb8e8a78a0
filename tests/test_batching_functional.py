"""Batching end to end with the openai SDK: concurrent embedding calls share upstream calls and every caller
gets exactly the vectors a non-batching route gives; what changes the answer is never merged; a poisoned
input fails only its caller; callers that leave are dropped; a lone call waits at most max_wait.

The upstream here is a small OpenAI-compatible embeddings server with deterministic vectors (the mock's
`embeddings_response`), which records every body, answers 400 like OpenAI to an input containing
POISON, sleeps on an input starting with SLOW, and can be scripted to answer a status to every call.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web
from conftest import Proxy
from kit import Loopback

from proxy.batching.flush import BATCH_SIZE_HEADER
from proxy.mock import embeddings as mc

pytestmark = pytest.mark.timeout(60)
StartProxy = Callable[..., Awaitable[Proxy]]
MakeClient = Callable[..., openai.AsyncOpenAI]
OPENAI_INVALID_INPUT = {
    "error": {
        "message": "'$.input' is invalid. Please check the API reference: https://platform.openai.com/docs/api-reference.",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }
}


@dataclass
class EmbedUpstream:
    url: str = ""
    bodies: list[dict[str, Any]] = field(default_factory=list)
    raw: list[bytes] = field(default_factory=list)
    usage: list[int] = field(default_factory=list)
    status: int | None = None
    cancelled: int = 0

    @property
    def calls(self) -> int:
        return len(self.bodies)

    def inputs(self) -> list[list[Any]]:
        return [b["input"] if isinstance(b["input"], list) else [b["input"]] for b in self.bodies]

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        body = orjson.loads(raw)
        self.raw.append(raw)
        self.bodies.append(body)
        if self.status is not None:
            error = {"error": {"message": "scripted", "type": "server_error"}}
            return web.json_response(error, status=self.status)
        items = body["input"] if isinstance(body["input"], list) else [body["input"]]
        if any(isinstance(item, str) and "POISON" in item for item in items):
            return web.json_response(OPENAI_INVALID_INPUT, status=400)
        if any(isinstance(item, str) and item.startswith("SLOW") for item in items):
            try:
                await asyncio.sleep(0.6)
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        answer = mc.embeddings_response(body, 8)
        self.usage.append(answer["usage"]["prompt_tokens"])
        return web.json_response(answer, headers={"x-request-id": f"up-{self.calls}"})


@pytest.fixture
async def embed_up(loopback: Loopback) -> EmbedUpstream:
    upstream = EmbedUpstream()
    app = web.Application()
    app.router.add_post("/v1/embeddings", upstream.handle)
    upstream.url = await loopback.serve(app, handler_cancellation=True)
    return upstream


def policy(url: str, batch: str = "{max_wait: 300ms}", extra_routes: str = "", queues: str = "{}") -> str:
    return f"""
    identify: {{mode: api_key}}
    upstreams:
      up: {{provider: openai, base_url: "{url}/v1", api_key: sk-up}}
    tenants:
      alpha: {{keys: [sk-alpha]}}
      beta: {{keys: [sk-beta]}}
    queues: {queues}
    routes:
      - name: batched
        match: {{path: /v1/embeddings, model: emb-batched}}
        upstream: up
        model: text-embedding-3-small
        batch: {batch}
      - name: plain
        match: {{path: /v1/embeddings, model: emb-plain}}
        upstream: up
        model: text-embedding-3-small
    {extra_routes}
    """


async def raw_embed(client: openai.AsyncOpenAI, **kwargs: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """One call through the SDK, returning the JSON the proxy sent and its headers."""
    response = await client.embeddings.with_raw_response.create(**kwargs)
    return orjson.loads(response.content), dict(response.headers)


async def test_fifty_concurrent_calls_share_at_most_three_upstream_calls_with_identical_vectors(
    start_proxy: StartProxy, embed_up: EmbedUpstream, async_openai: MakeClient
) -> None:
    proxy = await start_proxy(policy(embed_up.url))
    client = async_openai(proxy)
    texts = [f"document number {i} " + "words " * (i % 7) for i in range(50)]
    batched = await asyncio.gather(*(client.embeddings.create(model="emb-batched", input=t) for t in texts))
    batched_calls = embed_up.calls
    assert 1 <= batched_calls <= 3
    assert sorted(item for body in embed_up.inputs() for item in body) == sorted(texts)
    plain = await asyncio.gather(*(client.embeddings.create(model="emb-plain", input=t) for t in texts))
    assert embed_up.calls == batched_calls + 50
    for got, want in zip(batched, plain, strict=True):
        assert len(got.data) == 1 and got.data[0].index == 0
        assert got.data[0].embedding == want.data[0].embedding  # decoded from base64 by the SDK
        assert got.model == want.model == "text-embedding-3-small"
    # usage is apportioned: the callers' parts add up to what the upstream counted for the merged calls
    assert sum(r.usage.prompt_tokens for r in batched) == sum(embed_up.usage[:batched_calls])
    assert all(r.usage.total_tokens == r.usage.prompt_tokens >= 1 for r in batched)
    lines = [line for line in proxy.access_lines() if line["route"] == "batched"]
    assert len(lines) == 50 and all(line["status"] == 200 and line["attempts"] for line in lines)
    async with aiohttp.ClientSession() as http, http.get(proxy.url + "/metrics") as response:
        metrics = await response.text()
    assert 'signalbox_batch_flushes_total{reason="timeout",route="batched"}' in metrics
    assert f'signalbox_batch_upstream_calls_saved_total{{route="batched"}} {50.0 - batched_calls}' in metrics
    assert 'signalbox_batch_callers_count{route="batched"}' in metrics
    # Upstream metrics count upstream calls: the merged calls once each, not once per caller.
    upstream_calls = sum(
        float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
        if line.startswith('signalbox_upstream_requests_total{deployment="up/text-embedding-3-small"')
    )
    assert upstream_calls == embed_up.calls == batched_calls + 50
    assert f'signalbox_upstream_ttfb_seconds_count{{upstream="up"}} {float(batched_calls + 50)}' in metrics


async def test_base64_and_float_payloads_round_trip_byte_for_byte(
    start_proxy: StartProxy, embed_up: EmbedUpstream, async_openai: MakeClient
) -> None:
    proxy = await start_proxy(policy(embed_up.url))
    client = async_openai(proxy)
    for fmt in ("base64", "float"):
        texts = [f"{fmt} text {i}" for i in range(6)]
        kw: dict[str, Any] = {"encoding_format": fmt}
        got = await asyncio.gather(*(raw_embed(client, model="emb-batched", input=t, **kw) for t in texts))
        want = await asyncio.gather(*(raw_embed(client, model="emb-plain", input=t, **kw) for t in texts))
        for (body, headers), (plain, _) in zip(got, want, strict=True):
            assert headers[BATCH_SIZE_HEADER] == "6"
            assert orjson.dumps(body["data"]) == orjson.dumps(plain["data"])
            assert isinstance(body["data"][0]["embedding"], str if fmt == "base64" else list)


async def test_every_input_form_is_merged_and_split_back_exactly(
    start_proxy: StartProxy, embed_up: EmbedUpstream, async_openai: MakeClient
) -> None:
    proxy = await start_proxy(policy(embed_up.url))
    client = async_openai(proxy)
    inputs: list[Any] = ["one string", ["two", "strings", "here"], "another", [11, 12, 13],
                         [[1, 2], [3], [4, 5]], [[99]], ["last"]]
    got = await asyncio.gather(*(client.embeddings.create(model="emb-batched", input=i) for i in inputs))
    # strings and token arrays never share a call: one upstream call per kind
    assert embed_up.calls == 2
    assert sorted(len(body) for body in embed_up.inputs()) == [5, 6]
    want = await asyncio.gather(*(client.embeddings.create(model="emb-plain", input=i) for i in inputs))
    for value, mine, plain in zip(inputs, got, want, strict=True):
        expected = 1 if isinstance(value, str) or isinstance(value[0], int) else len(value)
        assert [d.index for d in mine.data] == list(range(expected))
        assert [d.embedding for d in mine.data] == [d.embedding for d in plain.data]
    token_arrays = [r for value, r in zip(inputs, got, strict=True) if not isinstance(value, str)
                    and isinstance(value[0], (int, list))]
    assert [r.usage.prompt_tokens for r in token_arrays] == [3, 5, 1]  # token arrays: exact shares


async def test_calls_that_differ_in_dimensions_or_encoding_are_never_merged(
    start_proxy: StartProxy, embed_up: EmbedUpstream, async_openai: MakeClient
) -> None:
    proxy = await start_proxy(policy(embed_up.url))
    client = async_openai(proxy)
    combos = [(dims, fmt) for dims in (None, 4, 16) for fmt in ("base64", "float")]

    async def one(i: int) -> tuple[int | None, str, Any]:
        dims, fmt = combos[i % len(combos)]
        kw: dict[str, Any] = {"encoding_format": fmt} | ({"dimensions": dims} if dims else {})
        return dims, fmt, await client.embeddings.create(model="emb-batched", input=f"text {i}", **kw)

    results = await asyncio.gather(*(one(i) for i in range(24)))
    assert embed_up.calls == len(combos)  # one merged call per combination, four callers in each
    for body in embed_up.bodies:
        assert len(body["input"]) == 4
    seen = {(body.get("dimensions"), body["encoding_format"]) for body in embed_up.bodies}
    assert seen == set(combos)
    for dims, fmt, response in results:
        vector = response.data[0].embedding  # a format the caller chose explicitly is not decoded by the SDK
        size = len(base64.b64decode(vector)) // 4 if fmt == "base64" else len(vector)
        assert size == (dims or 8)


async def test_a_poisoned_input_fails_only_its_caller(
    start_proxy: StartProxy, embed_up: EmbedUpstream, async_openai: MakeClient
) -> None:
    proxy = await start_proxy(policy(embed_up.url))
    client = async_openai(proxy)
    texts = [f"clean text {i}" for i in range(12)]
    texts[7] = "this one is POISON"

    async def one(text: str) -> Any:
        try:
            return await client.embeddings.create(model="emb-batched", input=text)
        except openai.BadRequestError as exc:
            return exc

    got = await asyncio.gather(*(one(t) for t in texts))
    failed = [i for i, r in enumerate(got) if isinstance(r, openai.BadRequestError)]
    assert failed == [7]
    error = got[7]
    assert isinstance(error, openai.BadRequestError) and "'$.input' is invalid" in error.message
    assert error.response.headers[BATCH_SIZE_HEADER] == "1"  # the error came from a call of its own
    # the upstream saw the poisoned input alone last, after a few halvings (never 12 separate calls)
    assert ["this one is POISON"] in embed_up.inputs()
    assert embed_up.calls <= 1 + 2 * 4
    clean = sorted(item for body in embed_up.inputs() for item in body if "POISON" not in item)
    assert len(clean) >= 11
    plain = await asyncio.gather(*(client.embeddings.create(model="emb-plain", input=t) for t in texts[:7]))
    for i in range(7):
        assert got[i].data[0].embedding == plain[i].data[0].embedding


async def test_server_errors_go_to_every_caller_without_splitting_the_batch(
    start_proxy: StartProxy, embed_up: EmbedUpstream, async_openai: MakeClient
) -> None:
    proxy = await start_proxy(policy(embed_up.url))
    client = async_openai(proxy)
    embed_up.status = 503

    async def one(i: int) -> Any:
        try:
            return await client.embeddings.create(model="emb-batched", input=f"t{i}")
        except openai.APIStatusError as exc:
            return exc

    got = await asyncio.gather(*(one(i) for i in range(5)))
    assert all(isinstance(r, openai.InternalServerError) and r.status_code == 503 for r in got)
    assert all(r.response.headers[BATCH_SIZE_HEADER] == "5" for r in got)
    # dispatch may retry the whole batch; it is never split
    assert embed_up.calls >= 1 and all(len(body["input"]) == 5 for body in embed_up.bodies)


async def test_a_full_batch_goes_at_once_and_a_lone_call_waits_at_most_max_wait(
    start_proxy: StartProxy, embed_up: EmbedUpstream, async_openai: MakeClient
) -> None:
    lone = """
      - name: lone
        match: {path: /v1/embeddings, model: emb-lone}
        upstream: up
        batch: {max_wait: 300ms}
    """
    proxy = await start_proxy(policy(embed_up.url, batch="{max_items: 4, max_wait: 8s}", extra_routes=lone))
    client = async_openai(proxy)
    started = time.monotonic()
    await asyncio.gather(*(client.embeddings.create(model="emb-batched", input=f"t{i}") for i in range(8)))
    assert [len(body["input"]) for body in embed_up.bodies] == [4, 4]

    started = time.monotonic()
    body, headers = await raw_embed(client, model="emb-lone", input="all alone")
    elapsed = time.monotonic() - started
    assert elapsed >= 0.25  # held for max_wait, since no partner came
    assert headers[BATCH_SIZE_HEADER] == "1" and len(body["data"]) == 1
    sent = {"input": "all alone", "model": "emb-lone", "encoding_format": "base64"}
    assert orjson.loads(embed_up.raw[-1]) == sent  # a lone call goes as the client sent it


async def test_a_call_with_unknown_fields_is_sent_alone_as_sent(
    start_proxy: StartProxy, embed_up: EmbedUpstream, async_openai: MakeClient
) -> None:
    lone = """
      - name: exact
        match: {path: /v1/embeddings, model: emb-exact}
        upstream: up
        batch: {max_wait: 5s}
    """
    proxy = await start_proxy(policy(embed_up.url, extra_routes=lone))
    client = async_openai(proxy)
    got = await asyncio.gather(*(
        raw_embed(client, model="emb-exact", input=f"t{i}", extra_body={"truncate_prompt_tokens": 8})
        for i in range(3)
    ))
    assert embed_up.calls == 3
    assert all(len(body) == 1 for body in embed_up.inputs())
    assert all(b["truncate_prompt_tokens"] == 8 for b in embed_up.bodies)
    assert all(headers[BATCH_SIZE_HEADER] == "1" for _, headers in got)


async def test_tenants_share_calls_only_when_the_route_allows_it(
    start_proxy: StartProxy, embed_up: EmbedUpstream, async_openai: MakeClient
) -> None:
    shared = """
      - name: shared
        match: {path: /v1/embeddings, model: emb-shared}
        upstream: up
        batch: {max_wait: 300ms, cross_tenant: true}
    """
    proxy = await start_proxy(policy(embed_up.url, extra_routes=shared))
    alpha, beta = async_openai(proxy, key="sk-alpha"), async_openai(proxy, key="sk-beta")
    calls = [c.embeddings.create(model="emb-batched", input=f"{n}{i}") for i in range(3) for n, c in
             (("a", alpha), ("b", beta))]
    await asyncio.gather(*calls)
    assert sorted(sorted(b) for b in embed_up.inputs()) == [["a0", "a1", "a2"], ["b0", "b1", "b2"]]
    embed_up.bodies.clear()
    await asyncio.gather(*(c.embeddings.create(model="emb-shared", input=f"s{i}") for i, c in
                           enumerate([alpha, beta, alpha, beta])))
    assert embed_up.calls == 1 and len(embed_up.bodies[0]["input"]) == 4


async def test_each_caller_is_admitted_on_its_own_and_the_batch_takes_one_slot(
    start_proxy: StartProxy, embed_up: EmbedUpstream, async_openai: MakeClient
) -> None:
    limited = """
      - name: limited
        match: {path: /v1/embeddings, model: emb-limited}
        upstream: up
        queue: one
        limits: {per_tenant: {requests_per_minute: 3}}
        batch: {max_wait: 300ms}
    """
    proxy = await start_proxy(policy(embed_up.url, extra_routes=limited, queues="{one: {concurrency: 1}}"))
    client = async_openai(proxy)

    async def one(i: int) -> Any:
        try:
            return await client.embeddings.create(model="emb-limited", input=f"t{i}")
        except openai.RateLimitError as exc:
            return exc

    got = await asyncio.gather(*(one(i) for i in range(5)))
    assert sum(isinstance(r, openai.RateLimitError) for r in got) == 2
    assert embed_up.calls == 1 and len(embed_up.bodies[0]["input"]) == 3  # three admitted, one upstream call
    queue = proxy.state.scheduler.queues["one"]
    assert queue.admitted == 1 and queue.active == 0


async def post(http: aiohttp.ClientSession, proxy: Proxy, text: str) -> Any:
    body = {"model": "emb-batched", "input": text}
    headers = {"Authorization": "Bearer sk-alpha"}
    async with http.post(proxy.v1 + "/embeddings", json=body, headers=headers) as response:
        return response.status, await response.json(), response.headers


async def test_a_caller_that_leaves_before_the_flush_is_taken_out(
    start_proxy: StartProxy, embed_up: EmbedUpstream
) -> None:
    proxy = await start_proxy(policy(embed_up.url, batch="{max_wait: 800ms}"))
    async with aiohttp.ClientSession() as http:
        leaver = asyncio.ensure_future(post(http, proxy, "I will leave"))  # noqa: TID251 (test client)
        stayer = asyncio.ensure_future(post(http, proxy, "I stay"))  # noqa: TID251
        await asyncio.sleep(0.3)
        leaver.cancel()  # closes the connection: the proxy's handler is cancelled
        status, body, headers = await stayer
    assert status == 200 and headers[BATCH_SIZE_HEADER] == "1"
    assert embed_up.inputs() == [["I stay"]]  # the leaver's input never went upstream
    assert not proxy.state.batcher.groups
    await asyncio.sleep(0.05)
    gone = [line for line in proxy.access_lines() if line["status"] == 499]
    assert len(gone) == 1 and gone[0]["attempts"] == []


async def test_after_the_flush_a_leavers_share_is_dropped_and_a_flush_nobody_waits_for_is_cancelled(
    start_proxy: StartProxy, embed_up: EmbedUpstream
) -> None:
    proxy = await start_proxy(policy(embed_up.url, batch="{max_wait: 150ms}"))
    async with aiohttp.ClientSession() as http:
        leaver = asyncio.ensure_future(post(http, proxy, "SLOW leaver"))  # noqa: TID251
        stayer = asyncio.ensure_future(post(http, proxy, "stayer"))  # noqa: TID251
        await asyncio.sleep(0.35)  # flushed at 0.15 s; the upstream sleeps until about 0.75 s
        leaver.cancel()
        status, body, headers = await stayer
        assert status == 200 and headers[BATCH_SIZE_HEADER] == "2" and len(body["data"]) == 1
        assert embed_up.inputs() == [["SLOW leaver", "stayer"]] and embed_up.cancelled == 0
        # everyone leaves a flushed batch: the upstream call is closed, nothing is left behind
        both = [asyncio.ensure_future(post(http, proxy, f"SLOW {i}")) for i in range(2)]  # noqa: TID251
        await asyncio.sleep(0.35)
        for task in both:
            task.cancel()
        await asyncio.sleep(0.2)
    assert embed_up.cancelled == 1
    assert len(proxy.state.batcher.tasks) == 0 and not proxy.state.batcher.groups
