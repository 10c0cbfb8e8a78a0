"""The mock as the official SDKs use it, directly and through the proxy serving `make run`'s policies
(policies/default.yaml): the Responses API streamed and not, structured output (chat `parse`, json_object,
Responses `text.format`, Anthropic `output_config`) and tool loops that end after the tool's result."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from pydantic import BaseModel, Field

from proxy.mock.faults import MockSettings
from proxy.mock.server import start_mock

DEFAULT_POLICY = (Path(__file__).resolve().parent.parent / "policies" / "default.yaml").read_text()
DEV_KEY = "sk-signalbox-dev"
MODEL = "mock-chat"
WEATHER: Any = {
    "type": "function",
    "name": "get_weather",
    "description": "the weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
        "required": ["city", "unit"],
        "additionalProperties": False,
    },
    "strict": True,
}
CHAT_WEATHER: Any = {"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}


class Step(BaseModel):
    explanation: str
    output: int = Field(ge=1)


class Solution(BaseModel):
    steps: list[Step]
    final_answer: str


@pytest.fixture(params=["direct", "proxy"])
async def root(request: pytest.FixtureRequest, start_proxy: Callable[..., Awaitable[Any]]) -> AsyncIterator[str]:
    """The server root the SDKs talk to: the mock itself, or the proxy with the default policy in front."""
    if request.param == "proxy":
        proxy = await start_proxy(DEFAULT_POLICY)
        yield proxy.url
        return
    runner, url = await start_mock(MockSettings(output_tokens=12))
    try:
        yield url
    finally:
        await runner.cleanup()


@pytest.fixture
async def oai(root: str) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=root + "/v1", api_key=DEV_KEY, max_retries=0, timeout=20) as client:
        yield client


@pytest.fixture
async def claude(root: str) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic.AsyncAnthropic(base_url=root, api_key=DEV_KEY, max_retries=0, timeout=20) as client:
        yield client


# --- Responses API --------------------------------------------------------------------------------


async def test_responses_create_answers_with_text_and_usage(oai: openai.AsyncOpenAI) -> None:
    response = await oai.responses.create(model=MODEL, input="what is the weather in Paris", instructions="be brief")
    assert response.status == "completed" and response.object == "response" and response.id.startswith("resp_")
    assert response.output_text.startswith("mock") and "Paris" in response.output_text
    assert response.output[0].type == "message" and response.output[0].role == "assistant"
    assert response.usage is not None and response.usage.output_tokens > 0
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens


async def test_responses_stream_has_the_documented_event_sequence(oai: openai.AsyncOpenAI) -> None:
    whole = await oai.responses.create(model=MODEL, input="tell me a story")
    events = [event async for event in await oai.responses.create(model=MODEL, input="tell me a story", stream=True)]
    kinds = [event.type for event in events]
    deltas = kinds.count("response.output_text.delta")
    assert deltas > 1
    assert kinds == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        *["response.output_text.delta"] * deltas,
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.completed",
    ]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text
    final = events[-1]
    assert final.type == "response.completed" and final.response.output_text == text
    assert final.response.usage is not None and final.response.usage.output_tokens == deltas


async def test_responses_stream_helper_accumulates_the_final_response(oai: openai.AsyncOpenAI) -> None:
    async with oai.responses.stream(model=MODEL, input="hello there") as stream:
        async for _ in stream:
            pass
        final = await stream.get_final_response()
    assert final.status == "completed" and final.output_text.startswith("mock")


async def test_responses_max_output_tokens_ends_incomplete(oai: openai.AsyncOpenAI) -> None:
    response = await oai.responses.create(model=MODEL, input="a long answer please", max_output_tokens=3)
    assert response.status == "incomplete"
    assert response.incomplete_details is not None and response.incomplete_details.reason == "max_output_tokens"
    assert response.usage is not None and response.usage.output_tokens == 3


@pytest.mark.parametrize("stream", [False, True])
async def test_responses_tool_loop_calls_once_then_answers(oai: openai.AsyncOpenAI, stream: bool) -> None:
    conversation: list[Any] = [{"role": "user", "content": "what is the weather in Paris"}]

    async def turn() -> Any:
        if not stream:
            return await oai.responses.create(model=MODEL, input=conversation, tools=[WEATHER])
        async with oai.responses.stream(model=MODEL, input=conversation, tools=[WEATHER]) as events:
            return await events.get_final_response()

    first = await turn()
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    args = json.loads(calls[0].arguments)
    assert isinstance(args["city"], str) and args["unit"] == "c"
    conversation += [calls[0].model_dump(exclude_none=True),
                     {"type": "function_call_output", "call_id": calls[0].call_id, "output": '{"temp": 21}'}]
    second = await turn()
    assert [item.type for item in second.output] == ["message"]
    assert second.output_text.startswith("mock")


async def test_responses_required_tool_choice_is_obeyed_even_after_a_result(oai: openai.AsyncOpenAI) -> None:
    conversation: Any = [{"role": "user", "content": "hi"},
                         {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{}"},
                         {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}]
    forced = await oai.responses.create(model=MODEL, input=conversation, tools=[WEATHER], tool_choice="required")
    assert forced.output[0].type == "function_call"


async def test_responses_parse_fills_a_pydantic_model(oai: openai.AsyncOpenAI) -> None:
    parsed = await oai.responses.parse(model=MODEL, input="solve 8x + 7 = -23", text_format=Solution)
    assert isinstance(parsed.output_parsed, Solution) and parsed.output_parsed.steps


# --- chat completions -----------------------------------------------------------------------------


async def test_chat_parse_with_a_pydantic_model(oai: openai.AsyncOpenAI) -> None:
    messages: Any = [{"role": "user", "content": "solve 8x + 7 = -23"}]
    done = await oai.chat.completions.parse(model=MODEL, messages=messages, response_format=Solution)
    parsed = done.choices[0].message.parsed
    assert isinstance(parsed, Solution) and parsed.steps and parsed.steps[0].output >= 1
    beta = await oai.beta.chat.completions.parse(model=MODEL, messages=messages, response_format=Solution)
    assert beta.choices[0].message.parsed == parsed  # the same request, the same value


async def test_chat_json_object_mode_streamed_and_not(oai: openai.AsyncOpenAI) -> None:
    messages: Any = [{"role": "user", "content": "answer in JSON"}]
    whole = await oai.chat.completions.create(model=MODEL, messages=messages, response_format={"type": "json_object"})
    assert isinstance(json.loads(whole.choices[0].message.content or ""), dict)
    stream = await oai.chat.completions.create(
        model=MODEL, messages=messages, response_format={"type": "json_object"}, stream=True
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == whole.choices[0].message.content


async def test_required_tool_choice_moves_on_to_the_next_tool(oai: openai.AsyncOpenAI) -> None:
    """pydantic-ai's loop: a function tool, then (tool_choice required) its output tool, which ends the run."""
    final: Any = {"type": "function", "function": {"name": "final_result", "parameters": Solution.model_json_schema()}}
    messages: list[Any] = [{"role": "user", "content": "weather in Oslo?"}]
    tools = [CHAT_WEATHER, final]
    first = await oai.chat.completions.create(model=MODEL, messages=messages, tools=tools, tool_choice="required")
    call = (first.choices[0].message.tool_calls or [])[0]
    assert call.function.name == "get_weather"
    messages += [first.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "cold"}]
    second = await oai.chat.completions.create(model=MODEL, messages=messages, tools=tools, tool_choice="required")
    output = (second.choices[0].message.tool_calls or [])[0]
    assert output.function.name == "final_result"
    assert Solution.model_validate_json(output.function.arguments).steps


