"""Redaction cost: what the compiled secret set (proxy/policy/redact.py) costs where it runs.

Prints CPU µs per call (process time, one core, no sockets) for a policy of N secrets (one OpenAI key,
one Azure hex key, Basic credentials, and N-3 random tenant keys), on:
  - a relayed error body with nothing to redact (the usual case), and one quoting the key and its mask,
  - a success's response headers (searched for the answering upstream's credentials alone: here a key,
    an Azure key and Basic credentials),
  - an in-stream event that says "error" (the only events searched),
  - compiling the set (once per policy load).
Run: .venv/bin/python bench/redaction.py [--secrets 5 50 500] [--json]
"""

from __future__ import annotations

import argparse
import json
import secrets as random_secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.policy.redact import Redactor, basic_values  # noqa: E402

KEY = "sk-proj-" + "Q7vR2xK9mT4wZ8pL3nB6yH1cD5fJ0sA"
AZURE = "9f86d081884c7d659a2feaa0c55ad015"
CLEAN = (
    b'{"error":{"message":"The model `gpt-4o-mini` does not exist or you do not have access to it.",'
    b'"type":"invalid_request_error","param":null,"code":"model_not_found"}}'
)
QUOTING = (
    b'{"error":{"message":"Incorrect API key provided: sk-proj-********************D5fJ0sA. You can find your '
    b'API key at https://platform.openai.com/account/api-keys.","type":"invalid_request_error","param":null,'
    b'"code":"invalid_api_key"}}'
)
HEADERS = "\n".join([
    "application/json", "req_8f2a0c1e9b7d4f3a", "2024-02-01", "user-abc123", "proj_abc123", "1200", "10000",
    "9999", "149984", "6ms", "0s", "__cf_bm=abcdefghijklmnopqrstuvwxyz0123456789; path=/; HttpOnly; Secure",
    "cloudflare", "8e2b0c1d9a7f4e3b-SJC", "h3=\":443\"; ma=86400",
])
EVENT = b'data: {"error":{"message":"The server had an error processing your request.","type":"server_error"}}\n\n'


def per_call(fn: Callable[[], object], seconds: float = 0.3) -> float:
    """CPU µs per call, from enough calls to fill `seconds`."""
    n, spent = 100, 0.0
    while spent < seconds:
        start = time.process_time()
        for _ in range(n):
            fn()
        spent = time.process_time() - start
        n *= 2
    return spent / (n // 2) * 1e6


def costs(every: Redactor, sent: Redactor) -> dict[str, float]:
    return {
        "error_body_clean_us": round(per_call(lambda: every.scrub(CLEAN)), 2),
        "error_body_quoting_us": round(per_call(lambda: every.scrub(QUOTING)), 2),
        "error_event_us": round(per_call(lambda: every.scrub(EVENT)), 2),
        "success_headers_us": round(per_call(lambda: sent.scrub_text(HEADERS)), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--secrets", type=int, nargs="+", default=[5, 50, 500])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    upstream = [KEY, AZURE, *basic_values("svc-user", "p@ss/W0rd-7e1c", "svc-user", "p%40ss%2FW0rd-7e1c")]
    sent = Redactor(upstream)
    for count in args.secrets:
        values = upstream + [f"tk-{random_secrets.token_urlsafe(24)}" for _ in range(max(0, count - 3))]
        start = time.process_time()
        every = Redactor(values)
        compile_ms = (time.process_time() - start) * 1e3
        assert b"Q7vR2x" not in every.scrub(QUOTING)
        rows.append({"secrets": count, "compile_ms": round(compile_ms, 2), **costs(every, sent)})
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'secrets':>8} {'compile ms':>11} {'error body':>11} {'quoting':>9} {'error event':>12} {'headers':>8}")
    for r in rows:
        print(f"{r['secrets']:>8} {r['compile_ms']:>11} {r['error_body_clean_us']:>11} "
              f"{r['error_body_quoting_us']:>9} {r['error_event_us']:>12} {r['success_headers_us']:>8}")
    print("(µs of CPU per call; headers: a success's, searched for its upstream's credentials only)")


if __name__ == "__main__":
    main()
