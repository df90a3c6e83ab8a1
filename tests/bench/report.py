"""The benchmark's outputs: the terminal/README table and the PNG chart."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

# (key, figure, comparison, target): the target table.
RATIO_TARGETS: list[tuple[str, str, str, float]] = [
    ("check_vs_empty", "Check(100) throughput / empty-RPC ceiling", ">=", 0.5),
    ("getinfo_vs_empty", "GetInfo(20) throughput / empty-RPC ceiling", ">=", 0.7),
    ("list_first_vs_empty", "List first page throughput / empty-RPC ceiling", ">=", 0.5),
    ("deep_vs_first_latency", "deep-page p50 / first-page p50 (celebrity fans)", "<=", 1.5),
    (
        "getinfo_celebrity_vs_small_latency",
        "GetInfo p50, celebrity / user with 10 followers",
        "<=",
        1.2,
    ),
    ("follow_vs_db", "Follow(20) edges/s / database ceiling (same SQL)", ">=", 0.5),
    ("celebrity_vs_distinct_follow", "celebrity-follow / distinct-target follow", ">=", 0.7),
    ("v4_vs_grpc_check", "v4 follow_check / gRPC Check throughput", ">=", 0.6),
    ("import_edges_per_s", "bulk import, edges/s", ">=", 100_000),
    ("server_peak_rss_mb", "server peak RSS under load, MB", "<=", 300),
]


def _num(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def render_table(doc: dict[str, Any]) -> str:
    """Markdown tables (readable on a terminal too): scenarios, then targets."""
    m = doc["machine"]
    g = doc["graph"]
    cfg = doc["config"]
    imp = g["import"]
    lines = [
        f"{doc['profile']} run, git {doc['git']['revision'][:10]}"
        f"{' (dirty)' if doc['git']['dirty'] else ''}: {m['cpu_count']} x {m['cpu_model']},"
        f" {m['memory_gb']} GB, Python {m['python']}, PostgreSQL {m['postgres']},"
        f" load average at start {m['load_average_at_start'][0]}",
        f"graph: {g['params']['users']:,} users, {g['edges']:,} edges, celebrity"
        f" {g['celebrity']} with {g['params']['celebrity_followers']:,} followers,"
        f" {g['mutual_pairs']:,} mutual pairs; import {imp['edges_per_s']:,} edges/s"
        f" ({imp['seconds']}s{', cached seed' if g.get('cached') else ''})",
        f"load: {cfg['concurrency']} calls in flight from {cfg['processes']} processes,"
        f" {cfg['warmup']}s warm-up + {cfg['duration']}s measured per scenario;"
        f" server workers: {cfg['server_workers']}",
        "",
        "| scenario | calls/s | edges/s | p50 ms | p90 ms | p99 ms | errors | server CPU % |"
        " db CPU % | server RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in doc["scenarios"]:
        edges = _num(r["items_per_s"], 0) if r["items_per_s"] else ""
        lines.append(
            f"| {r['name']} | {_num(r['calls_per_s'], 0)} | {edges} | {_num(r['p50_ms'])} |"
            f" {_num(r['p90_ms'])} | {_num(r['p99_ms'])} | {r['errors']} |"
            f" {r['server_cpu_pct']:.0f} | {r['db_cpu_pct']:.0f} |"
            f" {r['server_peak_rss_mb']:.0f} |"
        )
    lines += ["", "| figure | value | target | met |", "|---|---:|---:|:---:|"]
    for t in doc["ratios"]:
        met = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
        target = f"{t['op']} {_num(t['target'])}"
        lines.append(f"| {t['figure']} | {_num(t['value'])} | {target} | {met} |")
    return "\n".join(lines)


def render_chart(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = doc["scenarios"]
    names = [s["name"] for s in scenarios]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(12, 9), sharex=True)
    colors = ["#999999" if n.startswith("db:") or n == "grpc:empty" else "#3b75af" for n in names]
    top.bar(names, [s["calls_per_s"] for s in scenarios], color=colors)
    top.set_ylabel("calls / s")
    top.set_title(
        f"follow-service {doc['profile']} bench @ {doc['git']['revision'][:10]}"
        f" ({doc['machine']['cpu_count']} CPU; grey = ceilings)"
    )
    x = range(len(names))
    for key, label, marker in (
        ("p50_ms", "p50", "o"),
        ("p90_ms", "p90", "s"),
        ("p99_ms", "p99", "^"),
    ):
        bottom.plot(x, [s[key] for s in scenarios], marker=marker, linestyle="", label=label)
    bottom.set_yscale("log")
    bottom.set_ylabel("latency, ms (log)")
    bottom.legend()
    bottom.set_xticks(list(x))
    bottom.set_xticklabels(names, rotation=40, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
