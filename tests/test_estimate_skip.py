"""The token estimate skips walking the turns when the raw body cannot hold a typed part
(proxy/admission/tokens.py `may_hold_parts`): property test that skipping never changes the estimate, over
bodies with and without media parts, `type` keys elsewhere, and keys spelled with \\u escapes."""

from __future__ import annotations

import json
import math
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.admission import tokens as tok

_part = st.one_of(
    st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "input_audio", "file", "image"]),
                           "text": st.text(max_size=10)}),
    st.fixed_dictionaries({"type": st.sampled_from(["image_url", "input_image"]),
                           "image_url": st.text(alphabet="Aa=/+", max_size=200)}),
    st.dictionaries(st.sampled_from(["kind", "data", "typ"]), st.text(max_size=8), max_size=2),
)
_content = st.one_of(st.text(max_size=30), st.lists(_part, max_size=3))
_turn = st.fixed_dictionaries({"role": st.sampled_from(["user", "system"]), "content": _content})
_body = st.fixed_dictionaries(
    {"model": st.just("m")},
    optional={"messages": st.lists(_turn, max_size=3),
              "input": st.one_of(st.text(max_size=8), st.lists(_turn, max_size=2)),
              "tools": st.lists(st.fixed_dictionaries({"type": st.just("function")}), max_size=1)},
)


def _walked(raw: bytes, body: dict[str, Any]) -> int:
    """The estimate as computed before the skip: always walk the turns."""
    media, inline = tok.media_parts(body)
    return math.ceil(max(0, len(raw) - inline) / tok.BYTES_PER_TOKEN) + media * tok.MEDIA_TOKENS


@settings(max_examples=400, deadline=None)
@given(_body, st.booleans())
def test_skipping_the_walk_never_changes_the_estimate(body: dict[str, Any], ascii_only: bool) -> None:
    raw = json.dumps(body, ensure_ascii=ascii_only).encode()
    assert tok.prompt_estimate(raw, body) == _walked(raw, body)


def test_an_escaped_type_key_still_counts_its_media_part() -> None:
    """`"\\u0074ype"` is `type` once parsed: the body may hold parts, so the walk runs."""
    raw = b'{"model":"m","messages":[{"role":"user","content":[{"\\u0074ype":"image_url","image_url":"' + \
        b"A" * 4000 + b'"}]}]}'
    body = json.loads(raw)
    assert tok.may_hold_parts(raw)
    assert tok.prompt_estimate(raw, body) < tok.MEDIA_TOKENS + 100
    assert not tok.may_hold_parts(b'{"model":"m","messages":[{"role":"user","content":"hi"}]}')
