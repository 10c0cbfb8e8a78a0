"""The overhead benchmark's report: one run's table (every target beside the floor), the issue's targets,
and, over several runs, each run's ratios with their median and spread."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

Metrics = dict[str, float]
PROXIES = ("minimal", "full", "traced")
"""The proxy's targets, one per policy (bench/overhead_policies.py); each is compared with the floor."""

# (key, label, decimals, take the ratio target ÷ floor)
ROWS = [
    ("rps_c64", "requests/s at c64", 0, True),
    ("cpu_us_per_req", "CPU µs per request (c64)", 1, True),
    ("lat_p50_ms", "latency p50 at c1, ms", 3, False),
    ("lat_p99_ms", "latency p99 at c1, ms", 3, False),
    ("added_p50_ms", "added latency p50 at c1, ms", 3, True),
    ("added_p99_ms", "added latency p99 at c1, ms", 3, True),
    ("ttfc_p50_ms", "stream TTFC p50, ms", 2, False),
    ("ttfc_p99_ms", "stream TTFC p99, ms", 2, False),
    ("added_ttfc_p50_ms", "added TTFC p50, ms", 2, True),
    ("added_ttfc_p99_ms", "added TTFC p99, ms", 2, True),
    ("cpu_us_per_event", "CPU µs per relayed event", 1, True),
    ("events", "events relayed", 0, False),
    ("events_per_stream", "events per stream", 1, False),
    ("rss_idle_mib", "RSS before streams, MiB", 1, False),
    ("rss_peak_streams_mib", "RSS peak with streams, MiB", 1, False),
    ("rss_per_stream_kib", "≈ RSS per open stream, KiB", 1, False),
    ("vm_hwm_mib", "peak RSS (VmHWM), MiB", 1, True),
    ("target_cpu_pct", "its own CPU % (c64)", 0, False),
    ("load_cpu_busy_pct", "load CPU busy % (c64)", 0, False),
    ("others_c64_pct", "not ours on the CPUs %, c64", 0, False),
    ("others_c1_pct", "not ours on the CPUs %, c1", 0, False),
    ("others_streams_pct", "not ours on the CPUs %, streams", 0, False),
    ("steal_pct", "hypervisor steal %, worst", 1, False),
]


@dataclass(frozen=True)
class Goal:
    """One of the issues' targets: `target`'s `key`, as a ratio to the floor or as measured, at most `limit`."""

    what: str
    target: str
    key: str
    ratio: bool
    limit: float


GOALS = [
    Goal("CPU per request, minimal ÷ floor ≤ 1.5", "minimal", "cpu_us_per_req", True, 1.5),
    Goal("CPU per request, full ÷ floor ≤ 1.35", "full", "cpu_us_per_req", True, 1.35),
    Goal("added latency p50 at c1 ≤ 0.4 ms", "minimal", "added_p50_ms", False, 0.4),
    Goal("CPU per relayed event, minimal ÷ floor ≤ 1.3", "minimal", "cpu_us_per_event", True, 1.3),
]


def ratios(results: dict[str, Metrics]) -> dict[str, Metrics]:
    """Each proxy target's ratios to the floor measured in the same run, by target."""
    floor = results.get("floor")
    if floor is None:
        return {}
    out: dict[str, Metrics] = {}
    for name in PROXIES:
        if name not in results:
            continue
        p = results[name]
        # a ratio to a floor value that is zero, negative (noise in a difference) or not measured means nothing
        out[name] = {key: p[key] / floor[key] for key, _, _, ratio in ROWS
                     if ratio and key in p and floor.get(key, 0) > 0 and not math.isnan(p[key])}
    return out


def cell(value: float | None, decimals: int) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:,.{decimals}f}"


def goal_value(goal: Goal, results: dict[str, Metrics], ratio: dict[str, Metrics]) -> float | None:
    source = ratio if goal.ratio else results
    value = source.get(goal.target, {}).get(goal.key)
    return None if value is None or math.isnan(value) else value


def render(results: dict[str, Metrics], header: str, warnings: list[str]) -> str:
    cols = [name for name in ("direct", "floor", *PROXIES) if name in results]
    ratio = ratios(results)
    head = (f"{'metric':<30}" + "".join(f"{c:>12}" for c in cols)
            + "".join(f"{name + '÷floor':>14}" for name in ratio))
    lines = [header, "", head, "-" * len(head)]
    for key, label, decimals, _ in ROWS:
        if any(not math.isnan(results[c].get(key, math.nan)) for c in cols):
            row = f"{label:<30}" + "".join(f"{cell(results[c].get(key), decimals):>12}" for c in cols)
            lines.append(row + "".join(f"{cell(r.get(key), 2):>14}" for r in ratio.values()))
    checks = [(goal, value) for goal in GOALS if (value := goal_value(goal, results, ratio)) is not None]
    if checks:
        lines.append("")
    for goal, value in checks:
        lines.append(f"target: {goal.what:<46} {value:6.2f}  {'ok' if value <= goal.limit else 'MISSED'}")
    lines += [""] + [f"warning: {w}" for w in warnings]
    return "\n".join(lines).rstrip()


