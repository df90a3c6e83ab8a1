"""import_graph: one import, from CSV streams to the live tables, while the service serves.

Two stages on one connection of its own. Staging (server.importer.staging) reads, parses
and checks everything into staging tables, locking nothing the service's calls wait on. If
it found bad rows and --skip-bad-rows was not given, the import stops there having changed
nothing (ImportAbortedError). Otherwise, on one PostgreSQL, server.importer.bulk writes the
accounts the import creates and the edges among them in one transaction (no service call
can see them before it commits, so it takes no per-user lock); then the merge
(server.importer.merge) writes the rest, accounts, then edges, in bounded batches, each its
own short transaction holding only its users' locks, taken the way the service's calls take
theirs. On Citus everything goes through the batches.

So an import is all-or-nothing as far as bad rows go, and resumable beyond that: an import
interrupted during the writing (killed, connection lost) has committed the bulk step whole
or not at all and whole batches, each leaving the graph sound with exact counts, and
running the same import again completes it (the accounts are then present, so what is left
takes the batches; edges already present are skipped, accounts are written again
unchanged). Rows the merge finds bad under its locks because the service changed their
users since the checks (a follower that reached the cap meanwhile, an account deleted
meanwhile) are skipped and reported; the import then ends with ImportIncompleteError unless
--skip-bad-rows.

One import runs per database at a time (a session advisory lock): on Citus the staging
tables are ordinary distributed tables, and an import killed earlier leaves them for the
next one to drop.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import time
from typing import TYPE_CHECKING, TextIO

import asyncpg

import server.importer.inmemory as inmemory
import server.importer.pair as pair
from server.importer.bulk import write_fresh
from server.importer.csvread import IdChecker
from server.importer.exclusive import write_edges_exclusive
from server.importer.merge import write_accounts, write_edges
from server.importer.options import ImportOptions
from server.importer.report import ImportAbortedError, ImportIncompleteError, ImportReport
from server.importer.staging import (
    Staging,
    account_batches,
    check_accounts,
    check_edges,
    plan_chunks,
    stage_accounts,
    stage_edges,
)
from server.migrations import apply_migrations

if TYPE_CHECKING:
    from server.importer.pair import Conn

_DEFAULT_OPTIONS = ImportOptions()  # frozen: one instance serves every call
_IMPORT_LOCK = 0x696D706F7274  # "import": one import per database at a time


class ImportBusyError(Exception):
    """Another `follow-server import` is running on this database."""


async def import_graph(
    database_url: str,
    accounts: TextIO | None,
    edges: TextIO | None,
    options: ImportOptions = _DEFAULT_OPTIONS,
    *,
    accounts_size: int | None = None,
    edges_size: int | None = None,
) -> ImportReport:
    """Import accounts, then edges. Raise ImportAbortedError, having changed nothing, when
    the checks find bad rows and `options.skip_bad_rows` is false; ImportIncompleteError,
    with everything else imported, when the merge refused rows (see the module's doc)."""
    started = time.perf_counter()
    report = ImportReport()
    await apply_migrations(database_url)
    # Connections of its own, without the service pool's per-statement timeout (30 s).
    conn = await pair.connect(database_url)
    second: Conn | None = None
    staging: Staging | None = None
    try:
        if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", _IMPORT_LOCK):
            raise ImportBusyError("another follow-server import is running on this database")
        staging = await Staging.detect(conn, edges=edges is not None)
        if staging.paired:
            second = await pair.connect(database_url)
        if second is not None and accounts is not None and edges is not None:
            texts = inmemory.read_texts(accounts, edges, accounts_size, edges_size)
            if texts is None:
                report.in_memory = "not tried: the files' sizes are unknown, or too large"
            else:
                try:
                    await inmemory.load(conn, second, texts, options, report)
                except inmemory.LoadFallbackError as why:
                    report.in_memory = f"not taken: {why}"
                    # The staged path takes the same text (and reports what this refused).
                    accounts, edges = io.StringIO(texts.accounts), io.StringIO(texts.edges)
                    report.lap("work out the graph in memory")
                else:
                    tables = list(dict.fromkeys(_ACCOUNT_TABLES + _EDGE_TABLES))
                    await _analyze(conn, second, tables)
                    report.lap("analyze")
                    staging = None
        if staging is not None:
            await _staged(
                conn, second, staging, report, options, accounts, edges, (accounts_size, edges_size)
            )
            staging = None
    finally:
        if staging is not None and not conn.is_closed():
            # Best effort: what an interrupted import leaves on Citus the next one drops.
            with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                await staging.drop(conn)
        await conn.close()
        if second is not None:
            await second.close()
    report.seconds = time.perf_counter() - started
    if report.refused_while_merging and not options.skip_bad_rows:
        raise ImportIncompleteError(
            f"{report.refused_while_merging} row(s) refused while merging, because the"
            " service changed their users meanwhile; every other row was imported",
            report,
        )
    return report


async def _staged(
    conn: pair.RestingConnection,
    second: Conn | None,
    staging: Staging,
    report: ImportReport,
    options: ImportOptions,
    accounts: TextIO | None,
    edges: TextIO | None,
    sizes: tuple[int | None, int | None],
) -> None:
    """The staged path: the staging tables, the checks, the bulk step and the merge."""
    await staging.create(conn)
    if not staging.paired:
        # Into a graph in use: one core, and a rest after each statement (pair's doc).
        await conn.execute(pair.ONE_CORE)
        conn.rest_ratio = options.pause_ratio
    report.lap("prepare")
    no_accounts = await _stage(conn, staging, report, options, accounts, edges, *sizes, second)
    report.bad_rows.sort(key=lambda b: (b.source, b.line))
    if report.bad_row_count and not options.skip_bad_rows:
        raise ImportAbortedError(f"{report.bad_row_count} bad row(s); nothing was imported", report)
    table_sizes = await _table_sizes(conn)
    if accounts is not None and not staging.citus:
        await write_fresh(conn, second, report, edges=edges is not None, only_file=no_accounts)
    chunks = []
    if edges is not None:
        chunks = await plan_chunks(conn)
        report.lap("plan batches")
    resting, conn.rest_ratio = conn.rest_ratio, 0.0  # the batches rest between them
    if accounts is not None:
        await write_accounts(conn, await account_batches(conn), report, options)
    if edges is not None:
        if options.exclusive and not staging.citus:
            await write_edges_exclusive(conn, staging, chunks, report, options)
        else:
            await write_edges(conn, staging, chunks, report, options)
    conn.rest_ratio = resting
    report.bad_rows.sort(key=lambda b: (b.source, b.line))
    await staging.drop(conn)
    await _analyze(conn, second, _stale_tables(report, table_sizes))
    report.lap("analyze")


# After the merge the planner is given statistics of the tables the import grew by more
# than a tenth (autovacuum's own threshold, which it reaches later), so that the service's
# and the checker's plans see the new sizes at once; a small import into a big graph skips
# the samples (seconds on millions of rows). On Citus the coordinator knows no sizes
# (reltuples of a distributed table is 0): it analyses whatever the import wrote to.
_STALE_FRACTION = 0.1
_EDGE_TABLES = ("following", "followers", "follow_count_deltas", "follow_counts")
_ACCOUNT_TABLES = ("accounts", "follow_counts")
_SIZES = """
SELECT relname::text, greatest(reltuples, 0)::float8 FROM pg_class
WHERE oid = ANY(ARRAY['accounts', 'following']::regclass[])
"""


async def _table_sizes(conn: Conn) -> dict[str, float]:
    """The planner's row counts of accounts and following before the merge."""
    return {r[0]: r[1] for r in await conn.fetch(_SIZES)}


async def _analyze(conn: Conn, second: Conn | None, tables: list[str]) -> None:
    """ANALYZE the tables (two at a time with the second connection, else one after the
    other, each a statement of its own after which the connection may rest)."""
    if tables and second is not None:
        await pair.run_jobs([conn, second], [pair.Job(t, (f"ANALYZE {t}",)) for t in tables])
    for table in tables if second is None else ():
        await conn.execute(f"ANALYZE {table}")


def _stale_tables(report: ImportReport, sizes: dict[str, float]) -> list[str]:
    """The live tables whose statistics the import made stale (see _STALE_FRACTION)."""
    stale: list[str] = []
    if report.accounts_written > _STALE_FRACTION * sizes.get("accounts", 0.0):
        stale.extend(_ACCOUNT_TABLES)
    if report.edges_added > _STALE_FRACTION * sizes.get("following", 0.0):
        stale.extend(t for t in _EDGE_TABLES if t not in stale)
    elif report.edges_added:
        # A few delta rows per target grow that small table by more than a tenth soon, and
        # the invariant scan's plan over it ran minutes on stale statistics.
        stale.append("follow_count_deltas")
    return stale


async def _stage(
    conn: Conn,
    staging: Staging,
    report: ImportReport,
    options: ImportOptions,
    accounts: TextIO | None,
    edges: TextIO | None,
    accounts_size: int | None,
    edges_size: int | None,
    second: Conn | None,
) -> bool:
    """Read and check both files into the staging tables; with `second` (the importer's
    second connection, server.importer.pair) the edges are read beside the accounts.
    Whether the edges were checked against the accounts file alone (the accounts table was
    empty)."""
    ids = IdChecker()

    async def read_accounts() -> None:
        if accounts is not None:
            await stage_accounts(conn, accounts, ids, report, options, accounts_size)
            await check_accounts(conn, staging, report)

    if edges is None:
        await read_accounts()
        return False
    if second is None:
        await read_accounts()
        staged = await stage_edges(conn, edges, ids, report, edges_size, options)
    else:
        async with asyncio.TaskGroup() as group:
            group.create_task(read_accounts())
            reading = group.create_task(
                stage_edges(second, edges, ids, report, edges_size, options)
            )
        staged = reading.result()
    return await check_edges(conn, staging, report, options, staged, second)
