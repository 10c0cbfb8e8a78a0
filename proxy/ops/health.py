"""The detailed health view (`GET /healthz/details` on the admin port): each dependency's state, and one overall
word for it. Liveness (`/healthz`) and readiness (`/readyz`) stay what Kubernetes needs; this is for people and
dashboards.

    unhealthy  this replica cannot serve: not started or already stopped, draining (shutting down), or a
               policy with no route
    degraded   it serves, with something missing: a deployment's circuit open or half-open, the shared limiter
               store (Redis) unreachable so each replica applies local limits (fail-open), a queue full or
               paused, or the last policy reload refused (the previous version keeps serving)
    healthy    none of the above

The judgement (`overall`) is pure over the checks; `gather` reads them off the runtime.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from proxy.runtime import Runtime

State = Literal["healthy", "degraded", "unhealthy"]
_RANK = {"healthy": 0, "degraded": 1, "unhealthy": 2}


@dataclass(slots=True)
class Check:
    name: str
    """`policy`, `process`, `limiter_store`, `circuit:<deployment>`, `queue:<name>`."""
    state: State
    detail: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "state": self.state, **self.detail}


def overall(checks: list[Check]) -> State:
    """The worst state of any check."""
    worst: State = "healthy"
    for check in checks:
        if _RANK[check.state] > _RANK[worst]:
            worst = check.state
    return worst


def gather(runtime: Runtime) -> list[Check]:
    return [_process(runtime), _policy(runtime), _limiter(runtime), *_circuits(runtime), *_queues(runtime)]


def report(runtime: Runtime) -> dict[str, Any]:
    checks = gather(runtime)
    return {"status": overall(checks), "checks": [c.as_json() for c in checks]}


def _process(runtime: Runtime) -> Check:
    if runtime.draining:
        return Check("process", "unhealthy", {"ready": False, "why": "draining: the proxy is shutting down"})
    if not runtime.ready:
        return Check("process", "unhealthy", {"ready": False, "why": "not started (or already stopped)"})
    return Check("process", "healthy", {"ready": True, "in_flight": runtime.in_flight})


def _policy(runtime: Runtime) -> Check:
    plan = runtime.plans.current
    detail: dict[str, Any] = {"digest": plan.digest[:12], "routes": len(plan.routes)}
    reloader = runtime.reloader
    if reloader is not None:
        detail["version"] = reloader.status.version
    if not plan.routes:
        return Check("policy", "unhealthy", {**detail, "why": "the policy has no route: every request gets 404"})
    if reloader is not None and reloader.status.last_error is not None:
        why = "the last reload was refused; the previous version keeps serving (GET /admin/policy)"
        return Check("policy", "degraded", {**detail, "why": why})
    return Check("policy", "healthy", detail)


def _limiter(runtime: Runtime) -> Check:
    describe = getattr(runtime.admission.store, "describe", None)
    detail: dict[str, Any] = describe() if describe is not None else {"backend": "memory"}
    if detail.get("degraded"):
        why = "the shared limiter store is unreachable: each replica applies local limits (fail-open)"
        return Check("limiter_store", "degraded", {**detail, "why": why})
    return Check("limiter_store", "healthy", detail)


def _circuits(runtime: Runtime) -> list[Check]:
    checks = []
    for entry in runtime.upstreams.snapshot()["deployments"]:
        state: State = "healthy" if entry["circuit"] == "closed" else "degraded"
        detail = {k: entry[k] for k in ("upstream", "model", "circuit", "consecutive_failures", "reopens_in_s")}
        checks.append(Check(f"circuit:{entry['deployment']}", state, detail))
    return checks


def _queues(runtime: Runtime) -> list[Check]:
    plan = runtime.plans.current
    checks = []
    for spec in plan.queues.values():
        queue = runtime.scheduler.queues.get(spec.name)
        waiting = len(queue.board) if queue is not None else 0
        active = queue.active if queue is not None else 0
        paused = queue is not None and queue.paused
        detail: dict[str, Any] = {
            "waiting": waiting,
            "max_waiting": spec.max_waiting,
            "saturation": round(waiting / spec.max_waiting, 3) if spec.max_waiting else None,
            "active": active,
            "slots": spec.concurrency,
        }
        if paused:
            checks.append(Check(f"queue:{spec.name}", "degraded", {**detail, "why": "paused by an operator"}))
        elif waiting >= spec.max_waiting:
            why = "full: new arrivals get 429 queue_full"
            checks.append(Check(f"queue:{spec.name}", "degraded", {**detail, "why": why}))
        else:
            checks.append(Check(f"queue:{spec.name}", "healthy", detail))
    return checks
