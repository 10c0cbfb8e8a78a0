"""Scheduler and admission benchmark: CPU per request on the hot path, and with 10,000 requests waiting.

Prints (CPU µs per request, process time, one core, no sockets):
  - the cost of `admit` + `slot` on a route with no limits and no queue (what every plain request pays),
  - a route with a tenant limit (requests/min + tokens/min: reserve, settle) and a queue with a free slot,
  - the board alone with 10,000 waiting (one pop + one push, steady state),
  - the whole async hand-off with 10,000 waiting tasks (release -> grant -> the waiter resumes -> exits),
    minus the bare asyncio wake-up of the same number of tasks,
  - 10,000 requests waiting on a rate window: the CPU the process burns while they wait (no polling: one
    timer per gate), and the CPU per request once the window lets them through a few at a time,
and checks the order the 10,000 were served in: strict classes, weighted fairness across tenants.
Run: .venv/bin/python bench/scheduler.py [--waiting 10000] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.admission.local import LocalStore  # noqa: E402
from proxy.call import Attempt, Call  # noqa: E402
from proxy.flow.admit import Admission  # noqa: E402
from proxy.flow.board import FairQueue, Ticket  # noqa: E402
from proxy.flow.scheduler import Scheduler  # noqa: E402
from proxy.policy.compile import compile_plan  # noqa: E402
from proxy.policy.load import load_policy  # noqa: E402
from proxy.policy.plan import Plan  # noqa: E402
from proxy.telemetry.metrics import Metrics  # noqa: E402

TENANTS = 100
CLASSES = ("critical", "standard", "batch")
RATE = 50
"""Requests per window of the rate-bound tenant (`slow`)."""


def build_plan(slots: int, waiting: int) -> Plan:
    tenants = "\n".join(
        f"  t{i}: {{keys: [k{i}], weight: {1 + i % 3}, max_priority: critical, "
        f"limits: {{requests_per_minute: 100000000, tokens_per_minute: 1000000000}}}}"
        for i in range(TENANTS)
    )
    text = f"""
priorities: [{", ".join(CLASSES)}]
identify: {{mode: api_key}}
upstreams: {{u: {{provider: openai, base_url: "http://127.0.0.1:9/v1"}}}}
queues:
  board: {{concurrency: {slots}, max_waiting: {waiting * 2}, max_wait: 1h}}
  roomy: {{concurrency: 1000000}}
tenants:
{tenants}
  free: {{keys: [kfree]}}
  rpm: {{keys: [krpm], limits: {{requests_per_minute: 100000000}}}}
  slow: {{keys: [kslow], limits: {{requests_per_minute: {RATE}}}}}
routes:
  - {{name: plain, match: {{model: plain}}, upstream: u}}
  - {{name: limited, match: {{model: limited}}, upstream: u, queue: roomy}}
  - {{name: queued, match: {{model: queued}}, upstream: u, queue: board}}
  - {{name: rated, match: {{model: rated}}, upstream: u, queue: board, on_limit: queue}}
