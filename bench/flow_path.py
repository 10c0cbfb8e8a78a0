"""The flow layer's own cost per admitted request, in process: no sockets, no HTTP, no upstream.

Runs, for each policy of `bench/overhead_policies.py` (`minimal`: no limits; `full`: five classes, a queue
with slots the route uses, and a limit on the tenant, the route, the route per tenant and the upstream, each
with requests and tokens per minute and a concurrency cap, none binding), what ingress, dispatch and the
relay do with the flow layer for one answered request: `Scheduler.enter(call)`, the upstream quota's `take`,
the response's `usage`, and leaving (settle and release). Prints CPU µs per request (process time, the best of
`--repeats` batches of `--requests`) and full minus minimal: what the limits and the queue cost on the
admitted path, without the noise of the HTTP path around them (`bench/overhead.py` measures that whole).

Run: .venv/bin/python bench/flow_path.py [--requests 3000] [--repeats 15] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import orjson
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from overhead_policies import POLICIES, write_policy  # noqa: E402

from proxy.admission.local import LocalStore  # noqa: E402
from proxy.call import Attempt, Call  # noqa: E402
from proxy.errors import UpstreamLimited  # noqa: E402
from proxy.flow.admit import Admission  # noqa: E402
from proxy.flow.scheduler import Scheduler  # noqa: E402
from proxy.flow.upstream import UpstreamQuota  # noqa: E402
from proxy.policy.compile import compile_plan  # noqa: E402
from proxy.policy.load import load_policy  # noqa: E402
from proxy.policy.plan import Plan  # noqa: E402

RAW = b'{"model":"bench-model","messages":[{"role":"user","content":"Say ok."}],"max_tokens":8}'
"""The body `bench/post.lua` sends."""
USAGE = {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}


class Flow:
    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.admission = Admission(LocalStore())
        self.scheduler = Scheduler(admission=self.admission)
        self.quota = UpstreamQuota(self.admission, self.scheduler.kick)
        self.tenant = plan.tenants["bench"]

    async def one(self) -> None:
        call = Call("r", self.plan, "POST", "/v1/chat/completions", "openai", time.perf_counter())
        call.tenant = self.tenant
        call.raw_body, call.body, call.model = RAW, orjson.loads(RAW), "bench-model"
        route = call.route = self.plan.resolve(call.path, call.model, self.tenant)
        assert route is not None
        async with self.scheduler.enter(call, None, None):
            limit = route.deployments[0].limit
            if limit is not None:  # dispatch, first attempt: the capacity the queue secured
                taken = await self.quota.take(call, limit)
                assert not isinstance(taken, UpstreamLimited)
                call.hold = taken
            call.attempts.append(Attempt("fast", 200, 0.001))
            call.status = 200
            call.usage = USAGE  # the relay found it in the answer


async def measure(policy: str, requests: int, repeats: int) -> float:
    """CPU µs per request: the best batch (the others lost time to other programs)."""
    with tempfile.TemporaryDirectory() as tmp:
        flow = Flow(compile_plan(load_policy(write_policy(Path(tmp), 1, policy))))
    for _ in range(min(requests, 2000)):  # warm up
        await flow.one()
    best = float("inf")
    for _ in range(repeats):
        started = time.process_time()
        for _ in range(requests):
            await flow.one()
        best = min(best, (time.process_time() - started) / requests * 1e6)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = {policy: uvloop.run(measure(policy, args.requests, args.repeats)) for policy in POLICIES}
    result["full_minus_minimal"] = result["full"] - result["minimal"]
    if args.json:
        print(json.dumps({k: round(v, 2) for k, v in result.items()}))
        return
    print("flow layer, CPU µs per admitted request (in process, best of "
          f"{args.repeats} x {args.requests})")
    for name in (*POLICIES, "full_minus_minimal"):
        print(f"  {name.replace('_', ' '):<20}{result[name]:>8.2f}")


if __name__ == "__main__":
    main()
