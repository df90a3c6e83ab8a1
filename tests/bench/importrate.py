"""`python -m tests.bench.importrate`: the bulk importer's rate on a graph from CSV files.

Imports the graph in --graph (edges.csv and, when present, accounts.csv, as
tests.bench.graph writes them) into a fresh database of a throwaway PostgreSQL
(tests.support.pgcluster; with --sized, the settings `follow-server`'s embedded server is
given on this machine, server.embedded_conf: a quarter of the memory as shared buffers,
checkpoints further apart), --runs times, each into an empty database, or with --base into
a database that already holds the --base graph (imported first, not timed; --exclusive:
the timed import with `--exclusive`). Prints each run's seconds, edges/s, the importer's
phases and the CPU seconds spent (PostgreSQL's processes, the importer's) with the rate
that work would allow with every core busy throughout, then the median rate.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import asyncpg

from server.embedded_conf import embedded_settings, machine_memory
from server.importer import ImportOptions, import_graph
from tests.bench.cpu import own_cpu_seconds, postmaster_pid, tree_cpu_seconds
from tests.support.pgcluster import LocalPostgres


async def _import(
    url: str, graph: Path, options: ImportOptions, postmaster: int
) -> dict[str, object]:
    """Import the graph's edges.csv, with its accounts.csv when there is one; with the CPU
    seconds PostgreSQL (all its processes) and this process (the importer) spent on it, and
    the rate those would allow if every core were busy all the time (their sum spread over
    the machine's cores): the bound on the rate that comes from the work alone."""
    with contextlib.ExitStack() as files:
        accounts = None
        if (graph / "accounts.csv").exists():
            accounts = files.enter_context((graph / "accounts.csv").open(newline=""))
        edges = files.enter_context((graph / "edges.csv").open(newline=""))
        began = time.perf_counter()
        cpu_pg, cpu_own = tree_cpu_seconds(postmaster), own_cpu_seconds()
        report = await import_graph(url, accounts, edges, options)
        seconds = time.perf_counter() - began
        await asyncio.sleep(1)  # the importer's backends exit and are reaped (their CPU)
        cpu_pg, cpu_own = tree_cpu_seconds(postmaster) - cpu_pg, own_cpu_seconds() - cpu_own
    cores = os.cpu_count() or 1
    return {
        "seconds": round(seconds, 2),
        "edges_per_s": round(report.edges_read / seconds),
        "edges_added": report.edges_added,
        "present": report.edges_already_present,
        "batches": report.batches,
        "swapped": report.swapped,
        "in_memory": report.in_memory,
        "longest_batch": round(report.longest_batch, 3),
        "cpu_s": {"postgres": round(cpu_pg, 1), "importer": round(cpu_own, 1)},
        "cpu_bound_edges_per_s": round(report.edges_read / ((cpu_pg + cpu_own) / cores)),
        # The importer's peak resident memory so far (this process: the runs before count too).
        "importer_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "phases": {k: round(v, 2) for k, v in report.phases.items()},
    }


async def _fresh(pg: LocalPostgres, name: str) -> str:
    conn = await asyncpg.connect(pg.url())
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {name}")
        await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()
    return pg.url(name)


async def _main(args: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="importrate-"))
    settings = embedded_settings(machine_memory()) if args.sized else {}
    if args.log_ms is not None:
        settings |= {"log_min_duration_statement": str(args.log_ms), "log_line_prefix": "''"}
    pg = LocalPostgres(root, settings)
    pg.init()
    pg.start()
    rates: list[float] = []
    postmaster = postmaster_pid(pg.pgdata)
    try:
        for run in range(args.runs):
            url = await _fresh(pg, "importrate")
            if args.base is not None:
                base = await _import(url, args.base, ImportOptions(progress=False), postmaster)
                print(f"base: {json.dumps(base)}", file=sys.stderr)
            result = await _import(
                url,
                args.graph,
                ImportOptions(progress=False, exclusive=args.exclusive),
                postmaster,
            )
            rates.append(float(result["edges_per_s"]))  # type: ignore[arg-type]
            print(f"run {run + 1}: {json.dumps(result)}", file=sys.stderr)
    finally:
        pg.stop()
        if args.log_ms is not None:
            print(_slow_statements(pg.logfile), file=sys.stderr)
        shutil.rmtree(root, ignore_errors=True)
    print(f"median {statistics.median(rates):,.0f} edges/s over {len(rates)} run(s)")


def _slow_statements(log: Path) -> str:
    """The server log's statements that ran longer than --log-ms, one line each."""
    out: list[str] = []
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("LOG:  duration:"):
            out.append(line[len("LOG:  ") :][:160])
        elif out and line.startswith(("\t", " ")) and len(out[-1]) < 160:
            out[-1] = (out[-1] + " " + line.strip())[:160]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.importrate")
    parser.add_argument("--graph", type=Path, required=True, help="folder with the CSV files")
    parser.add_argument("--base", type=Path, help="a graph imported first, not timed")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument(
        "--sized",
        action="store_true",
        help="give PostgreSQL the embedded server's settings for this machine (default: its own)",
    )
    parser.add_argument(
        "--exclusive",
        action="store_true",
        help="the timed import with --exclusive (its merge under table locks)",
    )
    parser.add_argument(
        "--log-ms", type=int, help="print the statements that ran longer than this (ms)"
    )
    asyncio.run(_main(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
