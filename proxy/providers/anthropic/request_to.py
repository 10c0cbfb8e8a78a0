"""OpenAI chat-completions request → Anthropic Messages request (an OpenAI client, an Anthropic upstream).
Pure code over parsed JSON. Whatever cannot be expressed raises TranslationError (the caller answers 400);
`OPENAI_REQUEST_FIELDS` records how every known OpenAI field is handled."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

import orjson


class TranslationError(ValueError):
    """The request cannot be translated faithfully; `param` names the offending field (OpenAI's `param`)."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class FieldHandling(NamedTuple):
    field: str
    action: Literal["mapped", "dropped", "rejected"]
    note: str


# Coverage table for docs/policy/translation.md. "rejected" means: rejected when the value asks for something Anthropic
# cannot do (the note says which values); harmless values of the same field are accepted and dropped.
# Fields not listed here are dropped too: Anthropic answers 400 to unknown top-level fields.
OPENAI_REQUEST_FIELDS: tuple[FieldHandling, ...] = (
    FieldHandling("model", "mapped", "copied as is"),
    FieldHandling(
        "messages", "mapped", "system/developer → `system`; same-role runs merged; tool → tool_result"
    ),
    FieldHandling("max_completion_tokens", "mapped", "→ max_tokens (preferred over max_tokens)"),
    FieldHandling(
        "max_tokens", "mapped",
        "→ max_tokens; when both are absent, the route's tokens.default_max_tokens if the policy sets it, else 4096",
    ),
    FieldHandling(
        "temperature", "mapped", "clamped to Anthropic's 0..1 (OpenAI allows up to 2); not rescaled"
    ),
    FieldHandling("top_p", "mapped", "copied"),
    FieldHandling("top_k", "mapped", "copied (a vLLM extension that Anthropic also has)"),
    FieldHandling("stop", "mapped", "→ stop_sequences (a string becomes a one-item list)"),
    FieldHandling("stream", "mapped", "copied"),
    FieldHandling("stream_options", "dropped", "include_usage is honoured by the stream translator"),
    FieldHandling(
        "tools", "mapped", "function tools → {name, description, input_schema}; other kinds rejected"
    ),
    FieldHandling(
        "tool_choice", "mapped", "auto/none/required→any/{function}→{tool}; allowed_tools rejected"
    ),
    FieldHandling("parallel_tool_calls", "mapped", "false → tool_choice.disable_parallel_tool_use"),
    FieldHandling("user", "mapped", "→ metadata.user_id"),
    FieldHandling("safety_identifier", "mapped", "→ metadata.user_id when `user` is absent"),
    FieldHandling(
        "response_format", "mapped", "json_schema → output_config.format; json_object/text dropped"
    ),
    FieldHandling("n", "rejected", "n > 1: Anthropic returns one choice"),
    FieldHandling("logprobs", "rejected", "true: Anthropic has no log probabilities"),
    FieldHandling("top_logprobs", "rejected", "any value: Anthropic has no log probabilities"),
    FieldHandling("logit_bias", "rejected", "non-empty: Anthropic cannot ban or boost tokens"),
    FieldHandling("audio", "rejected", "any value: no audio output"),
    FieldHandling("modalities", "rejected", "anything other than text"),
    FieldHandling("web_search_options", "rejected", "any value: needs Anthropic's server tool, not mapped"),
    FieldHandling("functions", "rejected", "deprecated; send `tools`"),
    FieldHandling("function_call", "rejected", "deprecated; send `tool_choice`"),
    FieldHandling("frequency_penalty", "dropped", "sampling hint with no equivalent"),
    FieldHandling("presence_penalty", "dropped", "sampling hint with no equivalent"),
    FieldHandling("seed", "dropped", "best-effort determinism only, even on OpenAI"),
    FieldHandling("reasoning_effort", "dropped", "extended thinking needs a token budget; not guessed"),
    FieldHandling("verbosity", "dropped", "no equivalent"),
    FieldHandling("service_tier", "dropped", "tiers differ; the upstream's default applies"),
    FieldHandling("store", "dropped", "OpenAI-side storage"),
    FieldHandling("metadata", "dropped", "OpenAI stored-completion tags, not Anthropic metadata"),
    FieldHandling("prediction", "dropped", "a latency optimisation only"),
    FieldHandling("prompt_cache_key", "dropped", "OpenAI cache routing hint"),
)


def include_usage_requested(body: Mapping[str, Any]) -> bool:
    """Whether an OpenAI streaming request asked for the final usage chunk."""
    options = body.get("stream_options")
    return isinstance(options, Mapping) and bool(options.get("include_usage"))


def _reject_unsupported(body: Mapping[str, Any]) -> None:
    n = body.get("n")
    if n is not None and n != 1:
        raise TranslationError(
            "n > 1 is not supported by Anthropic models: send one request per choice", param="n"
        )
    if body.get("logprobs"):
        raise TranslationError("logprobs are not supported by Anthropic models", param="logprobs")
    if body.get("top_logprobs") is not None:
        raise TranslationError("top_logprobs is not supported by Anthropic models", param="top_logprobs")
    if body.get("logit_bias"):
        raise TranslationError("logit_bias is not supported by Anthropic models", param="logit_bias")
    if body.get("audio") is not None:
        raise TranslationError("audio output is not supported by Anthropic models", param="audio")
    modalities = body.get("modalities")
    if modalities is not None and list(modalities) != ["text"]:
        raise TranslationError("only the text modality is supported by Anthropic models", param="modalities")
    for field in ("web_search_options", "functions", "function_call"):
        if body.get(field) is not None:
            raise TranslationError(f"{field} is not supported for Anthropic models", param=field)


def _image_block(part: Mapping[str, Any], where: str) -> dict[str, Any]:
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, Mapping) else image
    if not isinstance(url, str):
        raise TranslationError("image_url.url must be a string", param=f"{where}.image_url.url")
    if url.startswith("data:"):
        header, sep, data = url[5:].partition(",")
        media_type, _, encoding = header.partition(";")
        if not sep or encoding != "base64" or not media_type:
            raise TranslationError("image data URLs must be base64 encoded", param=f"{where}.image_url.url")
        return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
    if url.startswith(("https://", "http://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise TranslationError("image_url.url must be a data: or http(s) URL", param=f"{where}.image_url.url")


def _file_block(part: Mapping[str, Any], where: str) -> dict[str, Any]:
    file = part.get("file")
    data = file.get("file_data") if isinstance(file, Mapping) else None
    if isinstance(data, str) and data.startswith("data:application/pdf;base64,"):
        source = {"type": "base64", "media_type": "application/pdf", "data": data.partition(",")[2]}
        return {"type": "document", "source": source}
    raise TranslationError("only inline base64 PDF files are supported for Anthropic models", param=where)


def _text_block(part: Mapping[str, Any], where: str) -> dict[str, Any]:
    text = part.get("text")
    if not isinstance(text, str):
        raise TranslationError("text parts need a string `text`", param=f"{where}.text")
    block: dict[str, Any] = {"type": "text", "text": text}
    if "cache_control" in part:  # clients written for Anthropic-backed gateways send it; keep it
        block["cache_control"] = part["cache_control"]
    return block


def _content_blocks(content: object, where: str, *, allow: frozenset[str]) -> list[dict[str, Any]]:
    """OpenAI message content (str, None or a list of parts) → Anthropic content blocks."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise TranslationError("content must be a string or a list of parts", param=f"{where}.content")
    blocks: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind not in allow or not isinstance(part, Mapping):
            raise TranslationError(f"content part type {kind!r} is not supported here", param=f"{at}.type")
        if kind in ("text", "refusal"):
            text_part = part if kind == "text" else {"text": part.get("refusal")}
            blocks.append(_text_block(text_part, at))
        elif kind == "image_url":
            blocks.append(_image_block(part, at))
        else:
            blocks.append(_file_block(part, at))
    return blocks


_USER_PARTS = frozenset({"text", "image_url", "file"})
_ASSISTANT_PARTS = frozenset({"text", "refusal"})
_SYSTEM_PARTS = frozenset({"text"})


def _tool_use_blocks(calls: object, where: str) -> list[dict[str, Any]]:
    if calls is None:
        return []
    if not isinstance(calls, list):
        raise TranslationError("tool_calls must be a list", param=f"{where}.tool_calls")
    blocks: list[dict[str, Any]] = []
    for j, call in enumerate(calls):
        at = f"{where}.tool_calls[{j}]"
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(call, Mapping) or not isinstance(function, Mapping):
            raise TranslationError("tool calls need a `function` object", param=at)
        arguments = function.get("arguments") or "{}"  # "" is what some clients send for no-argument calls
        try:
            parsed = orjson.loads(arguments)
        except (orjson.JSONDecodeError, TypeError):
            raise TranslationError(
                "function.arguments is not valid JSON", param=f"{at}.function.arguments"
            ) from None
        if not isinstance(parsed, dict):
            raise TranslationError(
                "function.arguments must be a JSON object", param=f"{at}.function.arguments"
            )
        blocks.append(
            {"type": "tool_use", "id": call.get("id"), "name": function.get("name"), "input": parsed}
        )
    return blocks


def _tool_result_block(message: Mapping[str, Any], where: str) -> dict[str, Any]:
    tool_call_id = message.get("tool_call_id")
    if not isinstance(tool_call_id, str):
        raise TranslationError("tool messages need a tool_call_id", param=f"{where}.tool_call_id")
    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": tool_call_id}
    content = message.get("content")
    if isinstance(content, list):
        block["content"] = _content_blocks(content, where, allow=_USER_PARTS)
    elif content:
        block["content"] = content if isinstance(content, str) else str(content)
    return block


def _translate_messages(messages: object) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """→ (system text blocks, alternating Anthropic messages). System/developer messages anywhere are
    hoisted to the top-level `system`; Anthropic has no mid-conversation system turn."""
    if not isinstance(messages, list):
        raise TranslationError("messages must be a list", param="messages")
    system: list[dict[str, Any]] = []
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        role = message.get("role") if isinstance(message, Mapping) else None
        if not isinstance(message, Mapping):
            raise TranslationError("each message must be an object", param=where)
        if role in ("system", "developer"):
            system.extend(_content_blocks(message.get("content"), where, allow=_SYSTEM_PARTS))
            continue
        if role == "user":
            target, blocks = "user", _content_blocks(message.get("content"), where, allow=_USER_PARTS)
        elif role == "assistant":
            blocks = _content_blocks(message.get("content"), where, allow=_ASSISTANT_PARTS)
            target, blocks = "assistant", blocks + _tool_use_blocks(message.get("tool_calls"), where)
        elif role == "tool":
            target, blocks = "user", [_tool_result_block(message, where)]
        else:
            raise TranslationError(
                f"message role {role!r} is not supported for Anthropic models", param=f"{where}.role"
            )
        if not blocks and target == "assistant":
            continue  # OpenAI accepts an empty assistant turn, Anthropic rejects it: nothing is lost
        if out and out[-1]["role"] == target:  # Anthropic requires user/assistant alternation
            out[-1]["content"].extend(blocks)
        else:
            out.append({"role": target, "content": blocks})
    for message in out:  # the plain-text common case reads (and logs) better as a string
        blocks = message["content"]
        if len(blocks) == 1 and blocks[0].keys() == {"type", "text"}:
            message["content"] = blocks[0]["text"]
    return system, out


def _tools(tools: object) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise TranslationError("tools must be a list", param="tools")
    out: list[dict[str, Any]] = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if (
            not isinstance(tool, Mapping)
            or tool.get("type") != "function"
            or not isinstance(function, Mapping)
        ):
            raise TranslationError(
                "only function tools are supported for Anthropic models", param=f"tools[{i}]"
            )
        schema = function.get("parameters") or {"type": "object", "properties": {}}
        entry: dict[str, Any] = {"name": function.get("name"), "input_schema": schema}
        if function.get("description"):
            entry["description"] = function["description"]
        out.append(entry)
    return out


def _tool_choice(choice: object, parallel: object) -> dict[str, Any] | None:
    result: dict[str, Any] | None
    if choice is None:
        result = None
    elif choice in ("auto", "none"):
        result = {"type": choice}
    elif choice == "required":
        result = {"type": "any"}
    elif isinstance(choice, Mapping) and choice.get("type") == "function":
        function = choice.get("function")
        name = function.get("name") if isinstance(function, Mapping) else None
        if not isinstance(name, str):
            raise TranslationError("tool_choice.function.name must be a string", param="tool_choice")
        result = {"type": "tool", "name": name}
    else:
        raise TranslationError("this tool_choice is not supported for Anthropic models", param="tool_choice")
    if parallel is False and (result is None or result["type"] != "none"):
        result = {"type": "auto"} if result is None else result
        result["disable_parallel_tool_use"] = True
    return result


def _sampling(body: Mapping[str, Any], out: dict[str, Any]) -> None:
    temperature = body.get("temperature")
    if isinstance(temperature, int | float) and not isinstance(temperature, bool):
        out["temperature"] = min(temperature, 1)  # clamp, not rescale: 0.7 keeps meaning 0.7
    elif temperature is not None:
        out["temperature"] = temperature  # a wrong type: let the upstream's validation answer
    for field in ("top_p", "top_k"):
        if body.get(field) is not None:
            out[field] = body[field]
    stop = body.get("stop")
    if isinstance(stop, str):
        out["stop_sequences"] = [stop]
    elif isinstance(stop, list) and stop:
        out["stop_sequences"] = stop


def _response_format(value: object) -> dict[str, Any] | None:
    if not isinstance(value, Mapping) or value.get("type") != "json_schema":
        return None  # text, json_object: the prompt carries the JSON instruction; not enforced
    spec = value.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, Mapping) else None
    if not isinstance(schema, Mapping):
        raise TranslationError(
            "response_format.json_schema.schema must be an object", param="response_format"
        )
    return {"format": {"type": "json_schema", "schema": schema}}


def openai_chat_to_anthropic(body: Mapping[str, Any], *, default_max_tokens: int) -> dict[str, Any]:
    """Translate an OpenAI chat-completions request body into an Anthropic Messages request body."""
    _reject_unsupported(body)
    system, messages = _translate_messages(body.get("messages"))
    max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    out: dict[str, Any] = {
        "model": body.get("model"),
        "max_tokens": default_max_tokens if max_tokens is None else max_tokens,
        "messages": messages,
    }
    if system:
        plain = len(system) == 1 and system[0].keys() == {"type", "text"}
        out["system"] = system[0]["text"] if plain else system
    _sampling(body, out)
    if body.get("tools"):
        out["tools"] = _tools(body["tools"])
        choice = _tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"))
        if choice is not None:
            out["tool_choice"] = choice
    output_config = _response_format(body.get("response_format"))
    if output_config is not None:
        out["output_config"] = output_config
    user = body.get("user") or body.get("safety_identifier")
    if isinstance(user, str) and user:
        out["metadata"] = {"user_id": user}
    if body.get("stream") is not None:
        out["stream"] = body["stream"]
    return out
