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


# -- make bench-scale -------------------------------------------------------------------------

# Throughput at the largest graph / at the smallest, per scenario: at least this.
SCALE_TARGET = 0.8


def _mb(value: float | None) -> str:
    return "n/a" if value is None else _num(value / 2**20, 1)


def render_scale_table(doc: dict[str, Any]) -> str:
    """The scale bench's tables: per scenario throughput and latency at each size with the
    largest / smallest ratio; the sizes (import, database, RSS); per-table bytes; B-tree
    depths; each call's statements at each size."""
    m = doc["machine"]
    cfg = doc["config"]
    sizes = doc["sizes"]
    labels = [s["label"] for s in sizes]
    small, large = labels[0], labels[-1]
    lines = [
        f"{doc['profile']} run, git {doc['git']['revision'][:10]}"
        f"{' (dirty)' if doc['git']['dirty'] else ''}: {m['cpu_count']} x {m['cpu_model']},"
        f" {m['memory_gb']} GB, Python {m['python']}, PostgreSQL {m['postgres']} (embedded,"
        f" shared_buffers {sizes[0]['storage']['shared_buffers']}); load average (1 min) at"
        f" start {m['load_average_at_start'][0]}, at end {m['load_average_at_end'][0]:.2f}"
        " (other work shares this machine: figures are noisy)",
        f"load: {cfg['concurrency']} calls in flight from {cfg['processes']} processes,"
        f" {cfg['warmup']}s warm-up + {cfg['duration']}s measured per run; {cfg['rounds']}"
        f" rounds, {cfg['mode']}; figures are medians over the rounds",
        "",
        f"### throughput and latency by graph size (calls/s, ms); {large} / {small}",
        "",
        "| scenario | "
        + " | ".join(f"{x} calls/s | {x} p50 | {x} p99" for x in labels)
        + f" | {large}/{small} | target | met | per-round ratios |",
        "|---|" + "---:|---:|---:|" * len(labels) + "---:|---:|:---:|---|",
    ]
    for row in doc["scenarios"]:
        cells = []
        for x in labels:
            s = row["sizes"][x]
            cells.append(f"{_num(s['calls_per_s'], 0)} | {_num(s['p50_ms'])} | {_num(s['p99_ms'])}")
        target = f">= {row['target']}" if row["target"] is not None else "(control)"
        met = _met(row["met"]) if row["target"] is not None else ""
        rounds = ", ".join(f"{r:.2f}" for r in row["round_ratios"])
        errors = sum(row["sizes"][x]["errors"] for x in labels)
        lines.append(
            f"| {row['scenario']} | {' | '.join(cells)} | {_num(row['ratio'])} | {target} |"
            f" {met} | {rounds}{f' ({errors} errors)' if errors else ''} |"
        )
    lines += [
        "",
        "### round-to-round spread of calls/s ((max - min) / median, %) and load average",
        "",
        "| scenario | " + " | ".join(f"{x} spread %" for x in labels) + " | load average |",
        "|---|" + "---:|" * len(labels) + "---|",
    ]
    for row in doc["scenarios"]:
        spreads, loads = [], []
        for x in labels:
            s = row["sizes"][x]
            values = [v for v in s["rounds_calls_per_s"] if v]
            med = s["calls_per_s"]
            spreads.append(
                _num((max(values) - min(values)) / med * 100, 0) if values and med else "n/a"
            )
            loads += s["load_average"]
        span = f"{min(loads):.1f}-{max(loads):.1f}" if loads else ""
        lines.append(f"| {row['scenario']} | {' | '.join(spreads)} | {span} |")
    lines += [
        "",
        "### sizes: import (when the template was made), database after VACUUM ANALYZE, server RSS",
        "",
        "| size | users | edges | celebrity fans | import s | import edges/s | template |"
        " load at import | database MB | MB per M edges | server RSS idle MB |"
        " server RSS peak MB |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for s in sizes:
        g, st, imp = s["graph"], s["storage"], s["graph"]["import"]
        load = g.get("load_average_at_import")
        made = "cached" if g.get("cached") else "imported now"
        if g.get("seeded_at"):
            made += f" ({g['seeded_at'][:16]})"
        lines.append(
            f"| {s['label']} | {g['params']['users']:,} | {g['edges']:,} |"
            f" {g['params']['celebrity_followers']:,} | {imp['seconds']:.0f} |"
            f" {imp['edges_per_s']:,} | {made} | {load[0] if load else 'n/a'} |"
            f" {_mb(st['database_bytes'])} | {_mb(st['bytes_per_million_edges'])} |"
            f" {_num(s['server_idle_rss_mb'], 0)} | {_num(s['server_peak_rss_mb'], 0)} |"
        )
    lines += [
        "",
        "### per table: heap + indexes, MB (bytes per edge)",
        "",
        "| table | " + " | ".join(labels) + " |",
        "|---|" + "---:|" * len(labels),
    ]
    for table in sizes[0]["storage"]["tables"]:
        cells = []
        for s in sizes:
            t = s["storage"]["tables"][table]
            per_edge = t["total"] / s["graph"]["edges"]
            cells.append(f"{_mb(t['heap'])} + {_mb(t['indexes'])} ({per_edge:.0f} B)")
        lines.append(f"| {table} | {' | '.join(cells)} |")
    lines += [
        "",
        "### B-tree depth (levels, root to leaf) and size, MB",
        "",
        "| index | " + " | ".join(labels) + " |",
        "|---|" + "---:|" * len(labels),
    ]
    for name in sizes[0]["storage"]["indexes"]:
        cells = []
        for s in sizes:
            i = s["storage"]["indexes"].get(name, {})
            cells.append(f"{i.get('levels', 'n/a')} ({_mb(i.get('bytes'))})")
        lines.append(f"| {name} | {' | '.join(cells)} |")
    lines += [
        "",
        "### each call's statements, EXPLAIN (ANALYZE, BUFFERS, WAL) on the copies, no load"
        " from the bench (median per call of 20 draws; writes rolled back)",
        "",
        "| scenario | size | statements | ms | shared hit | shared read | dirtied |"
        " WAL records | WAL FPI | WAL KB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, by_size in doc["statements"].items():
        for x in labels:
            p = by_size.get(x)
            if p is None:
                continue
            lines.append(
                f"| {name} | {x} | {p['statements']:.0f} | {p['ms']:.3f} |"
                f" {p['Shared Hit Blocks']:.0f} | {p['Shared Read Blocks']:.0f} |"
                f" {p['Shared Dirtied Blocks']:.0f} | {p['WAL Records']:.0f} |"
                f" {p['WAL FPI']:.0f} | {p['WAL Bytes'] / 1024:.1f} |"
            )
    d = doc["disk"]
    lines += [
        "",
        f"disk: {d['at_start']['free_gib']} GiB free at start, {d['at_end']['free_gib']} at end;"
        f" {d['pgdata']} at most {d['pgdata_peak_gib']} GiB while measuring (templates +"
        f" copies), {d['pgdata_templates_gib']} GiB kept (templates); seeding"
        f" {doc['seeding_seconds']:.0f}s, whole run {doc['seconds']:.0f}s",
    ]
    if doc.get("seeding_note"):
        lines.append(f"seeding: {doc['seeding_note']}")
    return "\n".join(lines)


def render_scale_chart(doc: dict[str, Any], path: Path) -> None:
    """Throughput per scenario against the graph's size; below, relative to the smallest
    size, with the target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = doc["sizes"]
    labels = [s["label"] for s in sizes]
    x = [s["graph"]["edges"] / 1e6 for s in sizes]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(12, 10), sharex=True)
    for row in doc["scenarios"]:
        y = [row["sizes"][lab]["calls_per_s"] for lab in labels]
        style = ":" if row["target"] is None else "-"
        top.plot(x, y, marker="o", linestyle=style, label=row["scenario"])
        base = y[0]
        if base:
            bottom.plot(
                x, [v / base if v else float("nan") for v in y], marker="o", linestyle=style
            )
    top.set_yscale("log")
    top.set_ylabel("calls / s (median of rounds, log)")
    top.legend(fontsize=8, ncol=2)
    top.set_title(
        f"follow-service bench-scale @ {doc['git']['revision'][:10]}"
        f" ({doc['machine']['cpu_count']} CPU, shared machine; {doc['config']['rounds']} rounds)"
    )
    bottom.axhline(SCALE_TARGET, color="black", linestyle="--", linewidth=1)
    bottom.axhline(1.0, color="#999999", linewidth=0.8)
    bottom.set_ylabel(f"calls/s relative to {labels[0]} (dashes: target {SCALE_TARGET})")
    bottom.set_xlabel("graph size, million edges")
    bottom.set_xticks(x)
    bottom.set_xticklabels([f"{v:g}" for v in x])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- bench-ops ------------------------------------------------------------------------------


def _op_figure(op: str, result: dict[str, Any]) -> str:
    if op == "delete":
        return (
            f"call {_num(result.get('call_s'))} s, cleanup done after"
            f" {_num(result.get('cleanup_s'))} s"
        )
    return f"{_num(result.get('import_s'))} s, {_num(result.get('edges_per_s'))} edges/s"


def render_ops_table(doc: dict[str, Any]) -> str:
    """The other users' calls before and during each operation: one row per repetition and
    the medians, then whether the issue's target (worst latency, calls keep completing)
    was met."""
    m, cfg, g = doc["machine"], doc["config"], doc["graph"]
    target = doc["target_worst_latency_ms"]
    lines = [
        f"ops run, git {doc['git']['revision'][:10]}"
        f"{' (dirty)' if doc['git']['dirty'] else ''}: {m['cpu_count']} x {m['cpu_model']},"
        f" {m['memory_gb']} GB, Python {m['python']}, PostgreSQL {m['postgres']};"
        f" load average (1 min) at start {m['load_average_at_start'][0]}",
        f"graph: {g['params']['users']:,} users, {g['edges']:,} edges, {g['celebrity']} with"
        f" {g['params']['celebrity_followers']:,} fans; background: {cfg['concurrency']} calls in"
        f" flight from {cfg['processes']} processes (Follow 1 / Unfollow 1 / Check 20 /"
        f" GetInfo 20), baseline {cfg['baseline']} s before each operation;"
        f" delete via {cfg['door']}",
        "latency: every other user's call in flight during the window; calls/s: answered"
        " inside it; gap: the longest stretch inside it with no call answered",
        "",
        "| operation | run | operation's figures | baseline p50 / p99 / max ms | during p50 / p99"
        " / max ms | calls/s baseline -> during (ratio) | longest gap ms | errors | load |",
        "|---|---|---|---|---|---|---:|---:|---|",
    ]
    for r in doc["runs"]:
        b, d, q = r["baseline"], r["during"], r["ratios"]
        lines.append(
            f"| {r['op']} | #{r['repetition']} | {_op_figure(r['op'], r['result'])} |"
            f" {_num(b['p50_ms'])} / {_num(b['p99_ms'])} / {_num(b['max_ms'])} |"
            f" {_num(d['p50_ms'])} / {_num(d['p99_ms'])} / {_num(d['max_ms'])} |"
            f" {_num(b['calls_per_s'], 0)} -> {_num(d['calls_per_s'], 0)}"
            f" ({_num(q['calls_per_s'])}) | {_num(d['longest_gap_ms'], 0)} | {d['errors']} |"
            f" {r['load_average_start'][0]}-{r['load_average_end'][0]} |"
        )
    lines += [
        "",
        f"medians over the runs; target: other users' worst latency < {target:.0f} ms and"
        " calls keep completing (no gap that long, no errors)",
        "",
        "| operation | operation's figures | during p50 / p99 ms | worst latency ms (all runs)"
        " | p99 ratio | calls/s ratio | longest gap ms | target | load |",
        "|---|---|---|---:|---:|---:|---:|:---:|---|",
    ]
    labels = {
        "delete": f"delete the {g['params']['celebrity_followers']:,}-fan account",
        "import": f"import {doc['import_edges']:,} edges into the live database",
    }
    for op, s in doc["summary"].items():
        d, q = s["during"], s["ratios"]
        lines.append(
            f"| {labels.get(op, op)} | {_op_figure(op, s['result'])} |"
            f" {_num(d['p50_ms'])} / {_num(d['p99_ms'])} | {_num(d['worst_max_ms'])} |"
            f" {_num(q['p99'])} | {_num(q['calls_per_s'])} | {_num(d['longest_gap_ms'], 0)} |"
            f" {_met(q['target_met'])} | {s['load_average'][0]}-{s['load_average'][1]} |"
        )
    return "\n".join(lines)
