"""The policies `bench/overhead.py` runs the proxy with: `minimal` (one route, no limits) and `full` (what a
platform team writes: every kind of limit plus a queue with slots and priority classes).

In `full` every limit is set far above what one core can drive (about 3,000 requests/s here, 200k a
minute), so none ever refuses or waits: the phase measures what checking and counting them costs on the
admitted path, not what waiting costs (that is `bench/scheduler.py`).
"""

from __future__ import annotations

from pathlib import Path

API_KEY = "sk-bench"
POLICIES = ("minimal", "full")

# Never binds: 100× what the proxy serves on one core (requests, concurrency), 1,000× for tokens
# (each benchmark request reserves its prompt estimate + max_tokens, about 40-100 tokens).
_NEVER = "{requests_per_minute: 100000000, tokens_per_minute: 100000000000, concurrent: 100000}"

MINIMAL = """\
upstreams:
  fast:
    provider: openai
    base_url: http://127.0.0.1:{port}/v1
    api_key: ${{BENCH_KEY:-unused}}
tenants:
  bench:
    keys: ["{key}"]
routes:
  - name: bench
    match: {{model: "*"}}
    upstream: fast
"""

# The tenant the load uses sits in a middle class, as an agent's planner would; the other tenants are
# there because a real policy has them (key lookup is a dict, their cost is only in memory).
FULL = """\
priorities: [host, planner, critic, reporter, nightly]
upstreams:
  fast:
    provider: openai
    base_url: http://127.0.0.1:{port}/v1
    api_key: ${{BENCH_KEY:-unused}}
    limits: {never}
queues:
  agents:
    concurrency: 4096
    max_waiting: 10000
    max_wait: 30s
tenants:
  bench:
    keys: ["{key}"]
    priority: planner
    max_priority: host
    weight: 2
    limits: {never}
  reports:
    keys: ["sk-bench-reports"]
    priority: reporter
    limits: {never}
  nightly:
    keys: ["sk-bench-nightly"]
    priority: nightly
    limits: {never}
routes:
  - name: bench
    match: {{model: "*"}}
    upstream: fast
    limits:
      requests_per_minute: 100000000
      tokens_per_minute: 100000000000
      concurrent: 100000
      per_tenant: {never}
    on_limit: queue
    queue: agents
"""


def write_policy(directory: Path, upstream_port: int, policy: str = "minimal") -> Path:
    """Write one of POLICIES, pointing at the fast upstream, into its own directory; return that directory."""
    template = {"minimal": MINIMAL, "full": FULL}[policy]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "bench.yaml").write_text(template.format(port=upstream_port, key=API_KEY, never=_NEVER))
    return directory
