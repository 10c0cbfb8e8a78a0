"""`signalbox mock` flags: a failure rehearsed from the command line, without writing a policy."""

from __future__ import annotations

import argparse
import random
import subprocess
import time
import urllib.error
import urllib.request
from typing import Any

import openai
import pytest
from test_cli import PYTHON, REPO, child_env, free_port

from proxy.mock.faults import MockFault, resolve_knobs
from proxy.mock.flags import add_mock_arguments, settings_from

pytestmark = pytest.mark.timeout(60)


def parse(*flags: str) -> Any:
    parser = argparse.ArgumentParser()
    add_mock_arguments(parser)
    return settings_from(parser.parse_args(list(flags)))


def test_flags_become_faults_in_the_documented_order() -> None:
    settings = parse("--error-rate", "500=0.1", "--error-rate", "503=0.2", "--rate-limit", "0.05",
                     "--retry-after", "2s", "--stall-rate", "0.3", "--stall", "1500ms", "--drop-rate", "0.4",
                     "--drop-after", "5", "--seed", "7", "--ttft", "300ms", "--tokens-per-second", "40")
    assert settings.faults == (
        MockFault("status", 0.1, status=500),
        MockFault("status", 0.2, status=503, retry_after=2.0),
        MockFault("status", 0.05, status=429, retry_after=2.0),
        MockFault("stall", 0.3, stall=1.5),
        MockFault("drop", 0.4, after_events=5),
    )
    assert (settings.seed, settings.ttft, settings.token_delay) == (7, 0.3, 0.025)


def test_a_seeded_rate_is_drawn_at_about_its_rate_and_replays() -> None:
    settings = parse("--error-rate", "503=0.25", "--seed", "3")

    def draws() -> list[int | None]:
        rng = random.Random(settings.seed)
        return [resolve_knobs({}, settings, rng).status for _ in range(2000)]

    first = draws()
    assert first == draws()
    assert 400 < first.count(503) < 600


@pytest.mark.parametrize("flags", [["--error-rate", "503"], ["--error-rate", "99=0.1"], ["--rate-limit", "1.5"],
                                   ["--tokens-per-second", "0"], ["--ttft", "soon"]])
def test_bad_flag_values_are_usage_errors(flags: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse(*flags)
    assert exit_.value.code == 2


def test_the_mock_command_serves_a_rate_limit_with_retry_after() -> None:
    port = free_port()
    child = subprocess.Popen(
        [PYTHON, "-m", "proxy", "mock", "--port", str(port), "--rate-limit", "1", "--retry-after", "2"],
        cwd=REPO, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30  # start-up is slow on a loaded machine
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/mock/stats", timeout=2) as answer:
                    answer.read()
                break
            except (OSError, urllib.error.URLError):
                assert time.monotonic() < deadline and child.poll() is None, "the mock did not start"
                time.sleep(0.05)
        with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0) as client:
            with pytest.raises(openai.RateLimitError) as err:
                client.responses.create(model="m", input="hi")
        assert err.value.status_code == 429 and err.value.response.headers["retry-after"] == "2"
    finally:
        child.terminate()
        child.wait(timeout=10)


def test_the_older_millisecond_flags_still_work() -> None:
    """bench/streams.py and existing scripts spell the timing flags in milliseconds."""
    settings = parse("--token-delay-ms", "20", "--output-tokens", "48", "--ttft-ms", "5")
    assert (settings.ttft, settings.token_delay, settings.output_tokens, settings.faults) == (0.005, 0.02, 48, ())
