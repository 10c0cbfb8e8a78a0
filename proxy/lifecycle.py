"""The policy life cycle of a running proxy: how a reload reaches the runtime's state.

`attach(runtime)` wires the reloader's listeners (upstream pools before the swap; limiters, queues
and the policy metric after it); `reload_policy(runtime, trigger)` is the one entry point the three
triggers share (the directory watch, SIGHUP and `POST /admin/reload`), so each updates the reload
metrics the same way. Lives apart from `proxy.app` so the admin API can import it.
"""

from __future__ import annotations

from proxy.policy.load import LoadedPolicy
from proxy.policy.plan import Plan
from proxy.policy.reload import ReloadResult
from proxy.runtime import Runtime


def attach(runtime: Runtime) -> None:
    """Register the runtime's reconfiguration with its reloader (once, at start-up)."""
    reloader = runtime.reloader
    if reloader is None:
        return

    async def prepare(plan: Plan, loaded: LoadedPolicy) -> None:
        # Pools for new or changed upstreams; may fail, which refuses the plan.
        await runtime.clients.configure(plan)

    async def commit(plan: Plan, loaded: LoadedPolicy) -> None:
        runtime.secrets.load(plan.secrets)  # first: the listeners below may log
        # Counters and queues are kept by name; only their numbers change.
        await runtime.admission.reconfigure(plan)
        runtime.scheduler.reconfigure(plan)
        runtime.metrics.set_policy(plan.digest)

    reloader.on_change(prepare)
    reloader.on_swap(commit)


async def reload_policy(
    runtime: Runtime, trigger: str = "manual", *, force: bool = False
) -> ReloadResult | None:
    """Reload now; None when the policy was not loaded from files (nothing to reload from)."""
    reloader = runtime.reloader
    if reloader is None:
        return None
    result = await reloader.reload(force=force, trigger=trigger)
    metrics = runtime.metrics
    if result.failed:
        metrics.reload_failures.inc()
    outcome = "rejected" if result.failed else "applied" if result.changed else "unchanged"
    metrics.reloads.labels(trigger, outcome).inc()
    metrics.reload_success.set(0 if reloader.status.last_error else 1)
    return result
