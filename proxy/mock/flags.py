"""`signalbox mock` flags: timing and faults for rehearsing failures without writing a policy. Each flag
becomes a `MockSettings` field or a `MockFault`; a policy's `mock:` section sets the same things."""

from __future__ import annotations

import argparse
import re

from proxy.mock.faults import MockFault, MockSettings

EPILOG = """\
faults are drawn per request, in this order, with one random draw each (--seed replays them):
  --error-rate, then --rate-limit, then --stall-rate, then --drop-rate; the first status drawn wins.
per request, headers override everything: x-mock-status, x-mock-retry-after, x-mock-stall-ms,
x-mock-drop-after, x-mock-ttft-ms, x-mock-token-delay-ms, x-mock-output-tokens.
counters: GET /mock/stats, POST /mock/stats/reset.

examples:
  signalbox mock --error-rate 503=0.1 --rate-limit 0.05 --retry-after 2
  signalbox mock --ttft 300ms --tokens-per-second 40 --drop-rate 0.2 --drop-after 5 --seed 7
"""


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}


def _duration(text: str) -> float:
    """`300ms`, `2s`, `1m` or a bare number of seconds (the mock shares no code with the policy loader)."""
    match = _DURATION.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"a duration such as 300ms, 2s or 1m, not {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a probability between 0 and 1, not {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"a probability between 0 and 1, not {text!r}")
    return value


def _status_rate(text: str) -> tuple[int, float]:
    status, sep, rate = text.partition("=")
    if not sep or not status.strip().isdigit() or not 400 <= int(status) <= 599:
        raise argparse.ArgumentTypeError(f"STATUS=PROBABILITY with a status from 400 to 599, not {text!r}")
    return int(status), _probability(rate)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number above 0, not {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"a number above 0, not {text!r}")
    return value


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"a whole number, not {text!r}")
    return int(text)


def add_mock_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    timing = parser.add_argument_group("timing")
    timing.add_argument("--ttft", type=_duration, help="time to the first token (or to a whole body), e.g. 300ms")
    timing.add_argument("--ttft-ms", type=float, help=argparse.SUPPRESS)  # the older spelling
    pace = timing.add_mutually_exclusive_group()
    pace.add_argument("--token-delay", type=_duration, help="time between stream events, e.g. 20ms")
    pace.add_argument("--token-delay-ms", type=float, help=argparse.SUPPRESS)
    pace.add_argument("--tokens-per-second", type=_positive, help="the same as --token-delay 1/N s")
    timing.add_argument("--output-tokens", type=_count, default=16, help="tokens per answer (default 16)")
    timing.add_argument("--embedding-dim", type=_count, default=8, help="embedding length (default 8)")
    faults = parser.add_argument_group("faults (probabilities from 0 to 1)")
    faults.add_argument("--error-rate", type=_status_rate, action="append", default=[], metavar="STATUS=P",
                        help="answer STATUS with probability P; repeat for several statuses")
    faults.add_argument("--rate-limit", type=_probability, default=0.0, metavar="P",
                        help="answer 429 with a retry-after header with probability P")
    faults.add_argument("--retry-after", type=_duration, default=1.0,
                        help="the retry-after of --rate-limit and of 503/529 errors (default 1s)")
    faults.add_argument("--stall-rate", type=_probability, default=0.0, metavar="P",
                        help="hold the request for --stall before answering, with probability P")
    faults.add_argument("--stall", type=_duration, default=30.0, help="how long a stall lasts (default 30s)")
    faults.add_argument("--drop-rate", type=_probability, default=0.0, metavar="P",
                        help="close the connection mid-answer with probability P")
    faults.add_argument("--drop-after", type=_count, default=3,
                        help="stream events sent before a drop (default 3; a body drops after its headers)")
    faults.add_argument("--seed", type=int, help="seed the fault draws, so a run can be replayed")


def settings_from(args: argparse.Namespace) -> MockSettings:
    """The settings the flags describe (faults in the documented draw order)."""
    faults: list[MockFault] = []
    for status, rate in args.error_rate:
        retry = args.retry_after if status in (503, 529) else None
        faults.append(MockFault("status", rate, status=status, retry_after=retry))
    if args.rate_limit:
        faults.append(MockFault("status", args.rate_limit, status=429, retry_after=args.retry_after))
    if args.stall_rate:
        faults.append(MockFault("stall", args.stall_rate, stall=args.stall))
    if args.drop_rate:
        faults.append(MockFault("drop", args.drop_rate, after_events=args.drop_after))
    ttft = args.ttft if args.ttft is not None else (args.ttft_ms or 0.0) / 1000
    if args.tokens_per_second is not None:
        delay = 1 / args.tokens_per_second
    else:
        delay = args.token_delay if args.token_delay is not None else (args.token_delay_ms or 0.0) / 1000
    return MockSettings(ttft=ttft, token_delay=delay, output_tokens=args.output_tokens,
                        embedding_dim=max(1, args.embedding_dim), faults=tuple(faults), seed=args.seed)