def add_deltas(result: Metrics, direct: Metrics) -> Metrics:
    """Added latency and TTFC: through the target minus straight to the upstream, same client, same load."""
    return result | {"added_p50_ms": result["lat_p50_ms"] - direct["lat_p50_ms"],
                     "added_p99_ms": result["lat_p99_ms"] - direct["lat_p99_ms"],
                     "added_ttfc_p50_ms": result["ttfc_p50_ms"] - direct["ttfc_p50_ms"],
                     "added_ttfc_p99_ms": result["ttfc_p99_ms"] - direct["ttfc_p99_ms"]}


def sanity(results: dict[str, Metrics], events: int, cpus: tuple[int, int], warnings: list[str]) -> None:
    for name, m in results.items():
        noisy = {phase: m[f"others_{phase}_pct"] for phase in ("c64", "c1", "streams")
                 if m.get(f"others_{phase}_pct", 0) > 5}
        if noisy:
            worst = ", ".join(f"{phase} {pct:.0f}%" for phase, pct in noisy.items())
            warnings.append(f"{name}: other programs ran on CPUs {cpus[0]},{cpus[1]} (worst "
                            f"slice: {worst} of a CPU): the machine was not quiet, latency and TTFC suspect")
        if m.get("events_per_stream", events + 1) < events + 1:
            got, want = m["events_per_stream"], events + 1
            warnings.append(f"{name}: {got:.1f} events a stream, expected {want}")
        if name != "direct" and m["rps_c64"] > 0.8 * results["direct"]["rps_c64"]:
            warnings.append(f"{name}: c64 rate near the upstream's own: the load side may be the bottleneck")


# ---- several runs --------------------------------------------------------------------------------------

# (label, target, key, the target it is divided by or "" for the value itself, decimals)
SUMMARY_ROWS: list[tuple[str, str, str, str, int]] = [
    ("CPU µs per request, floor", "floor", "cpu_us_per_req", "", 1),
    ("CPU µs per request, minimal", "minimal", "cpu_us_per_req", "", 1),
    ("CPU µs per request, full", "full", "cpu_us_per_req", "", 1),
    ("  minimal ÷ floor", "minimal", "cpu_us_per_req", "floor", 2),
    ("  full ÷ floor", "full", "cpu_us_per_req", "floor", 2),
    ("  full ÷ minimal", "full", "cpu_us_per_req", "minimal", 2),
    ("  traced ÷ minimal (tracing on)", "traced", "cpu_us_per_req", "minimal", 2),
    ("CPU µs per event, floor", "floor", "cpu_us_per_event", "", 1),
    ("CPU µs per event, minimal", "minimal", "cpu_us_per_event", "", 1),
    ("CPU µs per event, full", "full", "cpu_us_per_event", "", 1),
    ("  minimal ÷ floor (events)", "minimal", "cpu_us_per_event", "floor", 2),
    ("  full ÷ floor (events)", "full", "cpu_us_per_event", "floor", 2),
]


def summary_values(runs: Sequence[dict[str, Metrics]]) -> dict[str, list[float]]:
    """Each summary row's value in every run (rows a run did not measure are left out)."""
    out: dict[str, list[float]] = {}
    for label, target, key, to, _ in SUMMARY_ROWS:
        values = []
        for results in runs:
            value = results.get(target, {}).get(key, math.nan)
            if to:
                base = results.get(to, {}).get(key, math.nan)
                value = value / base if base > 0 else math.nan
            values.append(value)
        if not any(math.isnan(v) for v in values):
            out[label] = values
    return out


def render_summary(runs: Sequence[dict[str, Metrics]]) -> str:
    """One row per figure: each run, the median, and the spread (lowest-highest, and ± % of the median)."""
    values = summary_values(runs)
    head = (f"{'over ' + str(len(runs)) + ' runs':<30}" + "".join(f"{'run ' + str(i + 1):>9}" for i in range(len(runs)))
            + f"{'median':>9}{'spread':>20}")
    lines = [head, "-" * len(head)]
    decimals = {label: d for label, *_, d in SUMMARY_ROWS}
    for label, row in values.items():
        d = decimals[label]
        mid, low, high = statistics.median(row), min(row), max(row)
        pct = 100 * (high - low) / 2 / mid if mid else math.nan
        spread = f"{low:.{d}f}-{high:.{d}f} ±{pct:.0f}%"
        lines.append(f"{label:<30}" + "".join(f"{v:>9.{d}f}" for v in row) + f"{mid:>9.{d}f}{spread:>20}")
    return "\n".join(lines)


def summary_json(runs: Sequence[dict[str, Metrics]]) -> dict[str, dict[str, float | list[float]]]:
    return {label.strip(): {"runs": row, "median": statistics.median(row), "min": min(row), "max": max(row)}
            for label, row in summary_values(runs).items()}
