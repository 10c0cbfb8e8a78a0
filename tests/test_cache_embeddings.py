"""The per-input embeddings cache end to end with the openai SDK: only the inputs not cached go upstream,
the caller gets every vector in its own order (identical to an uncached answer) with the usage the
upstream billed, and it composes with batching (the misses of several callers share one upstream call)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import openai
import orjson
import pytest
from cache_helpers import Embedder, embedder_app, embeddings_policy
from conftest import Proxy
from kit import Loopback, sample_key, scrape

pytestmark = pytest.mark.timeout(60)
StartProxy = Callable[..., Awaitable[Proxy]]
MakeClient = Callable[..., openai.AsyncOpenAI]


@pytest.fixture
async def upstream(loopback: Loopback) -> Embedder:
    embedder = Embedder()
    embedder.url = await loopback.serve(embedder_app(embedder))
    return embedder


async def embed(client: openai.AsyncOpenAI, model: str, inputs: Any, **kwargs: Any
                ) -> tuple[dict[str, Any], dict[str, str]]:
    raw = await client.embeddings.with_raw_response.create(model=model, input=inputs, **kwargs)
    return orjson.loads(raw.content), dict(raw.headers)


def vectors(answer: dict[str, Any]) -> list[Any]:
    assert [d["index"] for d in answer["data"]] == list(range(len(answer["data"])))
    return [d["embedding"] for d in answer["data"]]


async def test_a_hundred_inputs_with_ninety_cached_send_exactly_the_ten_others(
    start_proxy: StartProxy, async_openai: MakeClient, upstream: Embedder
) -> None:
    proxy = await start_proxy(embeddings_policy(upstream.url))
    client = async_openai(proxy)
    texts = [f"document number {i} about caching" for i in range(100)]
    fresh = [texts[i] for i in range(100) if i % 10 == 3]  # ten spread through the request
    await embed(client, "emb-cached", [t for t in texts if t not in fresh])  # the 90 others, cached
    assert len(upstream.inputs[-1]) == 90
    answer, headers = await embed(client, "emb-cached", texts)
    reference, _ = await embed(client, "emb-plain", texts)  # no cache on this route
    assert upstream.inputs[1] == fresh
    assert len(upstream.inputs) == 3
    assert vectors(answer) == vectors(reference)
    assert answer["usage"] == upstream.usage[1]  # the ten's
    assert answer["usage"]["prompt_tokens"] < reference["usage"]["prompt_tokens"] / 5
    assert headers["x-signalbox-cache"] == "miss" and headers["x-signalbox-cache-hits"] == "90"
    again, again_headers = await embed(client, "emb-cached", texts)
    assert vectors(again) == vectors(reference) and len(upstream.inputs) == 3
    assert again_headers["x-signalbox-cache"] == "hit"
    assert again["usage"] == {"prompt_tokens": 0, "total_tokens": 0}
    found = await scrape(proxy)
    assert found.get(sample_key("signalbox_cache_embedding_inputs_total", route="cached", result="hit")) == 190
    assert found.get(sample_key("signalbox_cache_embedding_inputs_total", route="cached", result="miss")) == 100


async def test_every_input_form_and_base64_and_repeats_come_back_in_order(
    start_proxy: StartProxy, async_openai: MakeClient, upstream: Embedder
) -> None:
    proxy = await start_proxy(embeddings_policy(upstream.url))
    client = async_openai(proxy)
    await embed(client, "emb-cached", "alpha", encoding_format="base64")
    tokens = [[1, 2, 3], [4, 5], [1, 2, 3]]
    await embed(client, "emb-cached", [[1, 2, 3]])
    mixed, _ = await embed(client, "emb-cached", tokens)
    assert upstream.inputs[-1] == [[4, 5]]  # the cached array and its repeat did not go
    plain, _ = await embed(client, "emb-plain", tokens)
    assert vectors(mixed) == vectors(plain)
    texts = ["beta", "alpha", "gamma", "beta"]
    b64, _ = await embed(client, "emb-cached", texts, encoding_format="base64")
    assert upstream.inputs[-1] == ["beta", "gamma"]  # alpha cached (base64), beta once
    ref, _ = await embed(client, "emb-plain", texts, encoding_format="base64")
    assert vectors(b64) == vectors(ref)
    floats, _ = await embed(client, "emb-cached", ["alpha"], encoding_format="float")
    assert upstream.inputs[-1] == ["alpha"]  # another encoding_format is another entry
    dims, _ = await embed(client, "emb-cached", ["alpha"], encoding_format="float", dimensions=4)
    assert upstream.inputs[-1] == ["alpha"] and len(vectors(dims)[0]) == 4


async def test_the_misses_of_concurrent_callers_merge_into_one_batched_call(
    start_proxy: StartProxy, async_openai: MakeClient, upstream: Embedder
) -> None:
    proxy = await start_proxy(embeddings_policy(upstream.url, batch={"max_wait": "1s"}))
    client = async_openai(proxy)
    await embed(client, "emb-cached", ["shared one", "shared two"])
    before = len(upstream.inputs)
    calls = [embed(client, "emb-cached", ["shared one", f"new {n}", "shared two"]) for n in range(4)]
    answers = await asyncio.gather(*calls)
    assert len(upstream.inputs) == before + 1
    assert sorted(upstream.inputs[-1]) == sorted(f"new {n}" for n in range(4))
    for n, (answer, _) in enumerate(answers):
        reference, _ = await embed(client, "emb-plain", ["shared one", f"new {n}", "shared two"])
        assert vectors(answer) == vectors(reference)


async def test_a_partly_cached_request_answered_with_the_wrong_count_is_a_502_not_half_an_answer(
    start_proxy: StartProxy, async_openai: MakeClient, upstream: Embedder
) -> None:
    proxy = await start_proxy(embeddings_policy(upstream.url))
    client = async_openai(proxy, max_retries=0)
    await embed(client, "emb-cached", ["kept"])
    upstream.drop_last = True  # from now on one vector fewer than the inputs sent
    with pytest.raises(openai.InternalServerError) as caught:
        await embed(client, "emb-cached", ["kept", "new one", "new two"])
    assert caught.value.status_code == 502
    assert upstream.inputs[-1] == ["new one", "new two"]
    upstream.drop_last = False
    answer, _ = await embed(client, "emb-cached", ["kept", "new one", "new two"])
    assert len(vectors(answer)) == 3  # nothing of the bad answer was stored
    assert upstream.inputs[-1] == ["new one", "new two"]
