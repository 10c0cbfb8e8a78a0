"""Translation fidelity found by real clients, with the official anthropic and openai SDKs through the proxy:
Anthropic's enforced structured output (`output_config.format`, what `messages.parse` sends) reaches an OpenAI
upstream as a strict `response_format`; every answer on /v1/messages carries `request-id` (the anthropic SDK's
`_request_id`) with the proxy's id; and the upstream's own id arrives as `x-upstream-request-id` whichever header
its vendor uses (`x-request-id` for OpenAI, `request-id` for Anthropic), never under the other protocol's name.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anthropic
import openai
import orjson
import pytest
from conftest import Proxy
from pydantic import BaseModel
from stream_helpers import JSON, Script, ScriptedUpstream, Servers

from proxy.mock.server import MockSettings, start_mock

pytestmark = pytest.mark.timeout(30)

StartProxy = Callable[..., Awaitable[Proxy]]
USER: Any = [{"role": "user", "content": "who is Ada?"}]


class Person(BaseModel):
    name: str
    born: int
    nickname: str | None = None


@pytest.fixture
async def mock_url() -> AsyncIterator[str]:
    runner, url = await start_mock(MockSettings(output_tokens=5))
    yield url
    await runner.cleanup()


@pytest.fixture
async def compat(servers: Servers) -> ScriptedUpstream:
    return await servers.scripted()


def policy(mock_url: str, compat: ScriptedUpstream) -> str:
    return f"""
    identify: {{mode: api_key}}
    upstreams:
      claude: {{provider: anthropic, base_url: "{mock_url}/v1", api_key: "${{TEST_UPSTREAM_KEY}}"}}
      oai: {{provider: openai, base_url: "{mock_url}/v1", api_key: "${{TEST_UPSTREAM_KEY}}"}}
      compat: {{provider: openai, base_url: "{compat.url}/v1", api_key: "${{TEST_UPSTREAM_KEY}}"}}
    tenants:
      alpha: {{keys: [sk-alpha]}}
    routes:
      - {{name: to-claude, match: {{model: claude-*}}, upstream: claude}}
      - {{name: to-oai, match: {{model: gpt-*}}, upstream: oai}}
      - {{name: to-compat, match: {{model: compat-*}}, upstream: compat}}
    """


@pytest.fixture
async def proxy(start_proxy: StartProxy, mock_url: str, compat: ScriptedUpstream) -> Proxy:
    return await start_proxy(policy(mock_url, compat))


@pytest.fixture
async def claude(proxy: Proxy) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic.AsyncAnthropic(base_url=proxy.url, api_key="sk-alpha", max_retries=0, timeout=10) as client:
        yield client


def completion(content: str) -> bytes:
    return orjson.dumps({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "compat-x",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 9, "total_tokens": 12},
    })


async def test_parse_with_an_output_format_sends_a_strict_schema_upstream(
    claude: anthropic.AsyncAnthropic, compat: ScriptedUpstream
) -> None:
    compat.reply(Script(body=completion('{"name": "Ada Lovelace", "born": 1815, "nickname": null}'),
                        headers=[*JSON, ("x-request-id", "up-123")]))
    parsed = await claude.messages.parse(model="compat-x", max_tokens=200, messages=USER, output_format=Person)
    assert parsed.parsed_output == Person(name="Ada Lovelace", born=1815)
    sent = compat.bodies[-1]["response_format"]
    assert sent["type"] == "json_schema" and sent["json_schema"]["strict"] is True
    schema = sent["json_schema"]["schema"]
    assert schema["required"] == ["name", "born", "nickname"]  # the optional one too: strict mode demands it
    assert schema["additionalProperties"] is False
    assert "default" not in schema["properties"]["nickname"]
    # the ids: ours as request-id (the SDK's _request_id) and x-request-id, the upstream's beside them
    assert parsed._request_id is not None and parsed._request_id != "up-123"
    # a schema strict mode cannot hold (OpenAI lists no `uri` format) goes as the client wrote it, unstrict
    compat.reply(Script(body=completion('{"site": "https://example.org"}')))
    schema = {"type": "object", "properties": {"site": {"type": "string", "format": "uri"}}, "required": ["site"],
              "additionalProperties": False}
    answer = await claude.messages.create(model="compat-x", max_tokens=50, messages=USER,
                                          output_config={"format": {"type": "json_schema", "schema": schema}})
    assert answer.content[0].type == "text"
    assert compat.bodies[-1]["response_format"] == {"type": "json_schema",
                                                    "json_schema": {"name": "output", "schema": schema}}


async def test_translated_messages_carry_request_id_and_the_upstreams_own_id(
    proxy: Proxy, claude: anthropic.AsyncAnthropic, compat: ScriptedUpstream
) -> None:
    compat.reply(Script(body=completion("hello"), headers=[*JSON, ("x-request-id", "up-abc")]))
    raw = await claude.messages.with_raw_response.create(model="compat-x", max_tokens=20, messages=USER)
    message = await raw.parse()
    assert raw.headers["request-id"] == raw.headers["x-request-id"] == message._request_id
    assert raw.headers["x-upstream-request-id"] == "up-abc"
    # streamed, the same
    async with claude.messages.stream(model="gpt-x", max_tokens=20, messages=USER) as stream:
        await stream.get_final_message()
        headers = stream.response.headers
    assert headers["request-id"] == headers["x-request-id"] != headers["x-upstream-request-id"]
    assert headers["x-upstream-request-id"].startswith("req_")  # the mock's OpenAI endpoint's x-request-id
    log_ids = {line["request_id"] for line in proxy.access_lines()}
    assert message._request_id in log_ids and headers["request-id"] in log_ids
    # and on the proxy's own errors (these had it already)
    with pytest.raises(anthropic.NotFoundError) as info:
        await claude.messages.create(model="nothing-routes-this", max_tokens=5, messages=USER)
    assert info.value.request_id == info.value.response.headers["x-request-id"]


async def test_anthropic_upstream_id_arrives_as_x_upstream_request_id_on_both_fronts(
    proxy: Proxy, claude: anthropic.AsyncAnthropic, mock_url: str
) -> None:
    # pass-through: the anthropic SDK on an anthropic upstream
    raw = await claude.messages.with_raw_response.create(model="claude-x", max_tokens=20, messages=USER)
    message = await raw.parse()
    upstream_id = raw.headers["x-upstream-request-id"]
    assert upstream_id.startswith("req_")  # the mock's Anthropic-style id, sent as `request-id`
    assert raw.headers["request-id"] == raw.headers["x-request-id"] == message._request_id != upstream_id
    # translated: the openai SDK on the same anthropic upstream gets no Anthropic header at all
    async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="sk-alpha", max_retries=0) as client:
        chat = await client.chat.completions.with_raw_response.create(model="claude-x", max_tokens=20, messages=USER)
    assert "request-id" not in chat.headers
    assert chat.headers["x-upstream-request-id"].startswith("req_")
    assert chat.parse()._request_id == chat.headers["x-request-id"] != chat.headers["x-upstream-request-id"]

