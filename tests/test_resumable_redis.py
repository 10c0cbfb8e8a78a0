"""Resumable streams across replicas: two proxies share a real redis-server (the Redis state backend), a
client's connection to one is cut mid-stream, and a reconnect that reaches the other gets exactly the
remaining events, read from Redis Streams (the past from XRANGE, the live tail from XREAD BLOCK). Another
tenant cannot resume there either; a cancel sent to the other replica stops the generation."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Proxy
from kit.metrics import scrape, total
from kit.polling import until
from redis_server import RedisServer, running
from resume_helpers import data_of, read_stream, resume, text_of
from stream_helpers import mock_stats

from proxy.mock.server import MockSettings, start_mock

pytestmark = pytest.mark.timeout(90)

StartProxy = Callable[..., Awaitable[Proxy]]
PROMPT: Any = [{"role": "user", "content": "tell me about signal boxes and their levers"}]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    with running(tmp_path) as redis:
        yield redis


@pytest.fixture
async def mock_url() -> AsyncIterator[str]:
    runner, url = await start_mock(MockSettings(output_tokens=12))
    yield url
    await runner.cleanup()


def policy(redis_url: str, mock_url: str) -> str:
    return f"""
state: {{backend: redis, url: "{redis_url}", key_prefix: sb-resume, timeout: 1s}}
identify: {{mode: api_key}}
upstreams:
  oai: {{provider: openai, base_url: "{mock_url}/v1", api_key: "${{TEST_UPSTREAM_KEY}}"}}
  claude: {{provider: anthropic, base_url: "{mock_url}/v1", api_key: "${{TEST_UPSTREAM_KEY}}"}}
tenants:
  alpha: {{keys: [sk-alpha]}}
  beta: {{keys: [sk-beta]}}
routes:
  - {{name: gpt, upstream: oai, match: {{model: "gpt-*"}}, stream: {{resumable: {{buffer: 1MiB, ttl: 30s}}}}}}
  - {{name: claude, upstream: claude, match: {{model: "claude-*"}}, stream: {{resumable: {{buffer: 1MiB, ttl: 30s}}}}}}
"""


@pytest.mark.parametrize(
    ("path", "body"),
    [
        pytest.param("/v1/chat/completions", {"model": "gpt-a", "messages": PROMPT, "stream": True}, id="openai"),
        pytest.param("/v1/messages", {"model": "claude-a", "max_tokens": 64, "messages": PROMPT, "stream": True},
                     id="anthropic"),
        pytest.param("/v1/chat/completions", {"model": "claude-a", "messages": PROMPT, "stream": True},
                     id="translated"),
    ],
)
async def test_a_reconnect_to_another_replica_gets_exactly_the_remaining_events(
    start_proxy: StartProxy, server: RedisServer, mock_url: str, path: str, body: dict[str, Any]
) -> None:
    one = await start_proxy(policy(server.url, mock_url))
    two = await start_proxy(policy(server.url, mock_url))
    whole = await read_stream("POST", one.url + path, body=body)
    slow = {"x-mock-token-delay-ms": "60"}
    first = await read_stream("POST", one.url + path, body=body, headers=slow, stop_after=3)
    assert first.ids == [0, 1, 2] and first.stream_id is not None
    rest = await resume(two.url + path, first.stream_id, 2, body=body)  # the other replica: live tail from Redis
    assert rest.status == 200, rest.body
    assert rest.ids == list(range(3, len(whole.blocks)))
    last = data_of(rest.blocks[-1])
    assert last == "[DONE]" or last["type"] == "message_stop"
    assert text_of(first.blocks + rest.blocks) == text_of(whole.blocks)
    again = await resume(two.url + path, first.stream_id, 5, body=body)  # ended: all from XRANGE
    assert again.ids == list(range(6, len(whole.blocks)))
    assert (await mock_stats(mock_url))["disconnects"] == 0
    assert total(await scrape(two), "signalbox_stream_resumes_total", source="shared") == 2

    other = await resume(two.url + path, first.stream_id, 2, body=body,
                         headers={"Authorization": "Bearer sk-beta", "x-api-key": "sk-beta"})
    assert other.status == 404


async def test_a_cancel_on_another_replica_stops_the_generation(
    start_proxy: StartProxy, server: RedisServer, mock_url: str
) -> None:
    one = await start_proxy(policy(server.url, mock_url))
    two = await start_proxy(policy(server.url, mock_url))
    body = {"model": "gpt-a", "input": "a long answer", "stream": True, "background": True}
    first = await read_stream("POST", one.url + "/v1/responses", body=body, headers={"x-mock-token-delay-ms": "200"},
                              stop_after=3)
    response_id = data_of(first.blocks[0])["response"]["id"]
    await until(lambda: one.state.streams.detached == 1)
    await until(lambda: one.state.streams.local(response_id) is not None and one.state.streams.buffered > 0)
    cancelled = await read_stream("POST", two.url + f"/v1/responses/{response_id}/cancel")
    assert cancelled.status == 200, cancelled.body
    await until(lambda: one.state.streams.detached == 0, within=15)
    assert (await mock_stats(mock_url))["disconnects"] == 1
