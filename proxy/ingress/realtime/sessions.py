"""Open Realtime sessions, per proxy and per tenant, against the policy's `realtime` limits (pure)."""

from __future__ import annotations

from proxy.policy.schema_sockets import Realtime


class Sessions:
    """Counts sessions; `take` decides, `give` returns. Lives on the app (realtime.relay.SESSIONS)."""

    __slots__ = ("total", "by_tenant")

    def __init__(self) -> None:
        self.total = 0
        self.by_tenant: dict[str, int] = {}

    def refusal(self, tenant: str, limits: Realtime) -> str | None:
        """Why one more session for `tenant` is refused, or None: it may open (and is counted)."""
        if self.total >= limits.max_sessions:
            return f"this proxy already holds {self.total} realtime sessions (realtime.max_sessions)"
        mine = self.by_tenant.get(tenant, 0)
        per_tenant = limits.max_sessions_per_tenant
        if per_tenant is not None and mine >= per_tenant:
            return f"tenant '{tenant}' already holds {mine} realtime sessions (realtime.max_sessions_per_tenant)"
        self.total += 1
        self.by_tenant[tenant] = mine + 1
        return None

    def give(self, tenant: str) -> None:
        self.total -= 1
        left = self.by_tenant.get(tenant, 1) - 1
        if left > 0:
            self.by_tenant[tenant] = left
        else:
            self.by_tenant.pop(tenant, None)
