"""OpenAI chat completions and legacy completions: plans, bodies and `chat.completion.chunk` events.
Honours `response_format` (json_object, json_schema) and ends a tool loop once the conversation ends
with the tool's result."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson

from proxy.mock.content import (
    DONE,
    FINGERPRINT,
    UNKNOWN_TOOL,
    Gen,
    InvalidRequest,
    Json,
    TextPlan,
    content_text,
    decide_tool,
    estimate_tokens,
    format_from,
    gen_tokens,
    include_usage,
    openai_usage,
    plan_text,
    plan_tool,
    pos_int,
    require_field,
    sse,
    with_prompt_schema,
)
from proxy.mock.embeddings import normalise_inputs


def chat_tools(body: Json) -> tuple[list[tuple[str, Any]], str, str | None]:
    """(name, parameters) of each function tool, the mode and the tool a `tool_choice` names."""
    tools = body.get("tools")
    specs = [t.get("function") for t in tools if isinstance(t, dict)] if isinstance(tools, list) else []
    named = [(s["name"], s.get("parameters")) for s in specs if isinstance(s, dict) and isinstance(s.get("name"), str)]
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        function = choice.get("function")
        wanted = function.get("name") if isinstance(function, dict) else None
        if not isinstance(wanted, str):
            raise InvalidRequest("'tool_choice.function.name' is required", "tool_choice")
        return named, "required", wanted
    return named, choice if choice in ("none", "required") else "auto", None


def trailing_results(messages: list[Json]) -> list[str] | None:
    """Names of the tools whose results end the conversation (role `tool`, or legacy `function`)."""
    calls: dict[str, str] = {}
    for message in messages:
        for call in message.get("tool_calls") or ():
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and isinstance(call.get("id"), str):
                calls[call["id"]] = str(function.get("name", UNKNOWN_TOOL))
    names: list[str] = []
    for message in reversed(messages):
        if message.get("role") == "tool":
            names.append(calls.get(str(message.get("tool_call_id")), UNKNOWN_TOOL))
        elif message.get("role") == "function":
            names.append(str(message.get("name", UNKNOWN_TOOL)))
        else:
            break
    return names or None


def plan_chat(body: Json, output_tokens: int, gen: Gen) -> TextPlan:
    model = require_field(body, "model", str)
    messages = [m for m in require_field(body, "messages", list) if isinstance(m, dict)]
    prompt_tokens = estimate_tokens(" ".join(content_text(m.get("content")) for m in messages))
    users = [m for m in messages if m.get("role") == "user"] or messages
    prompt = content_text(users[-1].get("content")) if users else ""
    limit = min(filter(None, (pos_int(body, "max_tokens"), pos_int(body, "max_completion_tokens"))),
                default=None)
    usage = include_usage(body)
    tools, mode, wanted = chat_tools(body)
    picked = decide_tool(tools, mode, wanted, trailing_results(messages))
    if picked is not None:
        return plan_tool(model, prompt_tokens, prompt, output_tokens, picked, f"call_{gen.rid}", "tool_calls", usage)
    fmt = format_from(body.get("response_format"), "response_format", nested_schema=True)
    fmt = with_prompt_schema(fmt, (content_text(m.get("content")) for m in messages))
    return plan_text(model, prompt_tokens, prompt, output_tokens, limit, fmt, ("stop", "length"), usage)


def chat_response(plan: TextPlan, gen: Gen) -> Json:
    message: Json = {"role": "assistant", "content": plan.text, "refusal": None, "annotations": []}
    if plan.tool is not None:
        name, call_id, args = plan.tool
        message["content"] = None
        message["tool_calls"] = [{"id": call_id, "type": "function",
                                  "function": {"name": name, "arguments": orjson.dumps(args).decode()}}]
    return {
        "id": f"chatcmpl-{gen.rid}", "object": "chat.completion", "created": gen.created, "model": plan.model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": plan.finish}],
        "usage": openai_usage(plan.prompt_tokens, plan.completion_tokens),
        "service_tier": "default", "system_fingerprint": FINGERPRINT,
    }


def chat_events(plan: TextPlan, gen: Gen) -> Iterator[bytes]:
    """chat.completion.chunk events: role chunk, one delta per token/fragment, finish, [usage], DONE."""
    base: Json = {"id": f"chatcmpl-{gen.rid}", "object": "chat.completion.chunk", "created": gen.created,
                  "model": plan.model, "service_tier": "default", "system_fingerprint": FINGERPRINT}
    if plan.include_usage:
        base["usage"] = None

    def chunk(delta: Json, finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return sse({**base, "choices": [choice]})

    if plan.tool is not None:
        head = {"index": 0, "id": plan.tool[1], "type": "function",
                "function": {"name": plan.tool[0], "arguments": ""}}
        yield chunk({"role": "assistant", "content": None, "tool_calls": [head]})
        for frag in plan.pieces[0]:
            yield chunk({"tool_calls": [{"index": 0, "function": {"arguments": frag}}]})
    else:
        yield chunk({"role": "assistant", "content": "", "refusal": None})
        for token in plan.pieces[0]:
            yield chunk({"content": token})
    yield chunk({}, plan.finish)
    if plan.include_usage:
        yield sse({**base, "choices": [], "usage": openai_usage(plan.prompt_tokens, plan.completion_tokens)})
    yield DONE


# --- legacy completions ---------------------------------------------------------------------------


def plan_completion(body: Json, output_tokens: int) -> TextPlan:
    model = require_field(body, "model", str)
    items = normalise_inputs(body.get("prompt"), "prompt")
    prompts = [p if isinstance(p, str) else " ".join(map(str, p)) for p in items]
    limit = pos_int(body, "max_tokens")
    n, finish = (limit, "length") if limit is not None and limit < output_tokens else (output_tokens, "stop")
    pieces = tuple(tuple(gen_tokens(p, n)) for p in prompts)
    prompt_tokens = sum(estimate_tokens(p) for p in prompts)
    return TextPlan(model, prompt_tokens, pieces, finish, include_usage(body))


def completion_response(plan: TextPlan, gen: Gen) -> Json:
    choices = [{"text": "".join(p), "index": i, "logprobs": None, "finish_reason": plan.finish}
               for i, p in enumerate(plan.pieces)]
    return {"id": f"cmpl-{gen.rid}", "object": "text_completion", "created": gen.created, "model": plan.model,
            "choices": choices, "usage": openai_usage(plan.prompt_tokens, plan.completion_tokens),
            "system_fingerprint": FINGERPRINT}


def completion_events(plan: TextPlan, gen: Gen) -> Iterator[bytes]:
    base: Json = {"id": f"cmpl-{gen.rid}", "object": "text_completion", "created": gen.created,
                  "model": plan.model, "system_fingerprint": FINGERPRINT}
    if plan.include_usage:
        base["usage"] = None

    def chunk(i: int, text: str, finish: str | None = None) -> bytes:
        choice = {"text": text, "index": i, "logprobs": None, "finish_reason": finish}
        return sse({**base, "choices": [choice]})

    for j in range(len(plan.pieces[0])):
        for i, pieces in enumerate(plan.pieces):
            yield chunk(i, pieces[j])
    for i in range(len(plan.pieces)):
        yield chunk(i, "", plan.finish)
    if plan.include_usage:
        yield sse({**base, "choices": [], "usage": openai_usage(plan.prompt_tokens, plan.completion_tokens)})
    yield DONE