async def test_json_mode_follows_a_schema_given_in_the_prompt(oai: openai.AsyncOpenAI) -> None:
    """instructor's JSON mode (and LangChain's json_mode) send json_object and put the schema in a message."""
    system = f"Answer with JSON that matches this schema:\n{json.dumps(Solution.model_json_schema())}\nNo prose."
    messages: Any = [{"role": "system", "content": system}, {"role": "user", "content": "solve 8x + 7 = -23"}]
    whole = await oai.chat.completions.create(model=MODEL, messages=messages, response_format={"type": "json_object"})
    assert Solution.model_validate_json(whole.choices[0].message.content or "").steps
    answer = await oai.responses.create(model=MODEL, input=messages, text={"format": {"type": "json_object"}})
    assert Solution.model_validate_json(answer.output_text).final_answer


async def test_chat_tool_loop_ends_after_the_tool_result(oai: openai.AsyncOpenAI) -> None:
    messages: list[Any] = [{"role": "user", "content": "weather in Oslo?"}]
    first = await oai.chat.completions.create(model=MODEL, messages=messages, tools=[CHAT_WEATHER])
    call = (first.choices[0].message.tool_calls or [])[0]
    assert first.choices[0].finish_reason == "tool_calls"
    messages += [first.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "cold"}]
    second = await oai.chat.completions.create(model=MODEL, messages=messages, tools=[CHAT_WEATHER])
    assert second.choices[0].finish_reason == "stop" and second.choices[0].message.tool_calls is None


# --- Anthropic messages ---------------------------------------------------------------------------


async def test_anthropic_tool_loop_ends_after_the_tool_result(claude: anthropic.AsyncAnthropic) -> None:
    tools: Any = [{"name": "get_weather", "input_schema": WEATHER["parameters"]}]
    messages: list[Any] = [{"role": "user", "content": "weather in Rome?"}]
    first = await claude.messages.create(model=MODEL, max_tokens=200, messages=messages, tools=tools)
    assert first.stop_reason == "tool_use"
    use = next(block for block in first.content if block.type == "tool_use")
    messages += [{"role": "assistant", "content": [block.model_dump() for block in first.content]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "warm"}]}]
    async with claude.messages.stream(model=MODEL, max_tokens=200, messages=messages, tools=tools) as stream:
        second = await stream.get_final_message()
    assert second.stop_reason == "end_turn" and [b.type for b in second.content] == ["text"]


async def test_anthropic_output_config_fills_a_pydantic_model(claude: anthropic.AsyncAnthropic) -> None:
    messages: Any = [{"role": "user", "content": "solve 8x + 7 = -23"}]
    parsed = await claude.messages.parse(model=MODEL, max_tokens=500, messages=messages, output_format=Solution)
    assert isinstance(parsed.parsed_output, Solution) and parsed.parsed_output.final_answer
