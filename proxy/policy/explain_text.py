"""`signalbox explain`'s terminal rendering of an explain answer (pure): one line per setting, each with
where it came from. The answer itself is computed in explain.py; `GET /admin/explain` returns it as JSON."""

from __future__ import annotations

import json
from typing import Any

from proxy.policy.explain import COMPILED_SECTIONS, LIMIT_FIELDS


def format_text(answer: dict[str, Any]) -> str:
    """A readable rendering for the terminal: one line per setting, each with where it came from."""
    lines = [
        f"request:  {answer['request']['path']} model={answer['request']['model']!r}",
        f"tenant:   {answer['tenant']['name']} (identified by {answer['tenant']['identified_by']})",
        f"policy:   {answer['policy']}",
    ]
    for skip in answer.get("skipped", ()):
        lines.append(f"  skipped route {skip['route']}: {skip['reason']}")
    route = answer.get("route")
    if route is None:
        lines.append(f"route:    none: {answer.get('why', '')}")
        return "\n".join(lines)
    lines.append(f"route:    {route['name']} (#{route['index']}): {route['why']}")
    up = answer.get("upstream")
    if up is not None:
        lines.append(
            f"upstream: {up['name']} ({up['provider']}, {up['base_url']}), "
            f"pool {up['pool']['max_connections']} connections, keep-alive {up['pool']['keepalive']}"
        )
        if up.get("hide_response_headers"):
            lines.append(f"  response headers not relayed: {', '.join(up['hide_response_headers'])}")
    lines.append(f"model sent upstream: {answer['model_sent_upstream']}")
    if "protocol" in answer:
        lines.append(f"protocol: {answer['protocol']}")
    lines.append("timeouts: " + _pairs(answer["timeouts"]))
    limits = answer["limits"]
    lines.append(
        f"limits:   on_limit={_shown(limits['on_limit'])}, "
        f"default_max_tokens={_shown(limits['default_max_tokens'])}"
    )
    for check in limits["checks"]:
        numbers = ", ".join(f"{f}={check[f]}" for f in LIMIT_FIELDS if f in check)
        where = "from " + check["from"]
        if "deployments" in check:  # admission checks are the default; upstream ones say where they bite
            where += f", checked {check['checked']} on " + ", ".join(check["deployments"])
        lines.append(f"  {check['scope']} [{check['key']}] ({where}): {numbers}")
    if not limits["checks"]:
        lines.append("  no limits apply")
    if "upstream_limits" in limits:
        lines.append(f"  ({limits['upstream_limits']})")
    if "queue" in answer:
        queue = answer["queue"]
        name = queue["name"]["value"]
        rest = {k: v for k, v in queue.items() if k != "name"}
        lines.append(f"queue:    {name}: " + _pairs(rest))
    else:
        lines.append("queue:    none (no slot limit; sent at once)")
    priority = answer["priority"]
    lines.append("priority: " + _pairs({k: v for k, v in priority.items() if k != "classes"}))
    lines.append("stream:   " + _pairs(answer["stream"]))
    for name in COMPILED_SECTIONS:
        if name in answer:
            value = json.dumps(answer[name]["value"], separators=(", ", ": "))
            lines.append(f"{name}: {value} (from {answer[name]['from']})")
    for field, entries in (answer.get("other") or {}).items():
        for entry in entries:
            lines.append(f"{field} (from {entry['from']}): {entry['value']}")
    return "\n".join(lines)


def _shown(entry: dict[str, Any]) -> str:
    value = "unset" if entry["value"] is None else entry["value"]
    return f"{value} (from {entry['from']})"


def _pairs(entries: dict[str, dict[str, Any]]) -> str:
    return ", ".join(f"{k}={_shown(v)}" for k, v in entries.items())
