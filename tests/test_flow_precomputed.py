"""The flow layer's precomputed shortcuts agree with the general path they skip (issue 13, item 7).

Each shortcut is only sound under a condition; these tests generate inputs on both sides of it and
compare the shortcut with the general definition it stands in for.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.admission import tokens as tok

_MEDIA = sorted(tok._MEDIA_PARTS)
_KEYS = st.sampled_from(["type", "text", "content", "role", "image_url", "data", "x"])
_LEAVES = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.text(max_size=6),
                    st.sampled_from(_MEDIA + ["text", "data:image/png;base64,AAAA"]))


def _part() -> st.SearchStrategy[Any]:
    media = st.builds(lambda kind, data: {"type": kind, "data": data, "source": {"data": data}},
                      st.sampled_from(_MEDIA), st.text(max_size=20))
    plain = st.dictionaries(_KEYS, _LEAVES, max_size=3)
    return st.one_of(media, plain, _LEAVES)


_TURN = st.one_of(
    st.fixed_dictionaries({"role": st.just("user"), "content": st.one_of(st.text(max_size=10), st.lists(_part(), max_size=3))}),
    _LEAVES,
)
_BODY = st.fixed_dictionaries(
    {"model": st.just("m")},
    optional={"messages": st.one_of(st.lists(_TURN, max_size=3), _LEAVES),
              "input": st.one_of(st.lists(_TURN, max_size=3), st.text(max_size=8))},
)


@settings(max_examples=400, deadline=None)
@given(_BODY, st.booleans())
def test_the_prompt_estimate_skips_the_walk_only_when_it_would_find_no_media(body: dict[str, Any],
                                                                              escaped: bool) -> None:
    """`prompt_estimate` answers from the size alone when no `type` key can be in the body; the walk is
    the definition. With `escaped`, every character is written as a \\u escape (valid JSON a client may
    send): a `type` key is then invisible as plain bytes."""
    raw = json.dumps(body, ensure_ascii=True).encode() if not escaped else _escaped(body)
    assert orjson.loads(raw) == body
    assert tok.prompt_estimate(raw, body) == tok.walked_estimate(raw, body)


def _escaped(value: Any) -> bytes:
    """JSON with every string (keys included) written entirely in \\uXXXX escapes."""
    if isinstance(value, str):
        units = value.encode("utf-16-be")  # characters past U+FFFF as surrogate pairs, as JSON writes them
        return b'"' + "".join(f"\\u{units[i]:02x}{units[i + 1]:02x}" for i in range(0, len(units), 2)).encode() + b'"'
    if isinstance(value, dict):
        return b"{" + b",".join(_escaped(k) + b":" + _escaped(v) for k, v in value.items()) + b"}"
    if isinstance(value, list):
        return b"[" + b",".join(_escaped(v) for v in value) + b"]"
    return orjson.dumps(value)


def test_the_estimate_still_charges_media_written_with_escapes() -> None:
    """A media part whose `type` key arrives as \\u escapes is still charged flat, not by its size."""
    body = {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url",
                                                                     "image_url": {"url": "A" * 4000}}]}]}
    raw = _escaped(body)
    assert b'"type"' not in raw
    assert tok.prompt_estimate(raw, body) == tok.walked_estimate(raw, body)
    assert tok.prompt_estimate(raw, body) < tok.MEDIA_TOKENS + len(raw) // 4 - 500
