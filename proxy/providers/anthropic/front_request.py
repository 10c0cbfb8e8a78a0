"""Anthropic Messages request → OpenAI chat-completions request (an Anthropic client, an OpenAI-compatible
upstream such as vLLM). Pure code over parsed JSON; untranslatable input raises TranslationError (→ 400).
`ANTHROPIC_REQUEST_FIELDS` records how every known Anthropic field is handled."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from proxy.providers.anthropic.request_to import FieldHandling, TranslationError
from proxy.providers.anthropic.strict import strict_schema

# Coverage table for docs/policy/translation.md; fields not listed are dropped (OpenAI rejects unknown fields).
ANTHROPIC_REQUEST_FIELDS: tuple[FieldHandling, ...] = (
    FieldHandling("model", "mapped", "copied as is"),
    FieldHandling("max_tokens", "mapped", "→ max_tokens (understood by OpenAI chat models, vLLM and TGI)"),
    FieldHandling(
        "messages", "mapped", "tool_result blocks → role tool messages placed first; images → image_url"
    ),
    FieldHandling("system", "mapped", "→ a leading system message"),
    FieldHandling("temperature", "mapped", "copied (Anthropic's 0..1 is inside OpenAI's 0..2)"),
    FieldHandling("top_p", "mapped", "copied"),
    FieldHandling("stop_sequences", "mapped", "→ stop"),
    FieldHandling("stream", "mapped", "→ stream, with stream_options.include_usage so usage can be reported"),
    FieldHandling(
        "tools", "mapped",
        "custom tools → function tools (`strict` → `strict: true` where faithful); server tools (web search, "
        "bash…) rejected",
    ),
    FieldHandling("tool_choice", "mapped", "auto/none/any→required/{tool}→{function}"),
    FieldHandling("metadata", "mapped", "user_id → user"),
    FieldHandling(
        "output_config", "mapped", "format json_schema → response_format json_schema, `strict: true` where "
        "faithful; effort dropped"
    ),
    FieldHandling("mcp_servers", "rejected", "any value: MCP connectors run on Anthropic's side"),
    FieldHandling("container", "rejected", "any value: code-execution containers are Anthropic's"),
    FieldHandling("top_k", "dropped", "OpenAI rejects it; vLLM users can set it server-side"),
    FieldHandling("thinking", "dropped", "the upstream model reasons (or not) on its own terms"),
    FieldHandling("cache_control", "dropped", "prompt caching is automatic on OpenAI-compatible servers"),
    FieldHandling("service_tier", "dropped", "tiers differ; the upstream's default applies"),
    FieldHandling("context_management", "dropped", "Anthropic-side context editing"),
    FieldHandling("inference_geo", "dropped", "Anthropic-side placement"),
    FieldHandling("speed", "dropped", "Anthropic-side option"),
)


def _text_of_blocks(blocks: list[Any], where: str) -> str:
    parts: list[str] = []
    for j, block in enumerate(blocks):
        if (
            not isinstance(block, Mapping)
            or block.get("type") != "text"
            or not isinstance(block.get("text"), str)
        ):
            raise TranslationError("only text blocks are supported here", param=f"{where}[{j}]")
        parts.append(block["text"])
    return "\n".join(parts)


def _image_part(block: Mapping[str, Any], where: str) -> dict[str, Any]:
    source = block.get("source")
    kind = source.get("type") if isinstance(source, Mapping) else None
    if isinstance(source, Mapping) and kind == "base64":
        url = f"data:{source.get('media_type')};base64,{source.get('data')}"
    elif isinstance(source, Mapping) and kind == "url":
        url = str(source.get("url"))
    else:
        raise TranslationError(
            "image sources must be base64 or url for OpenAI models", param=f"{where}.source"
        )
    return {"type": "image_url", "image_url": {"url": url}}


def _document_part(block: Mapping[str, Any], where: str) -> dict[str, Any]:
    source = block.get("source")
    kind = source.get("type") if isinstance(source, Mapping) else None
    if isinstance(source, Mapping) and kind == "text":
        return {"type": "text", "text": str(source.get("data", ""))}
    if isinstance(source, Mapping) and kind == "base64" and source.get("media_type") == "application/pdf":
        data = f"data:application/pdf;base64,{source.get('data')}"
        return {"type": "file", "file": {"filename": "document.pdf", "file_data": data}}
    raise TranslationError(
        "documents must be plain text or base64 PDF for OpenAI models", param=f"{where}.source"
    )


def _user_part(block: Mapping[str, Any], where: str) -> dict[str, Any]:
    kind = block.get("type")
    if kind == "text":
        return {"type": "text", "text": block.get("text")}
    if kind == "image":
        return _image_part(block, where)
    if kind == "document":
        return _document_part(block, where)
    raise TranslationError(
        f"content block type {kind!r} is not supported for OpenAI models", param=f"{where}.type"
    )


def _tool_result(block: Mapping[str, Any], where: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """→ (OpenAI tool message, image parts that must travel in a following user message).

    OpenAI tool messages carry text only; `is_error` has no equivalent and is dropped."""
    content = block.get("content", "")
    images: list[dict[str, Any]] = []
    if isinstance(content, list):
        texts = []
        for j, item in enumerate(content):
            if isinstance(item, Mapping) and item.get("type") == "image":
                images.append(_image_part(item, f"{where}.content[{j}]"))
            else:
                texts.append(item)
        content = _text_of_blocks(texts, f"{where}.content")
    elif not isinstance(content, str):
        raise TranslationError(
            "tool_result content must be a string or a list of blocks", param=f"{where}.content"
        )
    return {"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": content}, images


def _user_messages(content: object, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    if not isinstance(content, list):
        raise TranslationError("content must be a string or a list of blocks", param=f"{where}.content")
    tool_messages: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        at = f"{where}.content[{j}]"
        if not isinstance(block, Mapping):
            raise TranslationError("content blocks must be objects", param=at)
        if block.get("type") == "tool_result":
            message, images = _tool_result(block, at)
            tool_messages.append(message)
            parts.extend(images)
        else:
            parts.append(_user_part(block, at))
    # OpenAI wants the tool answers right after the assistant's tool_calls, before any new user text.
    if parts:
        tool_messages.append({"role": "user", "content": parts})
    return tool_messages


def _assistant_message(content: object, where: str) -> dict[str, Any]:
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    if not isinstance(content, list):
        raise TranslationError("content must be a string or a list of blocks", param=f"{where}.content")
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        kind = block.get("type") if isinstance(block, Mapping) else None
        if kind == "text" and isinstance(block, Mapping):
            texts.append(str(block.get("text", "")))
        elif kind == "tool_use" and isinstance(block, Mapping):
            arguments = orjson.dumps(block.get("input") or {}).decode()
            function = {"name": block.get("name"), "arguments": arguments}
            calls.append({"id": block.get("id"), "type": "function", "function": function})
        elif kind not in ("thinking", "redacted_thinking"):  # reasoning is not replayed to another model
            raise TranslationError(
                f"assistant block type {kind!r} is not supported", param=f"{where}.content[{j}]"
            )
    # OpenAI wants content null beside tool_calls, and a string otherwise
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts or not calls else None}
    if calls:
        message["tool_calls"] = calls
    return message


def _messages(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    system = body.get("system")
    if isinstance(system, str) and system:
        out.append({"role": "system", "content": system})
    elif isinstance(system, list) and system:
        out.append({"role": "system", "content": _text_of_blocks(system, "system")})
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise TranslationError("messages must be a list", param="messages")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        role = message.get("role") if isinstance(message, Mapping) else None
        if role == "user" and isinstance(message, Mapping):
            out.extend(_user_messages(message.get("content"), where))
        elif role == "assistant" and isinstance(message, Mapping):
            out.append(_assistant_message(message.get("content"), where))
        else:
            raise TranslationError("messages must have role user or assistant", param=f"{where}.role")
    return out


def _tools(tools: object) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise TranslationError("tools must be a list", param="tools")
    out: list[dict[str, Any]] = []
    for i, tool in enumerate(tools):
        if (
            not isinstance(tool, Mapping)
            or tool.get("type", "custom") != "custom"
            or "input_schema" not in tool
        ):
            raise TranslationError(
                "only custom tools with an input_schema are supported", param=f"tools[{i}]"
            )
        function: dict[str, Any] = {"name": tool.get("name"), "parameters": tool["input_schema"]}
        if tool.get("description"):
            function["description"] = tool["description"]
        if tool.get("strict") is True:  # strict tool use: arguments always match input_schema
            _strict(function, "parameters")
        out.append({"type": "function", "function": function})
    return out


def _strict(spec: dict[str, Any], field: str) -> None:
    """`strict: true` with the schema in OpenAI's strict form, when that keeps every guarantee; else the
    schema is left as the client wrote it, without `strict` (proxy/providers/anthropic/strict.py)."""
    tight = strict_schema(spec[field])
    if tight is not None:
        spec[field] = tight
        spec["strict"] = True


def _tool_choice(choice: object, out: dict[str, Any]) -> None:
    if choice is None:
        return
    kind = choice.get("type") if isinstance(choice, Mapping) else None
    if not isinstance(choice, Mapping) or kind not in ("auto", "any", "tool", "none"):
        raise TranslationError("tool_choice.type must be auto, any, tool or none", param="tool_choice")
    if kind == "tool":
        out["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
    else:
        out["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[kind]
    if choice.get("disable_parallel_tool_use") and kind != "none":
        out["parallel_tool_calls"] = False


def anthropic_to_openai_chat(body: Mapping[str, Any]) -> dict[str, Any]:
    """Translate an Anthropic Messages request body into an OpenAI chat-completions request body."""
    for field in ("mcp_servers", "container"):
        if body.get(field) is not None:
            raise TranslationError(f"{field} is not supported for OpenAI-compatible models", param=field)
    out: dict[str, Any] = {"model": body.get("model"), "messages": _messages(body)}
    if body.get("max_tokens") is not None:
        out["max_tokens"] = body["max_tokens"]
    for field in ("temperature", "top_p"):
        if body.get(field) is not None:
            out[field] = body[field]
    stop = body.get("stop_sequences")
    if stop:
        out["stop"] = stop
    if body.get("tools"):
        out["tools"] = _tools(body["tools"])
        _tool_choice(body.get("tool_choice"), out)
    config = body.get("output_config")
    fmt = config.get("format") if isinstance(config, Mapping) else None
    if isinstance(fmt, Mapping) and fmt.get("type") == "json_schema":
        spec = {"name": "output", "schema": fmt.get("schema")}
        _strict(spec, "schema")  # Anthropic enforces the schema: so must the upstream, where it can
        out["response_format"] = {"type": "json_schema", "json_schema": spec}
    metadata = body.get("metadata")
    user = metadata.get("user_id") if isinstance(metadata, Mapping) else None
    if isinstance(user, str) and user:
        out["user"] = user
    if body.get("stream"):
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    elif body.get("stream") is not None:
        out["stream"] = body["stream"]
    return out
