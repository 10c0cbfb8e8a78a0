"""Token accounting for token limits (pure): the estimate reserved at admission and what a finished
request really cost (the relay records `call.usage`; outgoing asks a stream for it).

The estimate is deliberately cheap and errs high: about 4 bytes of request body per token (which
covers messages, tools and system prompts alike without walking them), inline media (images, audio,
files, documents) charged a flat amount instead of their base64 size, plus the most output the request
allows. Settlement with
the real `usage` corrects it either way, so it only needs to be the right order of magnitude.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from proxy.call import Call

BYTES_PER_TOKEN = 4
MEDIA_TOKENS = 1000
"""Flat estimate per media part (OpenAI charges an image 85 to ~1,500 tokens by size and detail; audio,
a PDF's pages and a file cost by their length, which the request does not tell cheaply). Base64 at
4 bytes a token would overcharge a 1 MB image as 250,000 tokens and refuse it under a token limit."""
# Chat Completions (image_url, input_audio, file), Responses (input_image, input_file, input_audio),
# Anthropic Messages (image, document).
_MEDIA_PARTS = frozenset(
    {"image_url", "image", "input_image", "input_audio", "file", "input_file", "document"}
)
_NO_OUTPUT_PATHS = frozenset({"/v1/embeddings", "/v1/moderations", "/v1/messages/count_tokens"})


def estimate(call: Call, default_max_tokens: int) -> int:
    """Tokens to reserve: prompt estimate (`prompt_estimate`, written out here: this runs for every request
    under a token limit) + the most output the request allows: max_completion_tokens, max_tokens or
    max_output_tokens (times `n` choices), else the default."""
    raw = call.raw_body
    body = call.body
    if body is None:
        return -(-len(raw) // BYTES_PER_TOKEN)
    if b'"type"' in raw or b"\\u" in raw:  # maybe a media part: walk (see `prompt_estimate`)
        prompt = walked_estimate(raw, body)
    else:
        prompt = -(-len(raw) // BYTES_PER_TOKEN)
    if call.path in _NO_OUTPUT_PATHS:
        return prompt
    # `x.__class__ is int`: a JSON integer, not a bool (parsed JSON holds no other int subclass). The three
    # names written out, not looped over.
    value = body.get("max_completion_tokens")
    if value.__class__ is not int or value < 0:
        value = body.get("max_tokens")
        if value.__class__ is not int or value < 0:
            value = body.get("max_output_tokens")
            if value.__class__ is not int or value < 0:
                value = default_max_tokens
    choices = body.get("n")
    if choices.__class__ is int and 1 < choices <= 128:
        value *= choices
    return prompt + value


def prompt_estimate(raw: bytes, body: Mapping[str, Any] | None) -> int:
    """About 4 bytes a token, media parts at a flat rate. `raw` is the JSON text of `body`."""
    if body is None or (b'"type"' not in raw and b"\\u" not in raw):
        # No object in the body has a `type` key (written plainly or with \u escapes), so no media part:
        # the walk below would find nothing (most text-only requests skip it).
        return -(-len(raw) // BYTES_PER_TOKEN)
    return walked_estimate(raw, body)


def walked_estimate(raw: bytes, body: Mapping[str, Any]) -> int:
    """`prompt_estimate` by walking the turns' content parts for media."""
    size = len(raw)
    media = 0
    for turns in (body.get("messages"), body.get("input")):
        if not isinstance(turns, list):  # `input` may be a plain string (Responses, embeddings)
            continue
        for turn in turns:
            content = turn.get("content") if isinstance(turn, dict) else None
            if not isinstance(content, list):
                continue
            for part in content:
                if isinstance(part, dict) and part.get("type") in _MEDIA_PARTS:
                    media += 1
                    size -= _inline_size(part)
    return math.ceil(max(0, size) / BYTES_PER_TOKEN) + media * MEDIA_TOKENS


def _inline_size(part: Mapping[str, Any]) -> int:
    """Bytes of a media part's inline payload (a data: URL, base64 `data` or `file_data`), two levels deep."""
    size = 0
    for value in part.values():
        if isinstance(value, str):
            size += len(value)
        elif isinstance(value, dict):
            size += sum(len(v) for v in value.values() if isinstance(v, str))
    return size


def used(usage: Mapping[str, Any] | None) -> int | None:
    """Total tokens from an OpenAI or Anthropic `usage` object, or None when it says nothing."""
    if not usage:
        return None
    total = usage.get("total_tokens")
    if isinstance(total, int):
        return total
    counted = [
        v
        for k in (
            "prompt_tokens",
            "completion_tokens",
            "input_tokens",
            "output_tokens",
            "cache_creation_input_tokens",
            "cache_read_input_tokens",
        )
        if isinstance(v := usage.get(k), int)
    ]
    return sum(counted) if counted else None


def settle_amount(call: Call, reserved: int) -> int:
    """What a finished request really cost: its `usage` when the upstream reported one; nothing when
    it never reached the upstream or the upstream refused it; else (an interrupted stream) the estimate."""
    if not reserved and call.usage is None:
        return 0
    if not call.attempts:
        return 0
    real = used(call.usage)
    if real is not None:
        return real
    if call.status >= 400 or call.attempts[-1].status == 0:
        return 0
    return reserved


def attempt_amount(reserved: int, status: int, usage: Mapping[str, Any] | None) -> int:
    """What one upstream attempt really cost (an upstream's token limit, settled per attempt), as
    `settle_amount` judges a request: its `usage` when the response reported one; nothing when no answer
    came (`status` 0) or the upstream refused it (4xx/5xx); else (an interrupted stream) the estimate."""
    real = used(usage)
    if real is not None:
        return real
    if status == 0 or status >= 400:
        return 0
    return reserved