"""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.yaml"
        path.write_text(text)
        return compile_plan(load_policy(path))


def make_call(plan: Plan, route: int, tenant: int | str, rid: str = "r") -> Call:
    call = Call(rid, plan, "POST", "/v1/chat/completions", "openai", time.perf_counter())
    call.tenant = plan.tenants[tenant if isinstance(tenant, str) else f"t{tenant}"]
    call.route = plan.routes[route]
    call.model = call.route.name
    call.body = {"model": call.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 16}
    call.raw_body = b'{"model":"m","messages":[{"role":"user","content":"Hi"}],"max_tokens":16}'
    call.attempts = [Attempt("u", 200, 0.001)]  # dispatched: settles like a real request
    call.usage = {"prompt_tokens": 20, "completion_tokens": 10, "total_tokens": 30}
    return call


async def per_request(plan: Plan, route: int, tenant: str, rounds: int) -> float:
    """CPU µs of `async with admit(call), slot(call)` around nothing, minus an empty loop."""
    scheduler = Scheduler(Metrics(), admission=Admission(metrics=Metrics()))
    call = make_call(plan, route, tenant)

    async def loop(work: bool) -> float:
        start = time.process_time()
        for _ in range(rounds):
            if work:
                async with scheduler.enter(call, None):
                    pass
        return time.process_time() - start

    base = min([await loop(False) for _ in range(3)])
    cost = min([await loop(True) for _ in range(3)])
    return (cost - base) / rounds * 1e6


def board_only(waiting: int, rounds: int) -> float:
    """One pop + one push with `waiting` tickets in the board (steady state), CPU µs."""
    board = FairQueue(len(CLASSES))
    for i in range(waiting):
        board.push(Ticket(f"t{i % TENANTS}", i % len(CLASSES), weight=1 + (i % TENANTS) % 3), 0.0)
    fresh = [Ticket(f"t{i % TENANTS}", i % len(CLASSES), weight=1 + (i % TENANTS) % 3) for i in range(rounds)]
    start = time.process_time()
    for ticket in fresh:
        board.pop(1.0)
        board.push(ticket, 1.0)
    return (time.process_time() - start) / rounds * 1e6


async def handoff(plan: Plan, waiting: int, slots: int) -> dict[str, Any]:
    """10,000 tasks waiting for `slots` slots; CPU per admitted request while they drain, and the order."""
    scheduler = Scheduler(Metrics())
    gate = asyncio.Event()
    served: list[tuple[int, str]] = []

    async def holder(call: Call) -> None:
        async with scheduler.slot(call, None):
            await gate.wait()

    async def waiter(call: Call, priority: str) -> None:
        async with scheduler.slot(call, priority):
            served.append((CLASSES.index(priority), call.tenant.name if call.tenant else ""))

    loop = asyncio.get_running_loop()
    holders = [loop.create_task(holder(make_call(plan, 2, 0))) for _ in range(slots)]
    await asyncio.sleep(0)
    tasks = [
        loop.create_task(waiter(make_call(plan, 2, i % TENANTS, f"r{i}"), CLASSES[(i // TENANTS) % 3]))
        for i in range(waiting)
    ]
    while len(scheduler.queues["board"].board) < waiting:  # noqa: ASYNC110 - let the waiters enqueue
        await asyncio.sleep(0)
    start = time.process_time()
    gate.set()
    await asyncio.gather(*holders, *tasks)
    spent = time.process_time() - start

    # The same number of tasks woken from one event: what asyncio alone costs per resumed task.
    wake = asyncio.Event()
    bare: list[int] = []

    async def sleeper(i: int) -> None:
        await wake.wait()
        bare.append(i)

    sleepers = [loop.create_task(sleeper(i)) for i in range(waiting)]
    await asyncio.sleep(0)
    start = time.process_time()
    wake.set()
    await asyncio.gather(*sleepers)
    baseline = time.process_time() - start
    return {
        "total_us": spent / waiting * 1e6,
        "asyncio_wakeup_us": baseline / waiting * 1e6,
        "added_us": (spent - baseline) / waiting * 1e6,
        **check_order(served),
    }


async def rate_bound(plan: Plan, waiting: int, idle: float, window: float) -> dict[str, Any]:
    """`waiting` requests of one tenant over its requests-per-window limit: CPU while nothing can go (the
    window is spent), then CPU per request while the window admits RATE per `window` seconds."""
    scheduler = Scheduler(Metrics(), admission=Admission(LocalStore(window=window), metrics=Metrics()))
    served = 0

    async def waiter(call: Call) -> None:
        nonlocal served
        async with scheduler.enter(call, None):
            served += 1

    loop = asyncio.get_running_loop()
    first = [make_call(plan, 3, "slow", f"w{i}") for i in range(RATE)]
    for call in first:  # spend the window
        async with scheduler.enter(call, None):
            pass
    tasks = [loop.create_task(waiter(make_call(plan, 3, "slow", f"r{i}"))) for i in range(waiting)]
    gate = scheduler.queues["board"]
    while len(gate.board) < waiting:  # noqa: ASYNC110 - let the waiters enqueue
        await asyncio.sleep(0)
    # Idle: the window is spent and refills only at the next window's start; nobody polls meanwhile.
    start_cpu, start_wall = time.process_time(), time.perf_counter()
    await asyncio.sleep(idle)
    idle_cpu = time.process_time() - start_cpu
    idle_wall = time.perf_counter() - start_wall
    before = served
    start_cpu, start_wall = time.process_time(), time.perf_counter()
    await asyncio.sleep(3 * window)
    drain_cpu, drained = time.process_time() - start_cpu, served - before
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "idle_cpu_percent": 100 * idle_cpu / idle_wall,
        "idle_seconds": round(idle_wall, 2),
        "drained": drained,
        "cpu_per_admitted_us": drain_cpu / drained * 1e6 if drained else None,
    }


def check_order(served: list[tuple[int, str]]) -> dict[str, Any]:
    """Strict classes: every class-0 grant before any class-1 one, and so on. Fairness: inside a class,
    at every prefix each tenant's count stays within its weight (one round) of its weighted share."""
    classes = [cls for cls, _ in served]
    strict = classes == sorted(classes)
    weights = {f"t{i}": 1 + i % 3 for i in range(TENANTS)}
    worst = 0.0
    by_class: dict[int, list[str]] = defaultdict(list)
    for cls, tenant in served:
        by_class[cls].append(tenant)
    for tenants in by_class.values():
        backlog = Counter(tenants)
        counts: Counter[str] = Counter()
        for n, tenant in enumerate(tenants, 1):
            counts[tenant] += 1
            active = [t for t in backlog if counts[t] < backlog[t]] or list(backlog)
            total = sum(weights[t] for t in active)
            served_active = sum(counts[t] for t in active)
            if n % 97 == 0:  # sample prefixes (checking each one is quadratic)
                for t in active:
                    lag = abs(counts[t] - served_active * weights[t] / total) / weights[t]
                    worst = max(worst, lag)
    return {"strict_priority": strict, "fairness_max_lag_rounds": round(worst, 2), "served": len(served)}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    plan = build_plan(args.slots, args.waiting)
    return {
        "no_limits_no_queue_us": await per_request(plan, 0, "free", args.rounds),
        "tenant_rpm_limit_us": await per_request(plan, 0, "rpm", args.rounds),
        "tenant_rpm_tpm_limit_us": await per_request(plan, 0, "t0", args.rounds),
        "free_slot_us": await per_request(plan, 1, "free", args.rounds),
        "tenant_rpm_tpm_limit_and_free_slot_us": await per_request(plan, 1, "t0", args.rounds),
        "board_pop_push_with_10k_waiting_us": board_only(args.waiting, args.rounds),
        "handoff_with_waiting": await handoff(plan, args.waiting, args.slots),
        "rate_bound": await rate_bound(plan, args.waiting, args.idle, args.window),
        "waiting": args.waiting,
        "slots": args.slots,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--waiting", type=int, default=10_000)
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=50_000)
    parser.add_argument("--idle", type=float, default=2.0, help="seconds to watch the rate-bound waiters idle")
    parser.add_argument("--window", type=float, default=4.0, help="the rate window's length in seconds")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = uvloop.run(main_async(args))
    if args.json:
        print(json.dumps(result, indent=2))
        return
    hand = result["handoff_with_waiting"]
    print(f"CPU per request (µs), {args.waiting} waiting, {args.slots} slots, {TENANTS} tenants, 3 classes")
    rows = [
        ("no limits, no queue (enter)", "no_limits_no_queue_us"),
        ("tenant requests/min limit", "tenant_rpm_limit_us"),
        ("tenant requests/min + tokens/min (reserve, settle)", "tenant_rpm_tpm_limit_us"),
        ("queue with a free slot", "free_slot_us"),
        ("rpm + tpm limit and a free slot", "tenant_rpm_tpm_limit_and_free_slot_us"),
        (f"board only: pop + push with {args.waiting} waiting", "board_pop_push_with_10k_waiting_us"),
    ]
    for label, key in rows:
        print(f"  {label:<50}{result[key]:8.2f}")
    print(f"  {'async hand-off per admitted request (total)':<50}{hand['total_us']:8.2f}")
    print(f"  {'  asyncio wake-up of a task alone':<50}{hand['asyncio_wakeup_us']:8.2f}")
    print(f"  {'  added by the scheduler':<50}{hand['added_us']:8.2f}")
    rate = result["rate_bound"]
    print(f"  {args.waiting} waiting on a spent rate window: {rate['idle_cpu_percent']:.2f} % of a core over "
          f"{rate['idle_seconds']} s idle")
    per = rate["cpu_per_admitted_us"]
    print(f"  then {rate['drained']} admitted at {RATE} per {args.window:g} s window: "
          f"{per:.1f} µs CPU per admitted request" if per else "  none admitted while watched")
    print(f"  order: strict priority {hand['strict_priority']}, "
          f"worst fairness lag {hand['fairness_max_lag_rounds']} rounds, served {hand['served']}")


if __name__ == "__main__":
    main()
