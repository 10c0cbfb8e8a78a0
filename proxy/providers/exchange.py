"""Which translation a request needs, from the client's front and the upstream's protocol (pure).

Same protocol on both sides is a pass-through: bytes untouched, only non-OpenAI error shapes
(vLLM, TGI) normalised. OpenAI chat → Anthropic and Anthropic Messages → OpenAI-compatible are
translated with the state machines in this package. Anything else cannot be translated and is
refused up front with a 400 that says so.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import orjson

from proxy.policy.redact import EMPTY, Redactor
from proxy.providers.anthropic.front_request import anthropic_to_openai_chat
from proxy.providers.anthropic.front_response import openai_chat_to_anthropic_message
from proxy.providers.anthropic.front_stream import OpenAIToAnthropicStream
from proxy.providers.anthropic.request_to import (
    TranslationError,
    include_usage_requested,
    openai_chat_to_anthropic,
)
from proxy.providers.anthropic.response_from import anthropic_message_to_openai
from proxy.providers.anthropic.stream_from import AnthropicToOpenAIStream
from proxy.providers.errors_map import (
    anthropic_error_to_openai,
    normalise_anthropic_error,
    normalise_openai_compatible_error,
    openai_error_to_anthropic,
)

Kind = Literal["pass", "openai_to_anthropic", "anthropic_to_openai"]
DEFAULT_MAX_TOKENS = 4096


class Untranslatable(ValueError):
    """The client's endpoint has no equivalent on the route's upstream."""


@dataclass(frozen=True, slots=True)
class Exchange:
    kind: Kind
    upstream_path: str
    """Path appended to the upstream's base_url (which ends at its version segment)."""
    front: Literal["openai", "anthropic"]
    provider: str


def choose(front_path: str, provider: str) -> Exchange:
    front: Literal["openai", "anthropic"] = "anthropic" if front_path.startswith("/v1/messages") else "openai"
    suffix = front_path[3:]  # "/v1/chat/completions" -> "/chat/completions"
    if provider == "mock" or (provider == "anthropic") == (front == "anthropic"):
        return Exchange("pass", suffix, front, provider)
    if front == "openai" and front_path == "/v1/chat/completions":
        return Exchange("openai_to_anthropic", "/messages", front, provider)
    if front == "anthropic" and front_path == "/v1/messages":
        return Exchange("anthropic_to_openai", "/chat/completions", front, provider)
    raise Untranslatable(
        f"{front_path} cannot be served by an {provider} upstream: only chat completions and messages "
        "translate between the OpenAI and Anthropic protocols"
    )


def tool(path: str, prefix: str) -> Exchange:
    """A tool route's request (`provider: http`): the path past the route's prefix goes after the upstream's
    base_url as sent (percent-encoding, trailing slash and all); bytes pass both ways untouched."""
    return Exchange("pass", path[len(prefix):], "openai", "http")


def request_body(
    exchange: Exchange, body: Mapping[str, Any], model: str, default_max_tokens: int = DEFAULT_MAX_TOKENS
) -> bytes:
    """The upstream body for a translated exchange (raises TranslationError on untranslatable fields);
    `default_max_tokens` is sent to Anthropic when the OpenAI client set no maximum."""
    if exchange.kind == "openai_to_anthropic":
        out = openai_chat_to_anthropic(body, default_max_tokens=default_max_tokens)
    else:
        out = anthropic_to_openai_chat(body)
    out["model"] = model
    return orjson.dumps(out)


def response_body(
    exchange: Exchange, status: int, raw: bytes, model: str, created: int, redact: Redactor = EMPTY
) -> tuple[int, bytes]:
    """Translate a whole response (success or error) into the client's protocol. An error body loses
    every secret `redact` knows first (an upstream may quote the key or credentials it refused)."""
    if status >= 400:
        raw = redact.scrub(raw)
        if exchange.provider == "http":
            return status, raw  # a tool's error is its own business: relayed as it came, secrets out
    parsed: object
    try:
        parsed = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        parsed = raw.decode("utf-8", errors="replace")
    if status >= 400:
        return _error(exchange, status, parsed, raw)
    if exchange.kind == "pass" or not isinstance(parsed, dict):
        return status, raw
    if exchange.kind == "openai_to_anthropic":
        return status, orjson.dumps(anthropic_message_to_openai(parsed, model=model, created=created))
    return status, orjson.dumps(openai_chat_to_anthropic_message(parsed, model=model))


