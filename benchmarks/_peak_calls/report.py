"""The readable table (stdout) and the chart (PNG, matplotlib's Agg backend)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from _peak_calls.analysis import finite, per_second

KEYS = (
    "rate",
    "verdict",
    "calls",
    "host_errors",
    "ack_p50_ms",
    "ack_p99_ms",
    "popup_p50_ms",
    "popup_p99_ms",
    "popups_missing",
    "history_p99_ms",
    "lost",
    "crm_requests_per_call",
    "crm_rate_limited",
    "pg_queries_per_event",
    "pg_xacts_per_event",
    "host_cpu_pct",
    "host_lag_p99_ms",
    "cpu_pct",
    "other_cpu_pct",
    "rss_mib",
    "drain_s",
)


def step_json(step: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in KEYS:
        value = step.get(key)
        out[key] = finite(value) if isinstance(value, float) else value
    return out


def _num(value: Any, width: int, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return f"{'-':>{width}}"
    if isinstance(value, float) and math.isinf(value):
        return f"{'never':>{width}}"
    return f"{value:>{width},.{digits}f}"


def table(
    figures: dict[str, Any],
    ours: list[dict[str, Any]],
    naive: list[dict[str, Any]],
    steady: dict[str, Any],
) -> None:
    print()
    print(
        "knee search (popup p99 <= 1 s, no loss, ack p99 <= 50 ms); latencies in ms; CPU in % "
        "of one core: the system (every process but the hosts), the simulated hosts, and other "
        "work on the machine"
    )
    head = (
        f"{'design':<6}{'calls/s':>8}{'ack p99':>9}{'popup p50':>10}{'popup p99':>10}"
        f"{'missing':>8}{'hist p99':>9}{'lost':>6}{'req/call':>9}{'503s':>6}{'pg q/ev':>8}"
        f"{'cpu sys':>8}{'hosts':>6}{'other':>6}  verdict"
    )
    print(head)
    for step in [*ours, *naive]:
        print(
            f"{step['design']:<6}{step['rate']:>8g}{_num(step['ack_p99_ms'], 9, 1)}"
            f"{_num(step['popup_p50_ms'], 10)}{_num(step['popup_p99_ms'], 10)}"
            f"{step['popups_missing']:>8}{_num(step['history_p99_ms'], 9)}{step['lost']:>6}"
            f"{step['crm_requests_per_call']:>9.2f}{step['crm_rate_limited']:>6}"
            f"{step['pg_queries_per_event']:>8.2f}{sum(step['cpu_pct'].values()):>8.0f}"
            f"{step['host_cpu_pct']:>6.0f}{step['other_cpu_pct']:>6.0f}  {step['verdict']}"
        )
    ratio = figures["ratio"]
    print(
        f"knee: ours {figures['knee_calls_per_s']:g} calls/s, naive "
        f"{figures['naive_knee_calls_per_s']:g} calls/s, ratio "
        f"{'-' if ratio is None else f'{ratio:.2f}'} (target >= 3)"
    )
    print()
    print(f"ours at {figures['load_calls_per_s']:g} calls/s")
    print(
        f"{'scenario':<18}{'calls':>7}{'host err':>9}{'ack p99':>9}{'popup p99':>10}"
        f"{'missing':>8}{'hist p99':>9}{'lost':>6}{'recovery s':>11}  popups not shown"
    )
    for name, s in figures["scenarios"].items():
        recovery = s.get("recovery_s")
        reasons = ", ".join(f"{k} {v}" for k, v in s.get("popups_expired", {}).items()) or "-"
        if s.get("skipped"):
            reasons = f"skipped: {s['skipped']}"
        print(
            f"{name:<18}{s['calls']:>7}{s['host_errors']:>9}{_num(s['ack_p99_ms'], 9, 1)}"
            f"{_num(s['popup_p99_ms'], 10)}{s['popups_missing']:>8}"
            f"{_num(s['history_p99_ms'], 9)}{s['lost']:>6}"
            f"{_num(recovery, 11, 1) if 'fault_s' in s else f'{chr(45):>11}'}  {reasons}"
        )
    print()
    per_call = figures["cpu_ms_per_call"]
    print(
        f"processes at {figures['load_calls_per_s']:g} calls/s (steady): CPU % of a core, "
        "CPU ms per call, peak RSS MiB"
    )
    for kind in sorted(steady["cpu_pct"]):
        print(
            f"  {kind:<16}{steady['cpu_pct'][kind]:>7.1f} %{per_call[kind]:>7.2f} ms"
            f"{steady['rss_mib'].get(kind, 0.0):>9.0f} MiB"
        )
    print(
        f"  {'hosts (sim)':<16}{steady['host_cpu_pct']:>7.1f} %{per_call['hosts']:>7.2f} ms"
        f"   lag p99 {steady['host_lag_p99_ms']:.1f} ms (the load generator is not the "
        "bottleneck while these stay low)"
    )
    print(
        f"  {'ours + PG':<16}{'':>9}{per_call['ours_and_postgres']:>7.2f} ms   (what a box without "
        "the stand-ins carries: cores ~ calls/s x this / 1000, plus headroom)"
    )
    print(f"  {'other work':<16}{steady['other_cpu_pct']:>7.1f} %   (not ours: shares the cores)")
    print(
        f"RetailCRM requests/call {figures['crm_requests_per_call']}, rate-limited "
        f"{figures['crm_rate_limited']} (naive: {figures['naive_crm_rate_limited']}); "
        f"PostgreSQL statements/event {figures['pg_queries_per_event']}, "
        f"transactions/event {figures['pg_xacts_per_event']}; lost {figures['lost']}"
        f" (late: still pending when the run stopped waiting {figures['late_at_end']})"
    )
    if figures["contended"]:
        print(
            f"WARNING: other work on this machine used up to {figures['other_cpu_pct_max']:.0f} % "
            "of a core while this ran (column 'other'): these figures measure the machine's "
            "contention as much as the system; run it again on a quiet machine."
        )
    print(f"chart: {figures['chart']}")


def save(folder: Path, figures: dict[str, Any]) -> Path:
    """The figures beside the chart, for comparing runs."""
    path = folder / "peak_calls.json"
    path.write_text(json.dumps(figures, indent=1) + "\n")
    return path


def charts(
    folder: Path,
    *,
    timeline: list[Any],
    t0: float,
    records: Any,
    ours: list[dict[str, Any]],
    naive: list[dict[str, Any]],
    ours_knee: float,
    naive_knee: float,
    load: float,
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "peak_calls.png"
    fig = plt.figure(figsize=(13, 9), dpi=100)
    grid = fig.add_gridspec(2, 2, height_ratios=[1.2, 1])
    _timeline(fig.add_subplot(grid[0, :]), timeline, t0, records, load)
    knees = [fig.add_subplot(grid[1, 0]), fig.add_subplot(grid[1, 1])]
    _knee(knees[0], ours, naive, "popup_p99_ms", 1000, "popup p99 (ms)")
    _knee(knees[1], ours, naive, "ack_p99_ms", 50, "webhook ack p99 (ms)")
    for knee, color in ((ours_knee, "tab:blue"), (naive_knee, "tab:red")):
        if knee:
            for ax in knees:
                ax.axvline(knee, color=color, linestyle=":", linewidth=1)
    fig.suptitle(
        f"Peak calls: knee ours {ours_knee:g} calls/s, naive {naive_knee:g} calls/s",
        fontsize=13,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _timeline(ax: Any, timeline: list[Any], t0: float, records: Any, load: float) -> None:
    cap = 60_000.0
    shown, missing = [], []
    for scenario in timeline:
        for sent, latency in scenario.figures.popups:
            if math.isinf(latency):
                missing.append(sent - t0)
            else:
                shown.append((sent - t0, max(latency * 1000, 1.0)))
    if shown:
        xs, ys = zip(*shown, strict=True)
        ax.scatter(xs, ys, s=2, alpha=0.25, color="tab:blue", label="popup latency")
    if missing:
        ax.scatter(
            missing, [cap] * len(missing), s=8, marker="x", color="tab:red", label="never shown"
        )
    points = [(sent, lat * 1000) for s in timeline for sent, lat in s.figures.popups]
    series = dict(per_second(points, t0))
    if series:
        # A second without popups (its webhooks all failed) breaks the line.
        xs = list(range(min(series), max(series) + 1))
        ys = [min(series[x], cap) if x in series else math.nan for x in xs]
        ax.plot(xs, ys, color="black", linewidth=1, label="popup p99 per second")
    for scenario in timeline:
        if scenario.fault is not None:
            a, b = scenario.fault[0] - t0, scenario.fault[1] - t0
            ax.axvspan(a, max(b, a + 0.5), color="tab:orange", alpha=0.25)
            ax.text(a, cap * 1.5, scenario.fault_label, fontsize=8, va="bottom")
    ax.axhline(1000, color="gray", linestyle="--", linewidth=1)
    ax.set_yscale("log")
    ax.set_ylim(1, cap * 5)
    ax.set_xlabel("seconds since the start of the fault timeline")
    ax.set_ylabel("popup latency (ms); x = never shown")
    ax.set_title(f"ours at {load:g} calls/s: popup latency (host sent -> RetailCRM received)")
    # Offered load and unacknowledged webhooks per second, on a second axis: a second whose
    # webhooks all failed has no popup to plot.
    load_axis = ax.twinx()
    offered: dict[int, int] = {}
    for _, _, _, start in records.calls:
        offered[int(start - t0)] = offered.get(int(start - t0), 0) + 1
    failed: dict[int, int] = {}
    for _, _, sent, _, status, _ in records.hooks:
        if status != 200:
            failed[int(sent - t0)] = failed.get(int(sent - t0), 0) + 1
    if offered:
        xs = sorted(offered)
        load_axis.step(
            xs,
            [offered[x] for x in xs],
            where="post",
            color="gray",
            linewidth=1,
            label="offered calls/s",
        )
    if failed:
        xs = sorted(failed)
        load_axis.step(
            xs,
            [failed[x] for x in xs],
            where="post",
            color="tab:red",
            linewidth=1,
            label="webhooks failed/s (host timeout or error)",
        )
    load_axis.set_ylabel("per second")
    load_axis.set_ylim(bottom=0)
    handles, labels = ax.get_legend_handles_labels()
    more, more_labels = load_axis.get_legend_handles_labels()
    ax.legend(
        handles + more,
        labels + more_labels,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.12),
        ncol=5,
        fontsize=8,
        markerscale=3,
    )


def _knee(
    ax: Any,
    ours: list[dict[str, Any]],
    naive: list[dict[str, Any]],
    key: str,
    limit: float,
    label: str,
) -> None:
    cap = 60_000.0
    for steps, name, color in ((ours, "ours", "tab:blue"), (naive, "naive", "tab:red")):
        xs = [s["rate"] for s in steps]
        ys = [min(s[key], cap) if not math.isnan(s[key]) else cap for s in steps]
        ax.plot(xs, ys, marker="o", color=color, label=name)
    ax.axhline(limit, color="gray", linestyle="--", linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("offered calls/s")
    ax.set_ylabel(label)
    ax.set_title(f"{label} vs offered load (limit {limit:g} ms)")
    ax.legend(fontsize=8)
