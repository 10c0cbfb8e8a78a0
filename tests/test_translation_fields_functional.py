"""Translation edges found by an audit, each end to end with the official SDKs against scripted upstreams that
speak the other vendor's wire format: a model that thinks longer than `timeouts.idle` without saying anything the
client's protocol can carry, a tool called with no arguments, prompt-cache writes in usage, the field a refusal
names, and the `max_tokens` an Anthropic upstream is sent when the OpenAI client set none.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import anthropic
import openai
import orjson
import pytest
from conftest import Proxy
from stream_helpers import JSON, SSE, Script, ScriptedUpstream, Servers, chat_chunk, sse

pytestmark = pytest.mark.timeout(30)

StartProxy = Callable[..., Awaitable[Proxy]]
USER: Any = [{"role": "user", "content": "hi"}]
DONE = b"data: [DONE]\n\n"


@pytest.fixture
async def claude(servers: Servers) -> ScriptedUpstream:
    """Speaks Anthropic's Messages API."""
    return await servers.scripted()


@pytest.fixture
async def compat(servers: Servers) -> ScriptedUpstream:
    """Speaks OpenAI's Chat Completions (vLLM-style)."""
    return await servers.scripted()


def policy(claude: ScriptedUpstream, compat: ScriptedUpstream, route_extra: str = "") -> str:
    return f"""
    identify: {{mode: api_key}}
    upstreams:
      claude: {{provider: anthropic, base_url: "{claude.url}/v1", api_key: "${{TEST_UPSTREAM_KEY}}"}}
      compat: {{provider: openai, base_url: "{compat.url}/v1", api_key: "${{TEST_UPSTREAM_KEY}}"}}
    tenants:
      alpha: {{keys: [sk-alpha]}}
    routes:
      - {{name: to-claude, match: {{model: claude-*}}, upstream: claude {route_extra}}}
      - {{name: to-compat, match: {{model: gpt-*}}, upstream: compat {route_extra}}}
    """


def event(payload: dict[str, Any]) -> bytes:
    return sse(payload, event=payload["type"])


def message_start(**usage: int) -> bytes:
    message = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x", "content": [],
               "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 10, "output_tokens": 1, **usage}}
    return event({"type": "message_start", "message": message})


def block_start(index: int, block: dict[str, Any]) -> bytes:
    return event({"type": "content_block_start", "index": index, "content_block": block})


def block_delta(index: int, delta: dict[str, Any]) -> bytes:
    return event({"type": "content_block_delta", "index": index, "delta": delta})


def block_stop(index: int) -> bytes:
    return event({"type": "content_block_stop", "index": index})


def message_end(stop_reason: str = "end_turn", **usage: int) -> list[bytes]:
    delta = {"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": None},
             "usage": {"output_tokens": 5, **usage}}
    return [event(delta), event({"type": "message_stop"})]


async def test_a_model_still_thinking_is_not_idle_when_translated(
    start_proxy: StartProxy, claude: ScriptedUpstream, compat: ScriptedUpstream
) -> None:
    """Thinking (Anthropic) and reasoning_content (vLLM) have no field in the client's protocol and are dropped,
    but they are the upstream talking: `idle` (1 s here) must not cut a model that reasons for 2.4 s."""
    proxy = await start_proxy(policy(claude, compat, ", timeouts: {idle: 1s}"))
    thinking = [block_start(0, {"type": "thinking", "thinking": "", "signature": ""})]
    thinking += [block_delta(0, {"type": "thinking_delta", "thinking": "hmm "})] * 8
    text = [block_stop(0), block_start(1, {"type": "text", "text": ""}),
            block_delta(1, {"type": "text_delta", "text": "answer"}), block_stop(1)]
    claude.reply(Script(headers=list(SSE), events=[message_start(), *thinking, *text, *message_end()], gap=0.3))
    reasoning = [chat_chunk({"reasoning_content": "think "})] * 8
    events = [chat_chunk({"role": "assistant", "content": ""}), *reasoning, chat_chunk({"content": "answer"}),
              chat_chunk({}, "stop"), DONE]
    compat.reply(Script(headers=list(SSE), events=events, gap=0.3))
    async with openai.AsyncOpenAI(base_url=proxy.v1, api_key="sk-alpha", max_retries=0, timeout=10) as client:
        stream = await client.chat.completions.create(model="claude-x", messages=USER, stream=True)
        assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]) == "answer"
    async with anthropic.AsyncAnthropic(base_url=proxy.url, api_key="sk-alpha", max_retries=0, timeout=10) as ant:
        async with ant.messages.stream(model="gpt-x", max_tokens=50, messages=USER) as streamed:
            message = await streamed.get_final_message()
    assert message.content[0].type == "text" and message.content[0].text == "answer"


NO_ARGS: Any = {"type": "object", "properties": {}}
NO_ARGS_TOOL: Any = {"type": "function", "function": {"name": "now", "parameters": NO_ARGS}}


