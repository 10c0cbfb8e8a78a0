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

from proxy.call import Call

CLIENT_CLOSED = 499
OUTCOMES = ("ok", "upstream_error", "timeout", "rejected", "cancelled", "proxy_error")


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
