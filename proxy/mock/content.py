"""Pure builders for the mock upstream: deterministic tokens, OpenAI and Anthropic bodies, stream
events and request validation. No I/O: ids and the clock come in as `Gen`, and nothing here
depends on the fault RNG, so the same request always yields the same content."""

from __future__ import annotations

import base64
import hashlib
import math
import random
import sys
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson

Json = dict[str, Any]
FINGERPRINT = "fp_signalbox_mock"
DONE = b"data: [DONE]\n\n"
MAX_EMBED_INPUTS = 2048
MAX_DIMENSIONS = 8192


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
    """A deterministic arguments object that fits the tool's JSON schema at a shallow level."""
    props = schema.get("properties") if isinstance(schema, dict) else None
    if not isinstance(props, dict) or not props:
        return {"input": prompt[:80] or "mock"}
    words = prompt.split() or ["mock"]
    out: Json = {}
    for i, (name, spec) in enumerate(props.items()):
        spec = spec if isinstance(spec, dict) else {}
        kind = spec.get("type")
        if isinstance(kind, list):
            kind = next((k for k in kind if k != "null"), None)
        enum = spec.get("enum")
        if isinstance(enum, list) and enum:
            out[name] = enum[0]
        else:
            defaults: Json = {"integer": i + 1, "number": i + 0.5, "boolean": True, "array": [], "object": {}}
            out[name] = defaults.get(kind, words[i % len(words)]) if isinstance(kind, str) else words[0]
    return out


def _pos_int(body: Json, name: str, required: bool = False) -> int | None:
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


