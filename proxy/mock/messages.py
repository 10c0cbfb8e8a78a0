"""Anthropic Messages: plans, bodies and the named stream events. Honours `output_config.format` and ends a
tool loop once the last user turn carries the tool's `tool_result`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from proxy.mock.content import (
    UNKNOWN_TOOL,
    Gen,
    InvalidRequest,
    Json,
    OutputFormat,
    TextPlan,
    content_text,
    decide_tool,
    estimate_tokens,
    format_from,
    plan_text,
    plan_tool,
    pos_int,
    require_field,
    sse,
)


def anthropic_input_tokens(body: Json) -> int:
    messages = require_field(body, "messages", list)
    texts = [content_text(body.get("system"))]
    texts += [content_text(m.get("content")) for m in messages if isinstance(m, dict)]
    return estimate_tokens(" ".join(texts))


def message_tools(body: Json) -> tuple[list[tuple[str, Any]], str, str | None]:
    """(name, input_schema) of each client tool, the mode (auto, any, tool, none) and a named tool."""
    tools = body.get("tools")
    specs = [t for t in tools if isinstance(t, dict)] if isinstance(tools, list) else []
    named = [(s["name"], s.get("input_schema")) for s in specs if isinstance(s.get("name"), str)]
    choice = body.get("tool_choice")
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "tool":
        wanted = choice.get("name") if isinstance(choice, dict) else None
        if not isinstance(wanted, str):
            raise InvalidRequest("tool_choice.name: Field required", "tool_choice")
        return named, "required", wanted
    return named, {"none": "none", "any": "required"}.get(str(kind), "auto"), None


def trailing_results(messages: list[Json]) -> list[str] | None:
    """Names of the tools whose `tool_result` blocks end the conversation (in the last user message)."""
    calls: dict[str, str] = {}
    for message in messages:
        for block in _blocks(message):
            if block.get("type") == "tool_use" and isinstance(block.get("id"), str):
                calls[block["id"]] = str(block.get("name", UNKNOWN_TOOL))
    if not messages or messages[-1].get("role") != "user":
        return None
    names = [calls.get(str(b.get("tool_use_id")), UNKNOWN_TOOL) for b in _blocks(messages[-1])
             if b.get("type") == "tool_result"]
    return names or None


def _blocks(message: Json) -> list[Json]:
    content = message.get("content")
    return [b for b in content if isinstance(b, dict)] if isinstance(content, list) else []


def output_format(body: Json) -> OutputFormat | None:
    """`output_config.format` (and the beta's top-level `output_format`): `{"type": "json_schema", "schema": …}`."""
    config = body.get("output_config")
    if config is not None and not isinstance(config, dict):
        raise InvalidRequest("output_config: Input should be an object", "output_config")
    spec = config.get("format") if isinstance(config, dict) else None
    if spec is None:
        return format_from(body.get("output_format"), "output_format", nested_schema=False)
    return format_from(spec, "output_config.format", nested_schema=False)


def plan_messages(body: Json, output_tokens: int, gen: Gen) -> TextPlan:
    model = require_field(body, "model", str)
    limit = pos_int(body, "max_tokens", required=True)
    input_tokens = anthropic_input_tokens(body)
    messages = [m for m in body["messages"] if isinstance(m, dict)]
    users = [m for m in messages if m.get("role") == "user"]
    prompt = content_text(users[-1].get("content")) if users else ""
    tools, mode, wanted = message_tools(body)
    picked = decide_tool(tools, mode, wanted, trailing_results(messages))
    if picked is not None:
        return plan_tool(model, input_tokens, prompt, output_tokens, picked, f"toolu_{gen.rid}", "tool_use")
    fmt = output_format(body)
    return plan_text(model, input_tokens, prompt, output_tokens, limit, fmt, ("end_turn", "max_tokens"))


def _anthropic_usage(plan: TextPlan, output_tokens: int) -> Json:
    return {"input_tokens": plan.prompt_tokens, "output_tokens": output_tokens,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}


def _message(plan: TextPlan, gen: Gen, content: list[Json], stop: str | None, output_tokens: int) -> Json:
    return {"id": f"msg_{gen.rid}", "type": "message", "role": "assistant", "model": plan.model,
            "content": content, "stop_reason": stop, "stop_sequence": None,
            "usage": {**_anthropic_usage(plan, output_tokens), "service_tier": "standard"}}


def messages_response(plan: TextPlan, gen: Gen) -> Json:
    if plan.tool is not None:
        block: Json = {"type": "tool_use", "id": plan.tool[1], "name": plan.tool[0], "input": plan.tool[2]}
    else:
        block = {"type": "text", "text": plan.text}
    return _message(plan, gen, [block], plan.finish, plan.completion_tokens)


def messages_events(plan: TextPlan, gen: Gen) -> Iterator[bytes]:
    """Named events in the documented order: message_start, content_block_start, ping, deltas,
    content_block_stop, message_delta (cumulative usage), message_stop."""
    yield sse({"type": "message_start", "message": _message(plan, gen, [], None, 1)}, "message_start")
    if plan.tool is not None:
        block: Json = {"type": "tool_use", "id": plan.tool[1], "name": plan.tool[0], "input": {}}
        deltas = [{"type": "input_json_delta", "partial_json": p} for p in plan.pieces[0]]
    else:
        block = {"type": "text", "text": ""}
        deltas = [{"type": "text_delta", "text": p} for p in plan.pieces[0]]
    yield sse({"type": "content_block_start", "index": 0, "content_block": block}, "content_block_start")
    yield sse({"type": "ping"}, "ping")
    for delta in deltas:
        yield sse({"type": "content_block_delta", "index": 0, "delta": delta}, "content_block_delta")
    yield sse({"type": "content_block_stop", "index": 0}, "content_block_stop")
    yield sse({"type": "message_delta", "delta": {"stop_reason": plan.finish, "stop_sequence": None},
               "usage": _anthropic_usage(plan, plan.completion_tokens)}, "message_delta")
    yield sse({"type": "message_stop"}, "message_stop")
