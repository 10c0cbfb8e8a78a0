"""What the client finally got: one outcome per request, judged once at the end, read by the metrics and
the access log alike.

    outcome         when                                                        reason
    ok              a 1xx-3xx answer, or a stream that ended cleanly            (none)
    upstream_error  the upstream answered 4xx/5xx, or broke or cut a stream,    upstream_<status>, upstream_unreachable,
                    or every circuit was open                                   upstream_cut, circuit_open, ...
    timeout         a time limit ran out (before or during the answer)          upstream_timeout
    rejected        the proxy refused it (a limit, a queue, bad input, drain)    rate_limit, queue_full, ...
    cancelled       the client left (status 499), or stopped reading            client_gone, slow_client
    proxy_error     the proxy failed on its own                                 internal_error

A stream's status line goes out before its end is known, so a stream that ends with an error event keeps
status 200 and gets the error's outcome. A client that left is recorded with status 499 (nginx's "client
closed request"), stream or not; a slow client the proxy cut keeps the status it was sent.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from proxy.call import Call

CLIENT_CLOSED = 499
OUTCOMES = ("ok", "upstream_error", "timeout", "rejected", "cancelled", "proxy_error")
RECENT_REFUSALS = 50
"""Refusals the wall screen lists (GET /admin/live): the newest, the oldest dropped."""


def judge(call: Call) -> None:
    """Set `call.outcome` and `call.reason` (and 499 for a client that left). Pure over the call's fields."""
    failure = call.failure
    if call.client_gone:
        call.outcome = "cancelled"
        if call.error == "slow_client":
            call.reason = "slow_client"  # the proxy ended it: the status already sent stands
        else:
            call.reason = "client_gone"
            call.status = CLIENT_CLOSED
    elif failure is not None:
        call.outcome = failure.outcome
        call.reason = failure.cause or failure.reason
    elif call.error is not None:  # set without a ProxyError: an upstream error relayed inside a stream, a cut
        call.outcome = "upstream_error"
        call.reason = call.error
    elif call.status >= 400:  # an upstream's own error answer, relayed
        call.outcome = "upstream_error"
        call.reason = f"upstream_{call.status}"
    elif call.status == 0:  # ended without an answer or an error: never expected, counted if it happens
        call.outcome = "proxy_error"
        call.reason = "no_answer"
    else:
        call.outcome = "ok"
        call.reason = None


class Refusals:
    """The last `RECENT_REFUSALS` requests whose outcome was `rejected`, newest last, for the dashboard.

    Fed by `Metrics.record` only for a rejected call: a tuple of references appended to a bounded deque, so
    the other requests pay one string comparison. Shaped into JSON only when the admin API reads it."""

    __slots__ = ("ring", "total")

    def __init__(self, size: int = RECENT_REFUSALS) -> None:
        self.ring: deque[tuple[float, str, str, str, str, int, str, float]] = deque(maxlen=size)
        self.total = 0
        """Every refusal since start (the ring keeps only the newest)."""

    def add(self, call: Call) -> None:
        tenant = call.tenant.name if call.tenant is not None else ""
        route = call.route.name if call.route is not None else ""
        self.ring.append((time.time(), call.request_id, tenant, route, call.model, call.status,
                          call.reason or "unknown", call.queue_wait))
        self.total += 1

    def recent(self) -> list[dict[str, Any]]:
        """Newest first."""
        return [
            {"at": at, "request_id": rid, "tenant": tenant or None, "route": route or None, "model": model or None,
             "status": status, "reason": reason, "queue_wait_ms": round(wait * 1000, 1)}
            for at, rid, tenant, route, model, status, reason, wait in reversed(self.ring)
        ]
