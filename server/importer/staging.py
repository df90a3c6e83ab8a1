"""From CSV into the staging tables, and the checks only SQL can make there.

Rows are COPYed into temporary tables (import_accounts, import_edges; bad rows found so far
in import_bad) that drop at commit. The edge checks (self-follows, unknown accounts,
duplicate edges in the file, followers the import would take over the cap) are set-based
statements over the staged rows, and leave import_new: the edges server.importer.merge
writes.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, TextIO

import asyncpg

from server.importer.csvread import (
    ACCOUNTS,
    EDGES,
    FastReader,
    IdChecker,
    account_records,
    csv_rows,
    edge_records,
)
from server.importer.options import ImportOptions
from server.importer.report import BadRow, ImportReport, progress_bar

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    Conn = PoolConnectionProxy[asyncpg.Record]

# `line` comes from the file (slow path) or from the sequence (fast path: one row a line).
STAGING = """
CREATE TEMP SEQUENCE import_line;
CREATE TEMP TABLE import_accounts (
    line int NOT NULL DEFAULT nextval('import_line'), user_id text COLLATE "C" NOT NULL,
    nick text, face_url text
) ON COMMIT DROP;
CREATE TEMP TABLE import_edges (
    line int NOT NULL DEFAULT nextval('import_line'), follower text COLLATE "C" NOT NULL,
    target text COLLATE "C" NOT NULL, at numeric, problem text
) ON COMMIT DROP;
CREATE TEMP TABLE import_bad (line int NOT NULL, problem text NOT NULL) ON COMMIT DROP;
"""
DROP_SEQUENCE = "DROP SEQUENCE import_line CASCADE"  # a temporary one outlives COMMIT

# Rows that name the same user twice or an unknown account, or whose time the reader could
# not read, in the order the checks are made for one row.
_FIND_BAD_ROWS = """
INSERT INTO import_bad (line, problem)
SELECT line, problem FROM (
    SELECT e.line, CASE
        WHEN e.follower = e.target THEN 'a user cannot follow themselves'
        WHEN e.follower NOT IN (SELECT user_id FROM accounts)
        THEN 'follower_id: account ' || e.follower || ' does not exist'
        WHEN e.target NOT IN (SELECT user_id FROM accounts)
        THEN 'target_id: account ' || e.target || ' does not exist'
        ELSE e.problem END AS problem
    FROM import_edges e
) p
WHERE problem IS NOT NULL
"""

NEW_TABLE = """
CREATE TEMP TABLE import_new (
    line int NOT NULL, follower text COLLATE "C" NOT NULL, target text COLLATE "C" NOT NULL,
    at_us bigint NOT NULL, stored bool NOT NULL
) ON COMMIT DROP
"""

# The first row of each edge among the good rows, in (follower, target) order: the order
# of the following table's primary key, whose build then finds its input sorted. `stored`
# marks edges already present (their first follow time is kept); it is false without a
# look when the edge tables were empty.
_NEW_EDGES = """
INSERT INTO import_new (line, follower, target, at_us, stored)
SELECT d.line, d.follower, d.target, d.at_us, {stored} FROM (
    SELECT DISTINCT ON (e.follower, e.target) e.line, e.follower, e.target,
           COALESCE(trunc(e.at * 1000000)::bigint, $1) AS at_us
    FROM import_edges e {good}
    ORDER BY e.follower, e.target, e.line
) d
"""
_GOOD = "WHERE e.line NOT IN (SELECT line FROM import_bad)"
_STORED = """EXISTS (
    SELECT 1 FROM following f WHERE f.user_id = d.follower AND f.target_id = d.target)"""

# Repeats of an edge given earlier: looked for only when import_new has fewer rows than
# there are good rows.
_DUPLICATES = """
INSERT INTO import_bad (line, problem)
SELECT r.line, 'duplicate edge, first given on line ' || r.first FROM (
    SELECT e.line, min(e.line) OVER (PARTITION BY e.follower, e.target) AS first
    FROM import_edges e {good}
) r
WHERE r.line <> r.first
"""

_CAP_MAY_BITE = """
SELECT COALESCE(max(n), 0) + (SELECT COALESCE(max(following), 0) FROM follow_counts) > $1::bigint
FROM (SELECT count(*) AS n FROM import_new GROUP BY follower) p
"""

# Followers whom the import would take over the cap keep their earliest new follows.
_OVER_CAP = """
WITH per_follower AS (
    SELECT follower, count(*) AS n FROM import_new GROUP BY follower
), over AS (
    SELECT p.follower, $1::bigint - COALESCE(c.following, 0) AS room
    FROM per_follower p LEFT JOIN follow_counts c ON c.user_id = p.follower
    WHERE p.n + COALESCE(c.following, 0) > $1::bigint
)
SELECT r.line, 'following limit reached: ' || r.follower || ' would follow more than '
       || $1::bigint::text || ' users'
