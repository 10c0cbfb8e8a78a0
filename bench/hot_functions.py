"""Micro-benchmark of two per-request/per-chunk functions: `SSEDecoder.feed` (its `_split`) and
`Registry.choose`. Pure CPU, one process, no sockets; use it to check that a refactor costs nothing.

SSE: a realistic OpenAI chat-completions stream (role chunk, ~400 content deltas of 1-12 tokens, a usage
chunk, `[DONE]`), cut into random 1-16 KiB chunks (so events straddle chunk edges), with LF and with CRLF
line endings, plus the same stream in 1-256 byte pieces (most events arrive in several chunks).
choose: pools of 1, 3 and 10 deployments, some circuits open (none due for a probe, which would return
early), one held by pacing, with and without a `tried` set from a failed attempt.

Prints the best-of-N time per stream / per call (min over repeats: the least disturbed by other load).
Run: .venv/bin/python bench/hot_functions.py [--repeat 30]
To compare with another checkout: PYTHONPATH=/path/to/other/checkout .venv/bin/python bench/hot_functions.py
(the first line printed says which proxy package was measured).
Run the two one after the other several times: on a shared machine the spread between runs is a few %.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

if not any(Path(p, "proxy").is_dir() for p in sys.path if p):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.policy.plan import (  # noqa: E402
    BreakerSpec,
    DeploymentSpec,
    Matcher,
    PacingSpec,
    RouteRule,
    TimeoutSpec,
)
from proxy.streaming.sse import SSEDecoder  # noqa: E402
from proxy.upstream.registry import Registry  # noqa: E402


def openai_stream(deltas: int = 400, seed: int = 1) -> bytes:
    rng = random.Random(seed)
    head = '{"id":"chatcmpl-9x8Yz","object":"chat.completion.chunk","created":1733212800,"model":"gpt-4o-mini",'
    events = [head + '"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}']
    words = ["the", " proxy", " relays", " each", " event", " unchanged", ",", " and", " counts", " it", "."]
    for _ in range(deltas):
        text = "".join(rng.choice(words) for _ in range(rng.randint(1, 12)))
        delta = '{"content":' + json.dumps(text) + "}"
        events.append(head + '"choices":[{"index":0,"delta":' + delta + ',"finish_reason":null}]}')
    events.append(head + '"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}')
    usage = '"usage":{"prompt_tokens":812,"completion_tokens":2311,"total_tokens":3123}'
    events.append(head + '"choices":[],' + usage + "}")
    events.append("[DONE]")
    return "".join(f"data: {e}\n\n" for e in events).encode()


def cut(stream: bytes, low: int, high: int, seed: int = 2) -> list[bytes]:
    rng = random.Random(seed)
    chunks, pos = [], 0
    while pos < len(stream):
        size = rng.randint(low, high)
        chunks.append(stream[pos : pos + size])
        pos += size
    return chunks


def decode_all(chunks: list[bytes]) -> int:
    dec = SSEDecoder()
    n = 0
    for c in chunks:
        n += len(dec.feed(c))
    dec.close()
    return n


def best(fn: Callable[[], object], loops: int, repeat: int) -> float:
    """Best-of-`repeat` seconds per call of `fn`."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(loops):
            fn()
        times.append((time.perf_counter() - t0) / loops)
    return min(times)


def sse_cases(repeat: int) -> list[tuple[str, float, int]]:
    lf = openai_stream()
    crlf = lf.replace(b"\n", b"\r\n")
    cases = [
        ("LF, 1-16 KiB chunks", cut(lf, 1024, 16384)),
        ("CRLF, 1-16 KiB chunks", cut(crlf, 1024, 16384)),
        ("LF, 1-256 B chunks", cut(lf, 1, 256)),
        ("CRLF, 1-256 B chunks", cut(crlf, 1, 256)),
    ]
    out = []
    for name, chunks in cases:
        events = decode_all(chunks)
        out.append((name, best(lambda c=chunks: decode_all(c), 1, repeat * 10), events))  # type: ignore[misc]
    return out


def pool(n: int, balance: str) -> RouteRule:
    breaker = BreakerSpec(consecutive_failures=1, failure_ratio=0, cooldown=1e9, max_cooldown=1e9)
    deps = tuple(
        DeploymentSpec(f"d{i}", f"u{i}", None, 1.0 + i % 3, TimeoutSpec(), breaker, PacingSpec(True, 60.0))
        for i in range(n)
    )
    return RouteRule(
        name=f"r{n}", index=0, paths=Matcher(("*",)), models=Matcher(("*",)), tenants=None,
        upstream="u0", model_rewrite=None, timeouts=TimeoutSpec(), advertised=(),
        deployments=deps, balance=balance,  # type: ignore[arg-type]
    )


def choose_cases(repeat: int) -> list[tuple[str, float]]:
    now = 1000.0
    reg = Registry(clock=lambda: now, rng=random.Random(5))
    one, three, ten = pool(1, "weighted"), pool(3, "weighted"), pool(10, "least_outstanding")
    for rule in (one, three, ten):
        for spec in rule.deployments:
            reg.state(spec)
    # 3: one circuit open (not yet due). 10: three open, one held by pacing, some in flight.
    reg.record(reg.state(three.deployments[1]), now, True, False)
    for i in (2, 5, 7):
        reg.record(reg.state(ten.deployments[i]), now, True, False)
    reg.hold(reg.state(ten.deployments[4]), now, 30.0)
    for i in (0, 1, 3):
        reg.state(ten.deployments[i]).outstanding = 2
    choose = reg.choose
    tried = {"d0"}
    cases: list[tuple[str, Callable[[], object]]] = [
        ("1 deployment", lambda: choose(one, now, None, None, None)),
        ("3 deployments, 1 open, weighted", lambda: choose(three, now, None, None, None)),
        ("3 deployments, 1 open, tried={d0}", lambda: choose(three, now, None, tried, None)),
        ("10 deployments, 3 open, 1 held, least_outstanding", lambda: choose(ten, now, None, None, None)),
        ("10 deployments, same, tried={d0}, full={u9}", lambda: choose(ten, now, None, tried, {"u9"})),
    ]
    return [(name, best(fn, 1000, repeat * 10)) for name, fn in cases]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=30, help="x10 timed runs per case; the best counts")
    args = parser.parse_args()
    import proxy

    print(f"proxy from {Path(proxy.__file__).parent}")
    for name, seconds, events in sse_cases(args.repeat):
        print(f"sse    {name:<52} {seconds * 1e6:9.1f} µs/stream  {seconds * 1e9 / events:7.0f} ns/event")
    for name, seconds in choose_cases(args.repeat):
        print(f"choose {name:<52} {seconds * 1e6:9.3f} µs/call")


if __name__ == "__main__":
    main()
