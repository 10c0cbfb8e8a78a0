"""Pure building blocks shared by the mock's endpoints: deterministic tokens, prompt text, request
validation, the answer plan (text, structured output or a tool call) and SSE framing. No I/O: ids and
the clock come in as `Gen`, and nothing here depends on the fault RNG, so the same request always
yields the same content."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson

from proxy.mock.structured import schema_value

Json = dict[str, Any]
FINGERPRINT = "fp_signalbox_mock"
DONE = b"data: [DONE]\n\n"
SCHEMA_SCAN_LIMIT = 64
"""JSON objects tried per message when looking for a schema in a JSON-mode prompt."""
UNKNOWN_TOOL = ""
"""The name of a tool result whose call is not in the conversation (e.g. it came with previous_response_id)."""


@dataclass(frozen=True, slots=True)
class Gen:
    """Per-request identity: a random hex id and the creation time, injected by the server."""

    rid: str
    created: int


class InvalidRequest(ValueError):
    """A request body the real API would reject with 400."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


# --- tokens and prompts ---------------------------------------------------------------------------


def estimate_tokens(text: str) -> int:
    """A cheap deterministic token estimate: words plus a quarter of the characters, at least 1."""
    return max(1, len(text.split()) + len(text) // 4)


def gen_tokens(prompt: str, n: int) -> list[str]:
    """`mock`, then the prompt's words cyclically, each with a leading space: exactly n tokens."""
    words = prompt.split() or ["mock"]
    return ["mock" if i == 0 else " " + words[(i - 1) % len(words)] for i in range(n)]


def content_text(content: Any, depth: int = 0) -> str:
    """Text of an OpenAI/Anthropic `content` (string or list of parts); nesting is capped."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or depth > 4:
        return ""
    parts: list[str] = []
    for part in content:
        if isinstance(part, str):
            parts.append(part)
        elif isinstance(part, dict):
            if isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif "content" in part:  # tool_result
                parts.append(content_text(part["content"], depth + 1))
            elif "input" in part:  # tool_use
                parts.append(orjson.dumps(part["input"]).decode())
    return " ".join(parts)


def split_pieces(text: str, k: int) -> list[str]:
    """Split text into at most k non-empty, contiguous pieces of near-equal size."""
    k = max(1, min(k, len(text)))
    bounds = [len(text) * i // k for i in range(k + 1)]
    return [text[bounds[i] : bounds[i + 1]] for i in range(k)]


def tool_arguments(schema: Any, prompt: str) -> Json:
    """A deterministic arguments object that validates against the tool's JSON schema."""
    if not isinstance(schema, dict) or not schema:
        return {"input": prompt[:80] or "mock"}  # a tool that declares nothing takes anything
    value = schema_value(schema, prompt.split())
    return value if isinstance(value, dict) else {}


def pos_int(body: Json, name: str, required: bool = False) -> int | None:
    value = body.get(name)
    if value is None:
        if required:
            raise InvalidRequest(f"{name}: Field required", name)
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidRequest(f"'{name}' must be a positive integer", name)
    return value


def require_field(body: Json, name: str, kind: type) -> Any:
    value = body.get(name)
    if not isinstance(value, kind):
        raise InvalidRequest(f"'{name}' is required and must be a {kind.__name__}", name)
    return value


def sse(obj: Json, event: str | None = None) -> bytes:
    head = b"event: " + event.encode() + b"\n" if event else b""
    return head + b"data: " + orjson.dumps(obj) + b"\n\n"


def openai_usage(prompt: int, completion: int) -> Json:
    done = {"reasoning_tokens": 0, "audio_tokens": 0, "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0}
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": done}


def include_usage(body: Json) -> bool:
    opts = body.get("stream_options")
    return bool(body.get("stream")) and isinstance(opts, dict) and opts.get("include_usage") is True


# --- the answer ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TextPlan:
    """What a chat / completion / message / response request will produce, decided before any byte is sent."""

    model: str
    prompt_tokens: int
    pieces: tuple[tuple[str, ...], ...]  # per choice: content tokens, or tool-argument fragments
    finish: str
    include_usage: bool = False
    tool: tuple[str, str, Json] | None = None  # (name, call id, arguments)
    truncated: bool = False
    """The output limit cut the answer short (finish is the protocol's `length`)."""

    @property
    def completion_tokens(self) -> int:
        return sum(len(p) for p in self.pieces)

    @property
    def text(self) -> str:
        return "".join(self.pieces[0])


@dataclass(frozen=True, slots=True)
class OutputFormat:
    """What the client asked the text to be: `json_object` (with a schema found in the prompt, if any), or
    `json_schema` with its schema."""

    kind: str
    schema: Any = None


def format_from(spec: Any, param: str, nested_schema: bool) -> OutputFormat | None:
    """`{"type": "text" | "json_object" | "json_schema", ...}`; chat nests the schema under `json_schema`,
    Responses and Anthropic put `schema` beside `type`. None means plain text."""
    if spec is None:
        return None
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return OutputFormat("json_object")
    if kind == "json_schema":
        holder = spec.get("json_schema") if nested_schema else spec
        if nested_schema and not isinstance(holder, dict):
            raise InvalidRequest(f"'{param}.json_schema' is required and must be an object", param)
        schema = holder.get("schema") if isinstance(holder, dict) else None
        if schema is not None and not isinstance(schema, dict):
            raise InvalidRequest(f"'{param}.schema' must be an object", param)
        return OutputFormat("json_schema", schema) if schema else OutputFormat("json_object")  # no schema: any object
    raise InvalidRequest(f"'{param}.type' must be 'text', 'json_object' or 'json_schema'", param)


def with_prompt_schema(fmt: OutputFormat | None, texts: Iterable[str]) -> OutputFormat | None:
    """JSON mode gives no schema, but clients that use it (instructor's JSON mode, LangChain's json_mode)
    put one in the prompt: the first JSON object in the messages that looks like a schema is used."""
    if fmt is None or fmt.kind != "json_object" or fmt.schema is not None:
        return fmt
    for text in texts:
        schema = _schema_in(text)
        if schema is not None:
            return OutputFormat("json_object", schema)
    return fmt


def _schema_in(text: str) -> Json | None:
    decoder = json.JSONDecoder()
    start = text.find("{")
    for _ in range(SCHEMA_SCAN_LIMIT):  # bounded: a mock, not a parser of arbitrary prompts
        if start < 0:
            return None
        try:
            value, end = decoder.raw_decode(text, start)
        except ValueError:
            start = text.find("{", start + 1)
            continue
        if isinstance(value, dict) and isinstance(value.get("properties"), dict):
            return value
        start = text.find("{", end if isinstance(value, dict) else start + 1)
    return None


def answer_text(prompt: str, n: int, fmt: OutputFormat | None) -> list[str]:
    """The answer in pieces: n prompt-echo tokens, or the structured value's JSON split into n pieces."""
    if fmt is None:
        return gen_tokens(prompt, n)
    if fmt.schema is None:
        value: Any = {"answer": "".join(gen_tokens(prompt, max(n, 1)))}
    else:
        value = schema_value(fmt.schema, prompt.split())
    return split_pieces(orjson.dumps(value).decode(), n)


def plan_text(model: str, prompt_tokens: int, prompt: str, n: int, limit: int | None, fmt: OutputFormat | None,
              finishes: tuple[str, str], usage: bool = False) -> TextPlan:
    """Text (or structured text) cut at `limit` pieces; finishes are the protocol's (stop, length)."""
    pieces = answer_text(prompt, n, fmt)
    if limit is not None and limit < len(pieces):
        return TextPlan(model, prompt_tokens, (tuple(pieces[:limit]),), finishes[1], usage, truncated=True)
    return TextPlan(model, prompt_tokens, (tuple(pieces),), finishes[0], usage)


def plan_tool(model: str, prompt_tokens: int, prompt: str, n: int, tool: tuple[str, Any], call_id: str,
              finish: str, usage: bool = False) -> TextPlan:
    args = tool_arguments(tool[1], prompt)
    frags = split_pieces(orjson.dumps(args).decode(), n)
    return TextPlan(model, prompt_tokens, (tuple(frags),), finish, usage, (tool[0], call_id, args))


def decide_tool(
    tools: list[tuple[str, Any]], mode: str, wanted: str | None, answered: Iterable[str] | None
) -> tuple[str, Any] | None:
    """The tool to call, or None to answer in text.

    `mode` is "none", "auto" or "required"; `wanted` a tool the client named in tool_choice; `answered`
    the names of the tool results the conversation ends with (UNKNOWN_TOOL where the call is not in
    it), or None when it does not end with results. Under "auto" a tool whose result was just given is
    not called again, so agent loops end. A forced choice is obeyed as the real APIs do: a named tool is
    always called; "required" calls the first tool whose result was not just given (an agent's output
    tool after its function tool, as pydantic-ai's loop expects), else the first.
    """
    if mode == "none" or not tools:
        return None
    if wanted is not None:
        for name, schema in tools:
            if name == wanted:
                return name, schema
        raise InvalidRequest(f"tool_choice names an unknown tool: {wanted!r}", "tool_choice")
    names = set(answered or ())
    if mode == "required":
        return next((tool for tool in tools if tool[0] not in names), tools[0])
    if answered is not None and (tools[0][0] in names or UNKNOWN_TOOL in names):
        return None
    return tools[0]
