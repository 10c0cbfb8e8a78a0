"""A real agent framework against `make run`'s policies: the OpenAI Agents SDK (Responses API by default)
runs its tool loop through the proxy to the built-in mock, calls the tool once and finishes."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import agents
import openai
import pytest

DEFAULT_POLICY = (Path(__file__).resolve().parent.parent / "policies" / "default.yaml").read_text()


@pytest.fixture(autouse=True)
def _no_tracing() -> None:
    agents.set_tracing_disabled(True)  # the SDK would otherwise export traces to the network


@pytest.mark.parametrize("stream", [False, True])
async def test_an_agent_with_a_tool_finishes_through_the_proxy(
    start_proxy: Callable[..., Awaitable[Any]], stream: bool
) -> None:
    proxy = await start_proxy(DEFAULT_POLICY)
    calls: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        calls.append(city)
        return f"sunny in {city}"

    async with openai.AsyncOpenAI(base_url=proxy.v1, api_key="sk-signalbox-dev", max_retries=0) as client:
        model = agents.OpenAIResponsesModel(model="mock-chat", openai_client=client)
        agent = agents.Agent(name="forecaster", instructions="use the tool", tools=[get_weather], model=model)
        if stream:
            result: Any = agents.Runner.run_streamed(agent, "weather in Lisbon?", max_turns=4)
            async for _ in result.stream_events():
                pass
        else:
            result = await agents.Runner.run(agent, "weather in Lisbon?", max_turns=4)
    assert len(calls) == 1  # one tool call, then the answer: the loop ended by itself
    assert isinstance(result.final_output, str) and result.final_output.startswith("mock")
    requests = [line for line in proxy.access_lines() if line.get("route") == "chat"]
    assert len(requests) == 2 and all(line["status"] == 200 for line in requests)


async def test_an_agent_with_a_structured_output_type(start_proxy: Callable[..., Awaitable[Any]]) -> None:
    from pydantic import BaseModel

    class Forecast(BaseModel):
        city: str
        celsius: int

    proxy = await start_proxy(DEFAULT_POLICY)
    async with openai.AsyncOpenAI(base_url=proxy.v1, api_key="sk-signalbox-dev", max_retries=0) as client:
        model = agents.OpenAIResponsesModel(model="mock-chat", openai_client=client)
        agent = agents.Agent(name="forecaster", output_type=Forecast, model=model)
        result = await agents.Runner.run(agent, "forecast for Lisbon", max_turns=2)
    assert isinstance(result.final_output, Forecast)
