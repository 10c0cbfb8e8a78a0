"""OpenAI embeddings: input normalisation and unit vectors seeded by each input alone."""

from __future__ import annotations

import base64
import hashlib
import math
import random
import sys
from array import array
from typing import Any

from proxy.mock.content import InvalidRequest, Json, estimate_tokens, pos_int, require_field

MAX_EMBED_INPUTS = 2048
MAX_DIMENSIONS = 8192



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
    dim = pos_int(body, "dimensions") or default_dim
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