def _error(exchange: Exchange, status: int, parsed: object, raw: bytes) -> tuple[int, bytes]:
    if exchange.kind == "openai_to_anthropic":
        status, body = anthropic_error_to_openai(status, parsed)
        return status, orjson.dumps(body)
    if exchange.kind == "anthropic_to_openai":
        status, body = openai_error_to_anthropic(status, parsed)
        return status, orjson.dumps(body)
    if exchange.provider == "anthropic" or exchange.front == "anthropic":
        shaped = normalise_anthropic_error(status, parsed)  # Anthropic to Anthropic: usually already so
        return status, raw if shaped is None else orjson.dumps(shaped)
    normal = normalise_openai_compatible_error(status, parsed)
    if isinstance(parsed, dict) and parsed == normal:
        return status, raw  # already OpenAI-shaped: keep the upstream's exact bytes
    return status, orjson.dumps(normal)


class StreamTranslator(Protocol):
    def feed(self, event: str | None, data: Mapping[str, Any]) -> list[bytes]: ...
    def done(self) -> list[bytes]: ...
    def eof(self) -> list[bytes]:
        """The upstream ended without its end marker: the closing events if its answer was whole, else []."""
        ...
    @property
    def finished(self) -> bool: ...
    @property
    def usage(self) -> dict[str, Any] | None: ...


class _FromOpenAI:
    """Adapts OpenAIToAnthropicStream to the common feed(event, data) shape; `[DONE]` arrives via done()."""

    __slots__ = ("_inner", "_finish_seen")

    def __init__(self, model: str) -> None:
        self._inner = OpenAIToAnthropicStream(model=model)
        self._finish_seen = False

    def feed(self, event: str | None, data: Mapping[str, Any]) -> list[bytes]:
        if not self._finish_seen:
            choices = data.get("choices")
            if isinstance(choices, list):
                self._finish_seen = any(isinstance(c, dict) and c.get("finish_reason") for c in choices)
        return self._inner.feed(data)

    def done(self) -> list[bytes]:
        return self._inner.done()

    def eof(self) -> list[bytes]:
        # Servers without [DONE] (TGI before 2.2, some llama.cpp builds) end right after the finish chunk.
        return self._inner.done() if self._finish_seen else []

    @property
    def finished(self) -> bool:
        return self._inner.finished

    @property
    def usage(self) -> dict[str, Any] | None:
        return self._inner.usage


class _FromAnthropic:
    __slots__ = ("_inner",)

    def __init__(self, model: str, created: int, include_usage: bool) -> None:
        self._inner = AnthropicToOpenAIStream(model=model, created=created, include_usage=include_usage)

    def feed(self, event: str | None, data: Mapping[str, Any]) -> list[bytes]:
        return self._inner.feed(event, data)

    def done(self) -> list[bytes]:
        return []  # Anthropic streams end with message_stop, which feed() already turned into [DONE]

    def eof(self) -> list[bytes]:
        return []  # without message_stop the answer is incomplete

    @property
    def finished(self) -> bool:
        return self._inner.finished

    @property
    def usage(self) -> dict[str, Any] | None:
        return self._inner.usage


def stream_translator(
    exchange: Exchange, body: Mapping[str, Any], model: str, created: int
) -> StreamTranslator | None:
    if exchange.kind == "openai_to_anthropic":
        return _FromAnthropic(model, created, include_usage_requested(body))
    if exchange.kind == "anthropic_to_openai":
        return _FromOpenAI(model)
    return None


__all__ = [
    "Exchange",
    "StreamTranslator",
    "TranslationError",
    "Untranslatable",
    "choose",
    "request_body",
    "response_body",
    "stream_translator",
]
