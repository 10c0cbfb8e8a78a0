"""`signalbox explain`'s terminal rendering of an explain answer (pure): one line per setting, each with
where it came from; structured values (deployments, retry, breaker…) as YAML, the form they are written
in. The answer itself is computed in explain.py; `GET /admin/explain` returns it as JSON."""

from __future__ import annotations

from typing import Any

import yaml

from proxy.policy.explain import COMPILED_SECTIONS, LIMIT_FIELDS


def format_text(answer: dict[str, Any]) -> str:
    """A readable rendering for the terminal: one line per setting, each with where it came from."""
    lines = _head(answer)
    route = answer.get("route")
    if route is None:
        lines.append(f"route:    none: {answer.get('why', '')}")
        return "\n".join(lines)
    lines.append(f"route:    {route['name']} (#{route['index']}): {route['why']}")
    lines += _upstream(answer.get("upstream"))
    if "tool" in answer:
        lines.append(f"tool:     prefix {answer['tool']['prefix']} -> {answer['tool']['sent_to']}")
    lines.append(f"model sent upstream: {answer['model_sent_upstream']}")
    if "protocol" in answer:
        lines.append(f"protocol: {answer['protocol']}")
    lines.append("timeouts: " + _pairs(answer["timeouts"]))
    lines += _limits(answer["limits"])
    lines.append(_queue(answer.get("queue")))
    priority = answer["priority"]
    lines.append("priority: " + _pairs({k: v for k, v in priority.items() if k != "classes"}))
    lines.append("stream:   " + _pairs(answer["stream"]))
    for name in COMPILED_SECTIONS:
        if name in answer:
            lines += _yaml_value(name, answer[name]["value"], answer[name]["from"])
    for field, entries in (answer.get("other") or {}).items():
        for entry in entries:
            lines += _yaml_value(field, entry["value"], entry["from"])
    return "\n".join(lines)


def _head(answer: dict[str, Any]) -> list[str]:
    model = answer["request"]["model"]
    lines = [
        f"request:  {answer['request']['path']} " + (f"model={model!r}" if model else "(no model)"),
        f"tenant:   {answer['tenant']['name']} (identified by {answer['tenant']['identified_by']})",
        f"policy:   {answer['policy']}",
    ]
    return lines + [f"  skipped route {s['route']}: {s['reason']}" for s in answer.get("skipped", ())]


def _upstream(up: dict[str, Any] | None) -> list[str]:
    if up is None:
        return []
    lines = [
        f"upstream: {up['name']} ({up['provider']}, {up['base_url']}), "
        f"pool {up['pool']['max_connections']} connections, keep-alive {up['pool']['keepalive']}"
    ]
    if up.get("hide_response_headers"):
        lines.append(f"  response headers not relayed: {', '.join(up['hide_response_headers'])}")
    return lines


def _limits(limits: dict[str, Any]) -> list[str]:
    lines = [
        f"limits:   on_limit={_shown(limits['on_limit'])}, "
        f"default_max_tokens={_shown(limits['default_max_tokens'])}"
    ]
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
    return lines


def _queue(queue: dict[str, Any] | None) -> str:
    if queue is None:
        return "queue:    none (no slot limit; sent at once)"
    rest = {k: v for k, v in queue.items() if k != "name"}
    return f"queue:    {queue['name']['value']}: " + _pairs(rest)


def _yaml_value(name: str, value: Any, source: str) -> list[str]:
    """`name (from source): value` for a scalar; a mapping or list as an indented YAML block below."""
    if not isinstance(value, dict | list) or not value:
        text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
        return [f"{name} (from {source}): {text}"]
    # Block style at the top (a one-key mapping would otherwise come out in braces), flow style for leaves.
    parts = [{k: v} for k, v in value.items()] if isinstance(value, dict) else [value]
    block = "".join(_dump(p) for p in parts)
    return [f"{name} (from {source}):"] + ["  " + line for line in block.rstrip("\n").splitlines()]


def _dump(part: Any) -> str:
    """Flow style only below the top level: `{k: scalar}` alone would be a leaf, so it is dumped as block."""
    leaf = isinstance(part, dict) and not any(isinstance(v, dict | list) for v in part.values())
    return yaml.safe_dump(part, default_flow_style=False if leaf else None, sort_keys=False, width=1_000)


def _shown(entry: dict[str, Any]) -> str:
    value = "unset" if entry["value"] is None else entry["value"]
    return f"{value} (from {entry['from']})"


def _pairs(entries: dict[str, dict[str, Any]]) -> str:
    return ", ".join(f"{k}={_shown(v)}" for k, v in entries.items())