# --- embeddings -----------------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def normalise_inputs(value: Any, param: str) -> list[str | list[int]]:
    """string | list[str] | list[int] (one token array) | list[list[int]] → one item per input."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(_is_int(v) for v in value):
            return [list(value)]
        if all(isinstance(v, str) for v in value):
            return list(value)
        if all(isinstance(v, list) and all(_is_int(t) for t in v) for v in value):
            return [list(v) for v in value]
    raise InvalidRequest(
        f"'{param}' must be a string, an array of strings, a token array or an array of token arrays", param
    )


def embed_vector(item: str | list[int], dim: int) -> array[float]:
    """A unit-length float32 vector seeded by sha256 of the input alone (batch position never matters)."""
    key = ("s:" + item) if isinstance(item, str) else "t:" + ",".join(map(str, item))
    rng = random.Random(hashlib.sha256(key.encode()).digest())
    raw = [rng.uniform(-1.0, 1.0) for _ in range(dim)]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return array("f", [x / norm for x in raw])


def embeddings_response(body: Json, default_dim: int) -> Json:
    model = require_field(body, "model", str)
    items = normalise_inputs(body.get("input"), "input")
    if len(items) > MAX_EMBED_INPUTS:
        raise InvalidRequest(f"'input' must have at most {MAX_EMBED_INPUTS} items", "input")
    for i, item in enumerate(items):
        if len(item) == 0:
            raise InvalidRequest(f"'$.input' is invalid: the input at index {i} is empty", "input")
    dim = _pos_int(body, "dimensions") or default_dim
    if dim > MAX_DIMENSIONS:
        raise InvalidRequest(f"'dimensions' must be at most {MAX_DIMENSIONS}", "dimensions")
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise InvalidRequest("'encoding_format' must be 'float' or 'base64'", "encoding_format")
    data: list[Json] = []
    for i, item in enumerate(items):
        vec = embed_vector(item, dim)
        if fmt == "base64":
            if sys.byteorder == "big":
                vec.byteswap()  # the wire format is little-endian float32
            encoded: str | list[float] = base64.b64encode(vec.tobytes()).decode()
        else:
            encoded = vec.tolist()
        data.append({"object": "embedding", "index": i, "embedding": encoded})
    tokens = sum(estimate_tokens(it) if isinstance(it, str) else len(it) for it in items)
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


# --- OpenAI chat and legacy completions ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TextPlan:
    """What a chat / completion / message request will produce, decided before any byte is sent."""

    model: str
    prompt_tokens: int
    pieces: tuple[tuple[str, ...], ...]  # per choice: content tokens, or tool-argument fragments
    finish: str
    include_usage: bool = False
    tool: tuple[str, str, Json] | None = None  # (name, call id, arguments)

    @property
    def completion_tokens(self) -> int:
        return sum(len(p) for p in self.pieces)


def _limited(n: int, limit: int | None, stop: str, length: str) -> tuple[int, str]:
    return (limit, length) if limit is not None and limit < n else (n, stop)


def _include_usage(body: Json) -> bool:
    opts = body.get("stream_options")
    return bool(body.get("stream")) and isinstance(opts, dict) and opts.get("include_usage") is True


def _pick_tool(tools: Any, choice: Any, anthropic: bool) -> tuple[str, Any] | None:
    """The tool to call: the one tool_choice names, else the first; None when tools are off."""
    if not isinstance(tools, list) or choice in ("none", {"type": "none"}):
        return None
    specs = [t if anthropic else t.get("function") for t in tools if isinstance(t, dict)]
    named = [(s["name"], s.get("input_schema" if anthropic else "parameters")) for s in specs
             if isinstance(s, dict) and isinstance(s.get("name"), str)]
    if not named:
        return None
    if isinstance(choice, dict) and choice.get("type") in ("function", "tool"):
        want = choice.get("name") if anthropic else (choice.get("function") or {}).get("name")
        for name, schema in named:
            if name == want:
                return name, schema
        raise InvalidRequest(f"tool_choice names an unknown tool: {want!r}", "tool_choice")
    return named[0]


def plan_chat(body: Json, output_tokens: int, gen: Gen) -> TextPlan:
    model = require_field(body, "model", str)
    messages = require_field(body, "messages", list)
    texts = [m for m in messages if isinstance(m, dict)]
    prompt_tokens = estimate_tokens(" ".join(content_text(m.get("content")) for m in texts))
    users = [m for m in texts if m.get("role") == "user"] or texts
    prompt = content_text(users[-1].get("content")) if users else ""
    limit = min(filter(None, (_pos_int(body, "max_tokens"), _pos_int(body, "max_completion_tokens"))),
                default=None)
    picked = _pick_tool(body.get("tools"), body.get("tool_choice"), anthropic=False)
    usage = _include_usage(body)
    if picked is not None:
        args = tool_arguments(picked[1], prompt)
        frags = split_pieces(orjson.dumps(args).decode(), output_tokens)
        return TextPlan(model, prompt_tokens, (tuple(frags),), "tool_calls", usage,
                        (picked[0], f"call_{gen.rid}", args))
    n, finish = _limited(output_tokens, limit, "stop", "length")
    return TextPlan(model, prompt_tokens, (tuple(gen_tokens(prompt, n)),), finish, usage)


def chat_response(plan: TextPlan, gen: Gen) -> Json:
    message: Json = {"role": "assistant", "content": "".join(plan.pieces[0]), "refusal": None,
                     "annotations": []}
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


def plan_completion(body: Json, output_tokens: int) -> TextPlan:
    model = require_field(body, "model", str)
    items = normalise_inputs(body.get("prompt"), "prompt")
    prompts = [p if isinstance(p, str) else " ".join(map(str, p)) for p in items]
    n, finish = _limited(output_tokens, _pos_int(body, "max_tokens"), "stop", "length")
    pieces = tuple(tuple(gen_tokens(p, n)) for p in prompts)
    prompt_tokens = sum(estimate_tokens(p) for p in prompts)
    return TextPlan(model, prompt_tokens, pieces, finish, _include_usage(body))


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


# --- Anthropic Messages ---------------------------------------------------------------------------


def anthropic_input_tokens(body: Json) -> int:
    messages = require_field(body, "messages", list)
    texts = [content_text(body.get("system"))]
    texts += [content_text(m.get("content")) for m in messages if isinstance(m, dict)]
    return estimate_tokens(" ".join(texts))


def plan_messages(body: Json, output_tokens: int, gen: Gen) -> TextPlan:
    model = require_field(body, "model", str)
    limit = _pos_int(body, "max_tokens", required=True)
    input_tokens = anthropic_input_tokens(body)
    users = [m for m in body["messages"] if isinstance(m, dict) and m.get("role") == "user"]
    prompt = content_text(users[-1].get("content")) if users else ""
    picked = _pick_tool(body.get("tools"), body.get("tool_choice"), anthropic=True)
    if picked is not None:
        args = tool_arguments(picked[1], prompt)
        frags = split_pieces(orjson.dumps(args).decode(), output_tokens)
        tool = (picked[0], f"toolu_{gen.rid}", args)
        return TextPlan(model, input_tokens, (tuple(frags),), "tool_use", tool=tool)
    n, stop = _limited(output_tokens, limit, "end_turn", "max_tokens")
    return TextPlan(model, input_tokens, (tuple(gen_tokens(prompt, n)),), stop)


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
        block = {"type": "text", "text": "".join(plan.pieces[0])}
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
