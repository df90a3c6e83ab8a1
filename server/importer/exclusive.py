"""`follow-server import --exclusive`: the merge of the edges for a maintenance window, when
no service writes (server.importer.merge is the default, safe beside a live service).

Each batch (EXCLUSIVE_BATCH_EDGES edges, its own transaction) locks the four tables the edges
and counts live in IN EXCLUSIVE MODE: reads go on (Check, GetInfo, lists), every write
(follows, unfollows, deletions' cleanup, count folding) waits until the batch commits,
seconds later. So no per-user lock is taken (on a 5,000,000-edge graph a live batch spent
a third of its time on one row lock per user it touches, each a WAL record and a dirtied
page), the statements are planned freely (hash joins over the batch) instead of as a
nested loop per edge, and the followers copies go in sorted by owner over a large batch,
so each index page is visited once for many edges. The statements are the live merge's
(server.importer.merge): both copies, mutual state on both sides, exact counts (counter
rows of the followers, delta rows of the users followed), the cap and accounts deleted
meanwhile checked in the batch's transaction, edges present skipped. Resumable as the
live merge is: each batch commits whole.

One PostgreSQL only: on Citus (transaction.import_graph) the live batches run instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import asyncpg

from server.importer.merge import (
    INSERT_FOLLOWERS,
    INSERT_FOLLOWING_COUNTED,
    NOT_ADDED,
    THEIR_MUTUAL_COUNTED,
    VERDICTS,
    VERDICTS_UNCAPPED,
    in_transaction,
    record_batch,
)
from server.importer.report import ImportReport, progress_bar
from server.importer.staging import Batch
from server.store import DELTA_SHARDS

if TYPE_CHECKING:
    from server.importer.options import ImportOptions
    from server.importer.pair import Conn
    from server.importer.staging import Staging

EXCLUSIVE_BATCH_EDGES = 1_000_000
# Writers wait; readers do not. follow_counts first: the service's writes lock a counter
# row first (after the advisory gate), so a call caught between its row lock and its
# inserts meets our lock on the next table in the same order (or, at worst, a deadlock
# that PostgreSQL breaks and in_transaction retries).
_LOCK_TABLES = (
    "LOCK TABLE follow_counts, follow_count_deltas, following, followers IN EXCLUSIVE MODE"
)
# The ids of the batch (followers and the users they follow) without a counter row: an
# account deleted since the checks.
_GONE = """
SELECT u.id FROM (
    SELECT follower AS id FROM import_new WHERE follower BETWEEN $1 AND $2
    UNION
    SELECT target FROM import_new WHERE follower BETWEEN $1 AND $2
) u
WHERE NOT EXISTS (SELECT 1 FROM follow_counts c WHERE c.user_id = u.id)
"""
# Whether a follower of the batch would pass the cap (then the verdicts count it).
_CAP_BITES = """
SELECT EXISTS (
    SELECT 1 FROM (SELECT follower, count(*) AS n FROM import_new
                   WHERE follower BETWEEN $1 AND $2 GROUP BY follower) p
    JOIN follow_counts c ON c.user_id = p.follower
    WHERE c.following + p.n > $3::bigint
)
"""


async def write_edges_exclusive(
    conn: Conn, staging: Staging, chunks: list[Batch], report: ImportReport, options: ImportOptions
) -> None:
    """import_new into both edge tables, with mutual state and counts, in batches of about
    EXCLUSIVE_BATCH_EDGES edges, each holding the edge tables EXCLUSIVE (see the module)."""
    total = sum(b.edges for b in chunks)
    start = number = 0
    with progress_bar(options, "merging", total, "edge") as bar:
        while start < len(chunks):
            end = start + 1
            edges = chunks[start].edges
            while end < len(chunks) and edges + chunks[end].edges <= EXCLUSIVE_BATCH_EDGES:
                edges += chunks[end].edges
                end += 1
            batch = Batch.join(chunks[start:end])
            await _write(conn, number, batch, report, options)
            report.largest_batch = max(report.largest_batch, batch.edges)
            bar.update(batch.edges)
            start, number = end, number + 1
    report.lap("write edges")


async def _write(
    conn: Conn, number: int, batch: Batch, report: ImportReport, options: ImportOptions
) -> None:
    shard = number % DELTA_SHARDS
    cap = options.max_following

    async def work() -> tuple[int, list[asyncpg.Record]]:
        await conn.execute(_LOCK_TABLES)
        gone = [r[0] for r in await conn.fetch(_GONE, batch.lo, batch.hi)]
        if await conn.fetchval(_CAP_BITES, batch.lo, batch.hi, cap):
            await conn.execute(VERDICTS, batch.lo, batch.hi, cap, gone)
        else:
            await conn.execute(VERDICTS_UNCAPPED, batch.lo, batch.hi, gone)
        await conn.execute("ANALYZE import_batch")  # a large batch: plans by its real size
        await conn.execute(INSERT_FOLLOWERS)
        counted = await conn.fetch(INSERT_FOLLOWING_COUNTED)
        await conn.execute(THEIR_MUTUAL_COUNTED, shard)
        return sum(r[0] for r in counted), await conn.fetch(NOT_ADDED)

    added, not_added = await in_transaction(conn, report, work)
    record_batch(report, added, not_added, cap)