async def test_a_tool_called_without_arguments_gets_an_empty_json_object(
    start_proxy: StartProxy, claude: ScriptedUpstream, compat: ScriptedUpstream
) -> None:
    """Anthropic streams a no-argument tool_use as `input: {}` and an empty partial_json; OpenAI always sends
    JSON text, and the SDK's stream helper parses what it accumulated: `"{}"`, not `""`."""
    proxy = await start_proxy(policy(claude, compat))
    tools = [
        block_start(0, {"type": "tool_use", "id": "toolu_1", "name": "now", "input": {}}),
        block_delta(0, {"type": "input_json_delta", "partial_json": ""}),
        block_stop(0),
        block_start(1, {"type": "tool_use", "id": "toolu_2", "name": "now", "input": {}}),
        block_delta(1, {"type": "input_json_delta", "partial_json": '{"tz": '}),
        block_delta(1, {"type": "input_json_delta", "partial_json": '"UTC"}'}),
        block_stop(1),
    ]
    claude.reply(Script(headers=list(SSE), events=[message_start(), *tools, *message_end("tool_use")]))
    async with openai.AsyncOpenAI(base_url=proxy.v1, api_key="sk-alpha", max_retries=0, timeout=10) as client:
        async with client.chat.completions.stream(model="claude-x", messages=USER, tools=[NO_ARGS_TOOL]) as stream:
            final = await stream.get_final_completion()
    calls = final.choices[0].message.tool_calls
    assert calls is not None
    assert [(c.id, json.loads(c.function.arguments)) for c in calls] == [("toolu_1", {}), ("toolu_2", {"tz": "UTC"})]
    assert final.choices[0].finish_reason == "tool_calls"


async def test_prompt_cache_writes_survive_translation_both_ways(
    start_proxy: StartProxy, claude: ScriptedUpstream, compat: ScriptedUpstream
) -> None:
    """Anthropic's cache_creation_input_tokens is OpenAI's prompt_tokens_details.cache_write_tokens, and back."""
    proxy = await start_proxy(policy(claude, compat))
    written = {"cache_creation_input_tokens": 300, "cache_read_input_tokens": 40}
    body = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
            "content": [{"type": "text", "text": "ok"}], "stop_reason": "end_turn", "stop_sequence": None,
            "usage": {"input_tokens": 10, "output_tokens": 5, **written}}
    claude.reply(Script(headers=list(JSON), body=orjson.dumps(body)))
    usage = {"prompt_tokens": 350, "completion_tokens": 5, "total_tokens": 355,
             "prompt_tokens_details": {"cached_tokens": 40, "cache_write_tokens": 300}}
    answer = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-x", "usage": usage,
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}]}
    compat.reply(Script(headers=list(JSON), body=orjson.dumps(answer)))
    async with openai.AsyncOpenAI(base_url=proxy.v1, api_key="sk-alpha", max_retries=0, timeout=10) as client:
        completion = await client.chat.completions.create(model="claude-x", messages=USER)
    assert completion.usage is not None and completion.usage.prompt_tokens == 350
    details = completion.usage.prompt_tokens_details
    assert details is not None and (details.cached_tokens, details.cache_write_tokens) == (40, 300)
    async with anthropic.AsyncAnthropic(base_url=proxy.url, api_key="sk-alpha", max_retries=0, timeout=10) as ant:
        message = await ant.messages.create(model="gpt-x", max_tokens=50, messages=USER)
    got = message.usage
    assert (got.input_tokens, got.cache_creation_input_tokens, got.cache_read_input_tokens) == (10, 300, 40)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"tools": [{"type": "custom", "custom": {"name": "grammar"}}]}, "tools[0]"),
    ],
)
async def test_a_refused_field_is_named_in_param(
    start_proxy: StartProxy, claude: ScriptedUpstream, compat: ScriptedUpstream, extra: dict[str, Any], param: str
) -> None:
    proxy = await start_proxy(policy(claude, compat))
    async with openai.AsyncOpenAI(base_url=proxy.v1, api_key="sk-alpha", max_retries=0, timeout=10) as client:
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(model="claude-x", messages=USER, **extra)
    assert info.value.param == param
    assert claude.bodies == []  # refused before anything was sent


async def test_the_anthropic_front_names_the_refused_field_in_its_message(
    start_proxy: StartProxy, claude: ScriptedUpstream, compat: ScriptedUpstream
) -> None:
    proxy = await start_proxy(policy(claude, compat))
    async with anthropic.AsyncAnthropic(base_url=proxy.url, api_key="sk-alpha", max_retries=0, timeout=10) as ant:
        with pytest.raises(anthropic.BadRequestError) as info:
            await ant.messages.create(model="gpt-x", max_tokens=50, messages=[{"role": "system", "content": "x"}])
    message = info.value.body["error"]["message"]  # type: ignore[index]
    assert message == "messages[0].role: messages must have role user or assistant", message
    assert compat.bodies == []


@pytest.mark.parametrize(("route_extra", "sent"), [("", 4096), (", tokens: {default_max_tokens: 300}", 300)])
async def test_anthropic_gets_the_routes_default_max_tokens_when_the_client_sets_none(
    start_proxy: StartProxy, claude: ScriptedUpstream, compat: ScriptedUpstream, route_extra: str, sent: int
) -> None:
    """Anthropic requires max_tokens. A default the policy writes is sent; without one, 4096 (the schema's
    1,024 is only what a token limit reserves, and would cut answers short)."""
    proxy = await start_proxy(policy(claude, compat, route_extra))
    body = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
            "content": [{"type": "text", "text": "ok"}], "stop_reason": "end_turn", "stop_sequence": None,
            "usage": {"input_tokens": 10, "output_tokens": 5}}
    answer = Script(headers=list(JSON), body=orjson.dumps(body))
    claude.reply(answer, answer)
    async with openai.AsyncOpenAI(base_url=proxy.v1, api_key="sk-alpha", max_retries=0, timeout=10) as client:
        await client.chat.completions.create(model="claude-x", messages=USER)
        await client.chat.completions.create(model="claude-x", messages=USER, max_completion_tokens=77)
    assert [b["max_tokens"] for b in claude.bodies] == [sent, 77]
