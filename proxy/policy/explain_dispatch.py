"""`explain` sections for dispatch (pure): the effective retry (the single form as compiled, or each rule
with every default filled in) and, for a tool route, how the request's path maps onto its upstream."""

from __future__ import annotations

from typing import Any

from proxy.policy.explain_base import Context, plain, set_in, value_of


def retry_section(ctx: Context) -> dict[str, Any]:
    """The retry that applies, labelled route, policy or default like any compiled capability."""
    spec = ctx.route.retry
    shown: dict[str, Any] = plain(spec)
    if spec.rules:  # the rules decide: the single form's fields they replace are not shown
        for replaced in ("attempts", "statuses", "connect_errors", "timeouts"):
            shown.pop(replaced)
        shown["attempts"] = f"at most {spec.attempts} per pool (the first, plus each rule's retries)"
        shown["rules"] = [rule.describe() for rule in spec.rules]
    else:
        shown.pop("rules")
    if spec.methods is None:
        shown.pop("methods")
    if set_in(ctx.source, "retry"):
        source = "route"
    elif set_in(ctx.policy, "retry"):
        source = "policy"
    else:
        source = "default"
    return value_of(shown, source)


def tool_section(ctx: Context) -> dict[str, Any] | None:
    """Where a tool route sends the path asked about: the prefix replaced by the upstream's base_url."""
    prefix = ctx.route.tool_prefix
    if prefix is None:
        return None
    upstream = ctx.plan.upstreams.get(ctx.route.upstream)
    base = upstream.base_url if upstream is not None and upstream.base_url else ""
    suffix = ctx.path[len(prefix):] if ctx.path.startswith(prefix) else ""
    return {
        "prefix": prefix,
        "sent_to": base + suffix + " (plus the request's query string)",
        "body": "forwarded byte for byte (read whole within max_body_size); no model, no token accounting",
        "errors": "the upstream's relayed as they came; the proxy's own in the neutral shape (docs/apps/errors.md)",
    }