FROM (SELECT n.line, n.follower, o.room,
             row_number() OVER (PARTITION BY n.follower ORDER BY n.at_us, n.line) AS nth
      FROM import_new n JOIN over o ON o.follower = n.follower) r
WHERE r.nth > r.room
"""

_DROP_LINES = "DELETE FROM import_new WHERE line = ANY($1::int[])"


async def _copy_fast(conn: Conn, table: str, fast: FastReader) -> None:
    """COPY the rows the fast path takes, numbered by the sequence from their first line."""
    chunks = aiter(fast)
    first = await anext(chunks, None)
    if first is None:
        return

    async def data() -> AsyncIterator[bytes]:
        yield first
        async for chunk in chunks:
            yield chunk

    await conn.execute(f"SELECT setval('import_line', {fast.first_line}, false)")
    await conn.copy_to_table(table, source=data(), columns=list(fast.columns), format="csv")


async def stage_accounts(
    conn: Conn,
    stream: TextIO,
    ids: IdChecker,
    report: ImportReport,
    options: ImportOptions,
    size: int | None,
) -> None:
    with progress_bar(options, "accounts", size, "B") as bar:
        fast = FastReader(stream, ACCOUNTS, bar)
        await _copy_fast(conn, "import_accounts", fast)
        report.accounts_read += fast.rows
        rows = csv_rows(fast.rest(), ACCOUNTS.header, fast.lines_used == 0, fast.lines_used)
        records = account_records(rows, ids, report)
        await conn.copy_records_to_table(
            "import_accounts", records=records, columns=["line", "user_id", "nick", "face_url"]
        )
    report.lap("read accounts")


async def stage_edges(
    conn: Conn,
    stream: TextIO,
    ids: IdChecker,
    report: ImportReport,
    size: int | None,
    options: ImportOptions,
) -> int:
    """Stage the edge rows; how many were staged."""
    with progress_bar(options, "edges", size, "B") as bar:
        fast = FastReader(stream, EDGES, bar)
        await _copy_fast(conn, "import_edges", fast)
        report.edges_read += fast.rows
        rows = csv_rows(fast.rest(), EDGES.header, fast.lines_used == 0, fast.lines_used)
        records = edge_records(rows, ids, report)
        await conn.copy_records_to_table(
            "import_edges",
            records=records,
            columns=["line", "follower", "target", "at", "problem"],
        )
    report.lap("read edges")
    return report.edges_read - sum(b.source == "edges" for b in report.bad_rows)


async def check_edges(
    conn: Conn, report: ImportReport, options: ImportOptions, was_empty: bool, staged: int
) -> None:
    """Find the bad edge rows SQL can see, and make import_new: the edges to add."""
    per_row = rowcount(await conn.execute(_FIND_BAD_ROWS))
    good = _GOOD if per_row else ""
    await conn.execute(NEW_TABLE)
    new_edges = _NEW_EDGES.format(good=good, stored="false" if was_empty else _STORED)
    distinct = rowcount(await conn.execute(new_edges, time.time_ns() // 1000))
    if distinct < staged - per_row:
        await conn.execute(_DUPLICATES.format(good=good))
    stored = 0 if was_empty else rowcount(await conn.execute("DELETE FROM import_new WHERE stored"))
    report.edges_already_present = stored
    if await conn.fetchval(_CAP_MAY_BITE, options.max_following):
        await conn.execute("ANALYZE import_new")
        over = await conn.fetch(_OVER_CAP, options.max_following)
        if over:
            await conn.execute(_DROP_LINES, [r[0] for r in over])
            await conn.executemany(
                "INSERT INTO import_bad (line, problem) VALUES ($1, $2)",
                [(r[0], r[1]) for r in over],
            )
    for row in await conn.fetch("SELECT line, problem FROM import_bad"):
        report.add_bad(BadRow("edges", row["line"], row["problem"]))


def rowcount(status: str) -> int:
    """The row count of a command status such as "INSERT 0 12" or "SELECT 12"."""
    return int(status.rsplit(" ", 1)[-1])
