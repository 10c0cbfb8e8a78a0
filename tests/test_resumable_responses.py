"""The Responses API's own resume convention through the proxy, for an upstream that has none of it (the
built-in mock): the official openai SDK starts a background stream, loses it, and resumes it with
`responses.retrieve(id, stream=True, starting_after=N)`; `retrieve` without stream answers the response
object, and `cancel` stops a generation that runs without its client."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import openai
import pytest
from conftest import Proxy
from kit import build_policy, route_spec, upstream_spec
from kit.polling import until
from stream_helpers import mock_stats

from proxy.mock.server import MockSettings, start_mock

pytestmark = pytest.mark.timeout(60)

StartProxy = Callable[..., Awaitable[Proxy]]
MakeClient = Callable[..., openai.AsyncOpenAI]


@pytest.fixture
async def mock_url() -> AsyncIterator[str]:
    runner, url = await start_mock(MockSettings(output_tokens=10))
    yield url
    await runner.cleanup()


def policy(mock_url: str) -> str:
    stream = {"resumable": {"buffer": "1MiB", "ttl": "30s"}}
    routes = [route_spec("gpt", "oai", stream=stream)]
    tenants = {"alpha": {"keys": ["sk-alpha"]}, "beta": {"keys": ["sk-beta"]}}
    return build_policy({"oai": upstream_spec(mock_url)}, routes, tenants=tenants)


def text_of(events: list[Any]) -> str:
    return "".join(e.delta for e in events if e.type == "response.output_text.delta")


async def test_the_openai_sdk_resumes_a_background_stream_with_starting_after(
    start_proxy: StartProxy, async_openai: MakeClient, mock_url: str
) -> None:
    proxy = await start_proxy(policy(mock_url))
    client = async_openai(proxy, default_headers={"x-mock-token-delay-ms": "40"})
    stream = await client.responses.create(model="gpt-a", input="tell me about signal boxes", background=True,
                                           stream=True)
    seen: list[Any] = []
    async for event in stream:
        seen.append(event)
        if len(seen) == 6:
            break
    await stream.close()  # the connection is gone mid-stream
    response_id = seen[0].response.id
    last = seen[-1].sequence_number

    resumed = await client.responses.retrieve(response_id, stream=True, starting_after=last)
    rest = [event async for event in resumed]
    assert [e.sequence_number for e in rest] == list(range(last + 1, last + 1 + len(rest)))
    assert rest[-1].type == "response.completed"
    final = rest[-1].response
    assert text_of(seen + rest) == final.output_text and final.output_text
    assert (await mock_stats(mock_url))["disconnects"] == 0  # the upstream generation was never cut

    again = await client.responses.retrieve(response_id)  # not streamed: the response object
    assert again.id == response_id and again.status == "completed" and again.output_text == final.output_text
    everything = await client.responses.retrieve(response_id, stream=True)  # from the first event
    events = [event async for event in everything]
    assert [e.sequence_number for e in events] == list(range(rest[-1].sequence_number + 1))

    other = async_openai(proxy, key="sk-beta")
    with pytest.raises(openai.NotFoundError):  # another tenant's: not ours to show, so the upstream answers
        await other.responses.retrieve(response_id, stream=True, starting_after=0)


async def test_cancel_stops_a_detached_generation(
    start_proxy: StartProxy, async_openai: MakeClient, mock_url: str
) -> None:
    proxy = await start_proxy(policy(mock_url))
    client = async_openai(proxy, default_headers={"x-mock-token-delay-ms": "300"})
    stream = await client.responses.create(model="gpt-a", input="a long answer please", background=True,
                                           stream=True)
    first = await stream.__anext__()
    await stream.close()
    response_id = first.response.id
    await until(lambda: proxy.state.streams.detached == 1)
    cancelled = await client.responses.cancel(response_id)
    assert cancelled.id == response_id and cancelled.status == "cancelled"
    await until(lambda: proxy.state.streams.detached == 0)
    assert (await mock_stats(mock_url))["disconnects"] == 1  # the upstream connection was closed
