"""import_graph: one import as one transaction, from CSV streams to the live tables.

It holds `follow_counts` in EXCLUSIVE mode while it runs: the live service keeps answering
reads, and its writes wait for the import to commit (every write path locks a counter row
first, see server.store), which keeps the lock discipline's invariants. An interrupted or
aborted import leaves nothing behind: on Citus too, where the staging tables are distributed
tables made inside the transaction (server.importer.staging) and every worker's part of it
commits or rolls back with the coordinator's (two-phase commit).
"""

from __future__ import annotations

import time
from typing import TextIO

import asyncpg

from server.importer.csvread import IdChecker
from server.importer.merge import write_accounts, write_graph
from server.importer.options import ImportOptions
from server.importer.report import ImportAbortedError, ImportReport
from server.importer.staging import Staging, stage_accounts, stage_edges
from server.migrations import apply_migrations

# Set-based steps over millions of rows want memory for sorts, hashes and the temporary
# staging tables (temp_buffers only counts before the first temporary table is touched).
# JIT compiling would cost more than it saves on these plans (seconds of LLVM on a busy
# machine); parallel workers help the index builds. On Citus these apply to the
# coordinator's own work; the workers keep their settings.
_SESSION = """
SET LOCAL work_mem = '256MB';
SET LOCAL maintenance_work_mem = '1GB';
SET LOCAL temp_buffers = '1GB';
SET LOCAL jit = off;
"""

_DEFAULT_OPTIONS = ImportOptions()  # frozen: one instance serves every call
_SERVER_SETTINGS = {"application_name": "follow-server import"}


async def import_graph(
    database_url: str,
    accounts: TextIO | None,
    edges: TextIO | None,
    options: ImportOptions = _DEFAULT_OPTIONS,
    *,
    accounts_size: int | None = None,
    edges_size: int | None = None,
) -> ImportReport:
    """Import accounts, then edges, in one transaction; raise ImportAbortedError (having
    changed nothing) when there are bad rows and `options.skip_bad_rows` is false."""
    started = time.perf_counter()
    report = ImportReport()
    ids = IdChecker()
    await apply_migrations(database_url)
    # One connection of its own, without the service pool's per-statement timeout (30 s):
    # a set-based statement over millions of rows may run for minutes.
    conn = await asyncpg.connect(database_url, server_settings=_SERVER_SETTINGS)
    try:
        async with conn.transaction():
            await conn.execute(_SESSION)
            await conn.execute("LOCK TABLE follow_counts IN EXCLUSIVE MODE")
            staging = await Staging.detect(conn)
            await staging.create(conn)
            report.lap("prepare")
            if accounts is not None:
                await stage_accounts(conn, accounts, ids, report, options, accounts_size)
                await write_accounts(conn, staging, report)
            staged = None
            if edges is not None:
                staged = await stage_edges(conn, edges, ids, report, edges_size, options)
            await write_graph(conn, staging, report, options, staged)
            report.bad_rows.sort(key=lambda b: (b.source, b.line))
            if report.bad_row_count and not options.skip_bad_rows:
                raise ImportAbortedError(
                    f"{report.bad_row_count} bad row(s); nothing was imported", report
                )
            await staging.drop(conn)
        report.lap("commit")
        await conn.execute("ANALYZE accounts, follow_counts, following, followers")
        report.lap("analyze")
    finally:
        await conn.close()
    report.seconds = time.perf_counter() - started
    return report
