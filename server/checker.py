"""`follow-server check [--repair]`: verify every invariant of the stored graph.

The invariants (what every transaction of server.store keeps true: both copies of each edge,
symmetric mutual state, counts equal to the edges, edges between accounts with one counter
row each, the cap) are written once in server.graph_invariants, shared with the bulk
importer's recount and with the tests.

This is an offline scan of whole tables (run it against a quiet database, or accept that a
write landing mid-scan may show up as a transient violation). `--repair` fixes what can be
derived: missing or dangling edge halves, mutual state, counter rows and counts, all in one
transaction. Users over the cap are reported, never repaired: which follows to drop is not
the checker's choice.

On Citus the same SQL runs: an invariant that pairs an edge row with its other user's rows
reads the edge table re-keyed by that user (server.graph_invariants.rekeyed_edges), filled
once per scan, and again before a repair step whenever an earlier one wrote edges; a scan
runs in one transaction of its own, rolled back at its end, which drops those tables.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import asyncpg
from tqdm import tqdm

from server import logs, rules
from server.config import Parser, add_database_flags, add_progress_flags
from server.database import create_pool, open_database
from server.graph_invariants import INVARIANTS, OVER_CAP, rekeyed_edges
from server.migrations import migrate
from server.store import Store

log = logging.getLogger(__name__)


@dataclass
class Report:
    """What one check found: violations per invariant (every invariant named, 0 when it
    holds), a few example rows of each broken one, and what --repair fixed."""

    violations: dict[str, int] = field(default_factory=dict)
    samples: dict[str, list[dict[str, object]]] = field(default_factory=dict)
    repaired: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.violations.values())


async def _scan(conn: asyncpg.Connection, max_following: int, progress: bool) -> Report:
    report = Report()
    checks = [*INVARIANTS, OVER_CAP]
    async with rekeyed_edges(conn) as edges:
        for inv in tqdm(checks, desc="checking", unit="invariant", disable=not progress):
            args = (max_following,) if inv is OVER_CAP else ()
            await edges.ready_for(inv.count_sql, inv.sample_sql)
            n: int = await conn.fetchval(inv.count_sql, *args)
            report.violations[inv.name] = n
            if n:
                rows = await conn.fetch(inv.sample_sql, *args)
                report.samples[inv.name] = [dict(r) for r in rows]
    return report


async def check(
    conn: asyncpg.Connection,
    *,
    max_following: int = rules.DEFAULT_MAX_FOLLOWING,
    repair: bool = False,
    progress: bool = False,
) -> Report:
    """Scan (and with `repair`, fix then rescan) the database behind `conn`.

    With repair, the returned report is the rescan after repairing, and `repaired` counts the
    violations found before it."""
    report = await _scan(conn, max_following, progress)
    if not repair or report.total == report.violations.get(OVER_CAP.name, 0):
        return report
    async with conn.transaction():
        # Serialise with the service: every writer locks counter rows first.
        await conn.execute("LOCK TABLE follow_counts IN EXCLUSIVE MODE")
        async with rekeyed_edges(conn) as edges:
            for inv in tqdm(INVARIANTS, desc="repairing", unit="invariant", disable=not progress):
                if report.violations.get(inv.name):
                    # Each step reads the edges as the steps before it left them.
                    await edges.ready_for(*inv.repair_sql)
                    for sql in inv.repair_sql:
                        await conn.execute(sql)
                    edges.changed()
    after = await _scan(conn, max_following, progress)
    after.repaired = {k: v for k, v in report.violations.items() if v and k != OVER_CAP.name}
    return after


def format_report(report: Report) -> str:
    lines = []
    for name, n in report.violations.items():
        mark = "ok" if n == 0 else f"{n} violation(s)"
        if name in report.repaired:
            mark += f" (repaired {report.repaired[name]})"
        lines.append(f"  {name:<26} {mark}")
        for sample in report.samples.get(name, []):
            lines.append(f"      e.g. {sample}")
    lines.append(f"total violations: {report.total}")
    return "\n".join(lines)


async def finish_pending_deletions(url: str) -> int:
    """Run the cleanup of every account deletion still in progress (the same bounded batches
    the server's runner does; the two never work on one account at once), so the check sees
    a settled graph: a pending deletion's edges are work in progress, not violations. The
    number of accounts finished."""
    pool = await create_pool(url, 2)
    try:
        store = Store(pool)
        finished = 0
        while pending := await store.pending_deletions():
            for user_id in pending:
                while not await store.clean_up_deletion(user_id):
                    pass
                finished += 1
        return finished
    finally:
        await pool.close()


async def _run(args: argparse.Namespace) -> int:
    database = await open_database(args.database_url, args.data_dir, create=False)
    try:
        conn = await asyncpg.connect(database.url)
        try:
            await migrate(conn)
            finished = await finish_pending_deletions(database.url)
            if finished:
                print(f"follow-server check: finished {finished} pending account deletion(s) first")
            report = await check(
                conn,
                max_following=args.max_following,
                repair=args.repair,
                progress=args.progress,
            )
        finally:
            await conn.close()
    finally:
        await asyncio.to_thread(database.close)
    print("follow-server check:" + (" (after --repair)" if args.repair else ""))
    print(format_report(report))
    return 0 if report.total == 0 else 1


def main(argv: Sequence[str]) -> None:
    parser = Parser(
        prog="follow-server check",
        description="Verify every invariant of the follow graph; --repair fixes what it can.",
    )
    add_database_flags(parser)
    parser.add_argument("--repair", action="store_true", help="fix counts and edge halves")
    parser.add_argument(
        "--max-following", type=int, default=rules.DEFAULT_MAX_FOLLOWING, help="the cap"
    )
    add_progress_flags(parser)
    args = parser.parse_args(argv)
    logs.setup_logging(args.log_level, args.log_format)
    sys.exit(asyncio.run(_run(args)))
