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
        *scenario_table(doc["scenarios"]),
        "",
        *ratio_table(doc["ratios"]),
    ]
    return "\n".join(lines)


def scenario_table(scenarios: list[dict[str, Any]]) -> list[str]:
    """The scenario table's lines: one row per scenario."""
    lines = [
        "| scenario | calls/s | edges/s | p50 ms | p90 ms | p99 ms | errors | server CPU % |"
        " db CPU % | server RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in scenarios:
        edges = _num(r["items_per_s"], 0) if r["items_per_s"] else ""
        lines.append(
            f"| {r['name']} | {_num(r['calls_per_s'], 0)} | {edges} | {_num(r['p50_ms'])} |"
            f" {_num(r['p90_ms'])} | {_num(r['p99_ms'])} | {r['errors']} |"
            f" {r['server_cpu_pct']:.0f} | {r['db_cpu_pct']:.0f} |"
            f" {r['server_peak_rss_mb']:.0f} |"
        )
    return lines


def _met(met: bool | None) -> str:
    return {True: "yes", False: "**no**", None: "n/a"}[met]


def ratio_table(ratios: list[dict[str, Any]]) -> list[str]:
    """The target table's lines: figure, value, target, met."""
    lines = ["| figure | value | target | met |", "|---|---:|---:|:---:|"]
    for t in ratios:
        target = f"{t['op']} {_num(t['target'])}"
        lines.append(f"| {t['figure']} | {_num(t['value'])} | {target} | {_met(t['met'])} |")
    return lines


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


# -- make bench-citus -------------------------------------------------------------------------

# Throughput of the Citus cluster / one plain PostgreSQL, per scenario: at least this.
CLUSTER_TARGETS: dict[str, float] = {
    "grpc:check100": 0.5,
    "grpc:getinfo20": 0.5,
    "grpc:getinfo1@celebrity": 0.5,
    "grpc:list@first": 0.5,
    "grpc:list@deep": 0.5,
    "grpc:follow20": 0.3,
    "grpc:unfollow20": 0.3,
    "grpc:follow1@celebrity": 0.3,
}

# The in-run ratios of the usual target table that a gRPC-only run can compute.
CITUS_RUN_RATIOS = (
    "check_vs_empty",
    "getinfo_vs_empty",
    "list_first_vs_empty",
    "deep_vs_first_latency",
    "getinfo_celebrity_vs_small_latency",
    "celebrity_vs_distinct_follow",
    "server_peak_rss_mb",
)


def render_citus_table(doc: dict[str, Any]) -> str:
    """The Citus bench's tables: each system's usual tables, the cluster / single node
    ratios with their targets, the deadlocks, and the statements profiled on both."""
    m = doc["machine"]
    g = doc["graph"]
    cfg = doc["config"]
    seed = doc["seed"]
    v = doc["versions"]
    lines = [
        f"citus {doc['profile']} run, git {doc['git']['revision'][:10]}"
        f"{' (dirty)' if doc['git']['dirty'] else ''}: {m['cpu_count']} x {m['cpu_model']},"
        f" {m['memory_gb']} GB, Python {m['python']}, load average (1 min) at start"
        f" {m['load_average_at_start'][0]}, at end {m['load_average_at_end'][0]}"
        " (other work shares this machine: figures are noisy)",
        f"single node: PostgreSQL {v['single']}; cluster: PostgreSQL {v['cluster']} +"
        f" {v['citus']}, coordinator + {cfg['cluster']['workers']} workers,"
        f" {cfg['cluster']['shards']} shards per table, all on this machine",
        f"graph: {g['params']['users']:,} users, {g['edges']:,} edges, celebrity"
        f" {g['celebrity']} with {g['params']['celebrity_followers']:,} followers;"
        f" single node seeded by the bulk importer ({g['import']['edges_per_s']:,} edges/s),"
        f" cluster seeded by {seed['cluster']['method']}"
        + (
            f" (the importer failed there: {seed['cluster']['import_error']})"
            if seed["cluster"].get("import_error")
            else ""
        ),
        f"load: {cfg['concurrency']} calls in flight from {cfg['processes']} processes,"
        f" {cfg['warmup']}s warm-up + {cfg['duration']}s measured per scenario;"
        f" server workers: {cfg['server_workers']}",
    ]
    for key, title in (("single", "single node"), ("cluster", "Citus cluster")):
        t = doc["systems"][key]
        lines += ["", f"### {title}", "", *scenario_table(t["scenarios"])]
        shown = [r for r in t["ratios"] if r["key"] in CITUS_RUN_RATIOS]
        lines += ["", *ratio_table(shown)]
    lines += [
        "",
        "### cluster / single node",
        "",
        "| scenario | single calls/s | cluster calls/s | ratio | target | met |"
        " single p50 ms | cluster p50 ms | Citus statements / call: single-shard |"
        " multi-shard | worker connections opened / call |",
        "|---|---:|---:|---:|---:|:---:|---:|---:|---:|---:|---:|",
    ]
    for c in doc["comparison"]:
        target = f">= {c['target']:.1f}" if c["target"] is not None else ""
        met = _met(c["met"]) if c["target"] is not None else ""
        lines.append(
            f"| {c['scenario']} | {_num(c['single_calls_per_s'], 0)} |"
            f" {_num(c['cluster_calls_per_s'], 0)} | {_num(c['ratio'])} | {target} | {met} |"
            f" {_num(c['single_p50_ms'])} | {_num(c['cluster_p50_ms'])} |"
            f" {_num(c['single_shard_per_call'])} | {_num(c['multi_shard_per_call'])} |"
            f" {_num(c['connections_opened_per_call'])} |"
        )
    lines += [
        "",
        "### where the cluster's backends are (mean busy backends per node, sampled every"
        " 0.1 s; top 4)",
        "",
        "| scenario | busy backends: node: state wait event |",
        "|---|---|",
    ]
    for c in doc["comparison"]:
        busy = c.get("cluster_busy_backends") or {}
        top = ", ".join(f"{k} {v:.1f}" for k, v in list(busy.items())[:4])
        lines.append(f"| {c['scenario']} | {top} |")
    d = doc["deadlocks"]
    lines += [
        "",
        f"deadlocks during the cluster's scenarios: {d['total']} (target 0): distributed"
        f' (Citus\' detector, "distributed deadlock" in the node logs) {d["distributed"]},'
        f" local (pg_stat_database.deadlocks, all {len(d['nodes'])} nodes) {d['local']};"
        f" log lines naming a deadlock: nodes {d['log_lines']}, follow-server"
        f" {d['server_log_lines']}; single node for comparison: {d['single_node']}",
        "",
        "### statements without the bench's load (one client, prepared, median of repeated"
        " runs; before the scenarios)",
        "",
        "| statement | single ms | cluster ms | cluster / single | Citus tasks |"
        " worker connections opened / run |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for st in doc["statements"]:
        ratio = st["cluster_ms"] / st["single_ms"] if st["single_ms"] else None
        lines.append(
            f"| {st['name']} | {_num(st['single_ms'], 3)} | {_num(st['cluster_ms'], 3)} |"
            f" {_num(ratio, 1)} | {st['tasks'] if st['tasks'] is not None else 'n/a'} |"
            f" {_num(st['cluster_connections_opened_per_run'])} |"
        )
    return "\n".join(lines)


def render_citus_chart(doc: dict[str, Any], path: Path) -> None:
    """Grouped bars, single node vs cluster, per scenario; below, the ratio and its target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["comparison"]
    names = [c["scenario"] for c in rows]
    x = list(range(len(names)))
    width = 0.4
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(12, 9), sharex=True, gridspec_kw={"height_ratios": [3, 2]}
    )
    single = [c["single_calls_per_s"] or 0 for c in rows]
    cluster = [c["cluster_calls_per_s"] or 0 for c in rows]
    top.bar([i - width / 2 for i in x], single, width, label="single PostgreSQL", color="#3b75af")
    top.bar(
        [i + width / 2 for i in x],
        cluster,
        width,
        label="Citus (coordinator + 2 workers)",
        color="#e1812c",
    )
    top.set_ylabel("calls / s")
    top.legend()
    v = doc["versions"]
    top.set_title(
        f"follow-service citus {doc['profile']} bench @ {doc['git']['revision'][:10]}"
        f" ({doc['machine']['cpu_count']} CPU, all nodes on one machine;"
        f" PostgreSQL {v['single'].split()[0]}, {v['citus']})"
    )
    ratios = [c["ratio"] or 0 for c in rows]
    colors = [
        "#999999" if c["met"] is None else ("#4c9a2a" if c["met"] else "#c03d3e") for c in rows
    ]
    bottom.bar(x, ratios, 0.6, color=colors)
    for i, c in enumerate(rows):
        if c["ratio"] is not None:
            bottom.text(i, c["ratio"], f"{c['ratio']:.2f}", ha="center", va="bottom", fontsize=8)
    for i, c in enumerate(rows):
        if c["target"] is not None:
            bottom.hlines(c["target"], i - 0.35, i + 0.35, colors="black", linestyles="--")
    bottom.axhline(1.0, color="#999999", linewidth=0.8)
    bottom.set_ylabel("cluster / single (dashes: target)")
    bottom.set_xticks(x)
    bottom.set_xticklabels(names, rotation=40, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
