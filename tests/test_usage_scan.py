"""Reading a long answer's `usage` from the end of its body (proxy/providers/usage.py) against the full parse:
for every valid JSON document the scan gives what `usage_in(orjson.loads(body))` gives, or says it is unsure
(and the full parse answers). Property tests (hypothesis) over answers shaped like the providers' and over
arbitrary JSON documents that mention `usage` anywhere, in any place, with any whitespace."""

from __future__ import annotations

import json
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.providers.usage import SCAN_FROM, usage_from_end, usage_in, usage_of

UNSURE = usage_from_end(b'{"usage": null}')
"""The scan's "parse it whole" answer (a usage that is not an object sends it to the full parse)."""

_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**53), 2**53), st.text(max_size=12),
    st.sampled_from(["usage", "}", "{", ",\"usage\":{}}", "\\\"usage\\\"", "\u0075sage"]),
)
_keys = st.one_of(st.text(max_size=8), st.sampled_from(["usage", "message", "response", "total_tokens", "u"]))
_json = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_keys, inner, max_size=4)),
    max_leaves=25,
)
_usage = st.dictionaries(
    st.sampled_from(["prompt_tokens", "completion_tokens", "total_tokens", "input_tokens", "output_tokens",
                     "prompt_tokens_details", "note"]),
    st.one_of(st.integers(0, 10**7), st.dictionaries(st.sampled_from(["cached_tokens", "a{b}"]),
                                                     st.one_of(st.integers(0, 99), st.text(max_size=4)),
                                                     max_size=2), st.text(max_size=6)),
    max_size=5,
)


def _full(body: bytes) -> dict[str, Any] | None:
    """What the proxy computed before the scan: parse the whole body."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return usage_in(parsed) if isinstance(parsed, dict) else None


def _dump(value: Any, indent: int | None, spaced: bool, ascii_only: bool) -> bytes:
    separators = (", ", ": ") if spaced else (",", ":")
    return json.dumps(value, indent=indent, separators=separators, ensure_ascii=ascii_only).encode()


def _agrees(body: bytes) -> None:
    found = usage_from_end(body)
    if found is not UNSURE:
        assert found == _full(body)
    assert usage_of(body) == _full(body)


_layout = (st.sampled_from([None, 0, 2]), st.booleans(), st.booleans())


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_json, *_layout)
def test_any_json_document_agrees_with_the_full_parse(document: Any, indent: int | None, spaced: bool,
                                                       ascii_only: bool) -> None:
    _agrees(_dump(document, indent, spaced, ascii_only))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_keys, _json, max_size=4), _usage, st.dictionaries(_keys, _json, max_size=3),
       st.sampled_from(["top", "message", "response", "nested", "absent"]), *_layout,
       st.sampled_from(["", "\n", " \r\n\t"]))
def test_answer_shaped_documents_agree(before: dict[str, Any], usage: dict[str, Any], after: dict[str, Any],
                                       where: str, indent: int | None, spaced: bool, ascii_only: bool,
                                       trailing: str) -> None:
    """Members before and after `usage`, which sits at the top, in a holder, deeper, or nowhere."""
    answer = {k: v for k, v in before.items() if k != "usage"}
    if where == "top":
        answer["usage"] = usage
    elif where == "absent":
        answer.pop("message", None)
        answer.pop("response", None)
    else:
        answer["message" if where != "response" else "response"] = {"deep": {"usage": usage}} \
            if where == "nested" else {"content": "x", "usage": usage}
    answer.update(after)
    _agrees(_dump(answer, indent, spaced, ascii_only) + trailing.encode())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_json, st.integers(0, 400), st.binary(max_size=3))
def test_damaged_bodies_never_give_a_different_usage(document: Any, cut: int, junk: bytes) -> None:
    """Truncated or patched bodies: where the full parse finds a usage, the scan finds the same one."""
    body = orjson.dumps({"a": document, "usage": {"total_tokens": 7}, "z": [document]})
    damaged = body[: max(0, len(body) - cut)] + junk
    full = _full(damaged)
    found = usage_from_end(damaged)
    if full is not None and found is not UNSURE:
        assert found == full


def test_a_long_openai_answer_is_read_from_its_end() -> None:
    usage = {"prompt_tokens": 12, "completion_tokens": 4000, "total_tokens": 4012,
             "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
             "completion_tokens_details": {"reasoning_tokens": 0}}
    answer = {"id": "chatcmpl-1", "object": "chat.completion", "model": "m",
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "word {\"usage\": 1} " * 4000},
                           "finish_reason": "stop"}],
              "usage": usage, "service_tier": "default", "system_fingerprint": "fp_1"}
    body = orjson.dumps(answer)
    assert len(body) >= SCAN_FROM
    assert usage_from_end(body) == usage
    assert usage_of(body) == usage


def test_what_the_scan_leaves_to_the_full_parse() -> None:
    """Usage escaped, inside a holder, not an object, or followed by another spelling of `usage`."""
    assert usage_from_end(b'{"\\u0075sage": {"total_tokens": 3}}') is UNSURE
    assert usage_from_end(b'{"message": {"usage": {"input_tokens": 3}}}') is UNSURE
    assert usage_from_end(b'{"usage": {"total_tokens": 3}, "\\u0075sage": {"total_tokens": 4}}') is UNSURE
    assert usage_from_end(b'[{"usage": {"total_tokens": 3}}]') is UNSURE
    assert usage_from_end(b'{"id": "x", "choices": []}') is UNSURE
    assert usage_from_end(b'{"usage": {"total_tokens": 3} , "id": "x"}\n') == {"total_tokens": 3}
