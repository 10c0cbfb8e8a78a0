"""OpenAI Responses API (`POST /v1/responses`): the response object and its streamed event sequence.

Streamed: response.created, response.in_progress, response.output_item.added, then for a message
response.content_part.added, response.output_text.delta per token, response.output_text.done,
response.content_part.done (for a function call: response.function_call_arguments.delta per fragment and
response.function_call_arguments.done), response.output_item.done and response.completed (or
response.incomplete when max_output_tokens cut the text), each with its sequence_number. Honours
`text.format` and ends a tool loop once the input ends with the tool's `function_call_output`. Nothing is
stored: previous_response_id is accepted, and a result whose call is not in `input` counts as answered.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from proxy.mock.content import (
    UNKNOWN_TOOL,
    Gen,
    InvalidRequest,
    Json,
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
    with_prompt_schema,
)


def input_items(body: Json) -> list[Json]:
    """`input` as a list of items: a string is one user message."""
    value = body.get("input")
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    if isinstance(value, list) and all(isinstance(item, dict) for item in value):
        return value
    raise InvalidRequest("'input' is required and must be a string or an array of input items", "input")


def response_tools(body: Json) -> tuple[list[tuple[str, Any]], str, str | None]:
    """(name, parameters) of each function tool (built-in tools are never called), the mode, a named tool."""
    tools = body.get("tools")
    specs = [t for t in tools if isinstance(t, dict) and t.get("type") == "function"] if isinstance(tools, list) else []
    named = [(s["name"], s.get("parameters")) for s in specs if isinstance(s.get("name"), str)]
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        wanted = choice.get("name")
        if choice.get("type") != "function" or not isinstance(wanted, str):
            message = "'tool_choice' must be 'none', 'auto', 'required' or a function by name"
            raise InvalidRequest(message, "tool_choice")
        return named, "required", wanted
    return named, choice if choice in ("none", "required") else "auto", None


def trailing_results(items: list[Json]) -> list[str] | None:
    """Names of the functions whose `function_call_output` items end the input."""
    calls = {str(i.get("call_id")): str(i.get("name", UNKNOWN_TOOL)) for i in items if i.get("type") == "function_call"}
    names: list[str] = []
    for item in reversed(items):
        if item.get("type") != "function_call_output":
            break
        names.append(calls.get(str(item.get("call_id")), UNKNOWN_TOOL))
    return names or None


def plan_response(body: Json, output_tokens: int, gen: Gen) -> TextPlan:
    model = require_field(body, "model", str)
    items = input_items(body)
    texts = [content_text(body.get("instructions"))]
    texts += [content_text(i["content"] if "content" in i else i.get("output") or i.get("arguments")) for i in items]
    users = [i for i in items if i.get("role") == "user"]
    prompt = content_text(users[-1].get("content")) if users else ""
    limit = pos_int(body, "max_output_tokens")
    tools, mode, wanted = response_tools(body)
    picked = decide_tool(tools, mode, wanted, trailing_results(items))
    prompt_tokens = estimate_tokens(" ".join(texts))
    if picked is not None:
        return plan_tool(model, prompt_tokens, prompt, output_tokens, picked, f"call_{gen.rid}", "completed")
    text = body.get("text")
    spec = text.get("format") if isinstance(text, dict) else None
    fmt = format_from(spec, "text.format", nested_schema=False)
    fmt = with_prompt_schema(fmt, texts)
    return plan_text(model, prompt_tokens, prompt, output_tokens, limit, fmt, ("completed", "incomplete"))


def _usage(plan: TextPlan) -> Json:
    return {
        "input_tokens": plan.prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": plan.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": plan.prompt_tokens + plan.completion_tokens,
    }


def _item(plan: TextPlan, gen: Gen, done: bool) -> Json:
    """The one output item: a function call or an assistant message, as it is while streaming or at the end."""
    if plan.tool is not None:
        name, call_id, _ = plan.tool
        return {"id": f"fc_{gen.rid}", "type": "function_call", "status": "completed" if done else "in_progress",
                "call_id": call_id, "name": name, "arguments": plan.text if done else ""}
    status = ("incomplete" if plan.truncated else "completed") if done else "in_progress"
    content = [_part(plan.text)] if done else []
    return {"id": f"msg_{gen.rid}", "type": "message", "status": status, "role": "assistant", "content": content}


def _part(text: str) -> Json:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def response_body(plan: TextPlan, gen: Gen, body: Json, done: bool = True) -> Json:
    """The response object: finished (with output and usage) or as announced at the start of a stream."""
    status = ("incomplete" if plan.truncated else "completed") if done else "in_progress"
    text = body.get("text") if isinstance(body.get("text"), dict) else {"format": {"type": "text"}}
    return {
        "id": f"resp_{gen.rid}", "object": "response", "created_at": gen.created, "status": status,
        "background": body.get("background") is True,
        "completed_at": gen.created if done and not plan.truncated else None,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if done and plan.truncated else None,
        "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
        "model": plan.model, "output": [_item(plan, gen, True)] if done else [],
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": body.get("previous_response_id"),
        "reasoning": {"effort": None, "summary": None}, "service_tier": "default",
        "store": body.get("store", True), "temperature": body.get("temperature", 1.0), "text": text,
        "tool_choice": body.get("tool_choice", "auto"), "tools": body.get("tools") or [],
        "top_p": body.get("top_p", 1.0), "truncation": "disabled",
        "usage": _usage(plan) if done else None, "user": None, "metadata": body.get("metadata") or {},
    }


def response_events(plan: TextPlan, gen: Gen, body: Json) -> Iterator[bytes]:
    """The documented event sequence, each event named and numbered."""
    seq = iter(range(1_000_000))

    def event(kind: str, **fields: Any) -> bytes:
        return sse({"type": kind, "sequence_number": next(seq), **fields}, kind)

    started = response_body(plan, gen, body, done=False)
    yield event("response.created", response=started)
    yield event("response.in_progress", response=started)
    where: Json = {"item_id": _item(plan, gen, False)["id"], "output_index": 0}
    yield event("response.output_item.added", output_index=0, item=_item(plan, gen, False))
    if plan.tool is not None:
        for fragment in plan.pieces[0]:
            yield event("response.function_call_arguments.delta", **where, delta=fragment)
        yield event("response.function_call_arguments.done", **where, name=plan.tool[0], arguments=plan.text)
    else:
        yield event("response.content_part.added", **where, content_index=0, part=_part(""))
        for token in plan.pieces[0]:
            yield event("response.output_text.delta", **where, content_index=0, delta=token, logprobs=[])
        yield event("response.output_text.done", **where, content_index=0, text=plan.text, logprobs=[])
        yield event("response.content_part.done", **where, content_index=0, part=_part(plan.text))
    yield event("response.output_item.done", output_index=0, item=_item(plan, gen, True))
    final = response_body(plan, gen, body)
    yield event("response.incomplete" if plan.truncated else "response.completed", response=final)
