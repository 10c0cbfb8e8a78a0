"""The compiled secret set (pure): which spellings of a secret it finds, and what it leaves alone."""

from __future__ import annotations

import base64
import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.policy.redact import EMPTY, Redactor, SecretsRef, basic_values, forms, redact_logs
from proxy.policy.schema import Upstream
from proxy.policy.secrets import _redis_credentials, upstream_credentials

AZURE = "9f86d081884c7d659a2feaa0c55ad015"
KEY = "sk-upstream-SECRET-7f3a9c-do-not-leak"


@pytest.mark.parametrize(
    "quoted",
    [
        f"Access denied: {AZURE}.",
        f"Bearer {KEY}",
        "Incorrect API key provided: sk-proj-************************do-not-leak.",  # OpenAI's mask
        "key sk-upst...leak was refused",
        "key sk-upstream-SECRET-7f…",
        '{"key": "' + KEY + '"}',
    ],
)
def test_every_spelling_of_a_secret_goes(quoted: str) -> None:
    clean = Redactor([AZURE, KEY]).scrub_text(quoted)
    assert "[redacted]" in clean
    assert AZURE not in clean and "do-not-leak" not in clean and "7f3a9c" not in clean and "sk-upst" not in clean


def test_basic_credentials_in_every_form_go() -> None:
    password = 'p@ss/W0rd "7e1c"'
    token = base64.b64encode(f"svc:{password}".encode()).decode()
    encoded = "p%40ss%2FW0rd%20%227e1c%22"
    redactor = Redactor(basic_values("svc", password, "svc", encoded))
    for quoted in (f"Basic {token}", password, encoded, 'p@ss\\/W0rd \\"7e1c\\"', f"svc:{password}"):
        clean = redactor.scrub_text(f"<{quoted}>")
        assert "[redacted]" in clean and token not in clean and "W0rd" not in clean, quoted


def test_what_is_not_a_secret_is_left_byte_for_byte() -> None:
    redactor = Redactor([AZURE, KEY, "short"])  # under 6 characters: not searched for
    body = b'{"error": {"message": "short... wait*** sk-other-****abcd 9f86", "code": null}}'
    assert redactor.scrub(body) is body


def test_redis_url_credentials() -> None:
    assert "pw%2Fx" in _redis_credentials("redis://:pw%2Fx@h:6379/0")
    assert "pw/x" in _redis_credentials("redis+sentinel://user:pw%2Fx@h1:26379,h2:26379/svc")
    assert _redis_credentials("redis://h:6379/0") == []


def test_log_records_are_redacted_before_any_handler(caplog: pytest.LogCaptureFixture) -> None:
    ref = SecretsRef()
    ref.load(Redactor([KEY]))
    ref.add_process_secret("admin-token-0123")
    redact_logs(ref)
    logging.getLogger("any.library").warning("sent %s and %s", KEY, "admin-token-0123", exc_info=ValueError(KEY))
    assert KEY not in caplog.text and "admin-token-0123" not in caplog.text
    assert caplog.text.count("[redacted]") == 3


def test_protocol_headers_of_an_upstream_are_not_secrets() -> None:
    upstream = Upstream(
        provider="openai", base_url="https://api.example.com/v1",
        headers={"Content-Type": "application/json", "OpenAI-Beta": "assistants=v2", "X-Org-Key": "org-key-12345"},
    )
    assert upstream_credentials(upstream) == ["org-key-12345"]


_SECRETS = st.lists(st.text(st.characters(codec="utf-8"), min_size=1, max_size=12), max_size=3)


@given(_SECRETS, st.text(max_size=20), st.text(max_size=20), st.integers(0, 7), st.booleans())
def test_search_finds_what_scrub_would_replace(secrets: list[str], before: str, after: str, pick: int,
                                               quote: bool) -> None:
    """`Redactor.search` (a success's headers look with it alone) answers as `scrub(masks=False)` does."""
    redactor = Redactor(secrets)
    spelled = sorted(form for secret in secrets for form in forms(secret))
    text = before + (spelled[pick % len(spelled)] if quote and spelled else "") + after
    data = text.encode("utf-8", "surrogatepass")
    found = redactor.search is not None and redactor.search(data) is not None
    assert found == (redactor.scrub(data, masks=False) is not data)
    assert EMPTY.search is None
