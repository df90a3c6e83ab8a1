"""The accounts an import creates and the edges among them, written set-based in one
transaction, without the merge's per-batch locks (one PostgreSQL; on Citus everything takes
the batches of server.importer.merge).

Why no locks are needed: an account this import creates is invisible to every other
transaction until the one creating it commits, so no service call can follow it, be
followed by it, count it, delete it or lock it meanwhile; an edge whose two users are both
such accounts therefore meets nothing to wait for or to check again. So one transaction
inserts the accounts (those not present, not being deleted), and in the same transaction
every staged new edge between two of them, both copies, written in key order; mutual state
by joining the edges with their reverses; and the counter rows of those accounts, with
their exact counts by GROUP BY. It commits all of it at once: no edge is ever visible
before its accounts, and an import killed before the commit leaves nothing of this step
(running it again starts it over). The edges touching accounts that existed before the
import then go through the locked batches, as do the profiles of existing accounts.

Into an empty database (every edge among created accounts, empty edge tables), the new
edge tables, their indexes and the counts are built before this transaction, on two
connections (server.importer.prebuild), and it only inserts the accounts and their counter
rows and swaps the tables in.

Cost of the one transaction: it holds the visibility horizon the change event readers
advance by (follow_events' txid), so event delivery to Watch streams and webhooks waits
until it commits (seconds to a minute for millions of edges, seconds when the tables were
built beforehand, whose statements each hold it while they run; the import itself writes
no events). A service call that creates one of the same accounts at the same moment waits for
it too (on the accounts key), then finds the account present.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import asyncpg

import server.importer.prebuild as prebuild
import server.importer.swap as swap
from server.importer.pair import rests
from server.importer.report import ImportReport
from server.importer.staging import ACCOUNT_BATCH
from server.importer.swap import EDGE_TABLES, Index

if TYPE_CHECKING:
    from server.importer.pair import Conn

# The accounts this transaction creates (new ids, none being deleted), in id order. An id a
# service call is creating at the same moment is waited for, then skipped (present).
_CREATE_ACCOUNTS = """
WITH made AS (
    INSERT INTO accounts (user_id, nick, face_url)
    SELECT p.user_id, p.nick, p.face_url FROM import_profiles p
    WHERE NOT EXISTS (SELECT 1 FROM accounts a WHERE a.user_id = p.user_id)
      AND NOT EXISTS (SELECT 1 FROM account_tombstones t WHERE t.user_id = p.user_id)
      {batches}
    ORDER BY p.user_id
    ON CONFLICT (user_id) DO NOTHING
    RETURNING user_id
)
INSERT INTO import_fresh (user_id) SELECT user_id FROM made
"""
# Into a graph in use (the importer's connection resting after each statement:
# server.importer.pair), ACCOUNTS_PER_STATEMENT at a time (runs of import_profiles'
# batches, which number the ids in order), each a statement of its own in the transaction:
# 100,000 accounts took 1.1 s of a core in one statement (0.6 for 50,000).
ACCOUNTS_PER_STATEMENT = 25_000
_IN_BATCHES = "AND p.batch >= $1 AND p.batch < $2"
_ANY_ACCOUNT = "SELECT EXISTS (SELECT 1 FROM accounts)"
# Into an empty accounts table: every staged profile, by a plain INSERT. ON CONFLICT costs
# each row a speculative insertion (twice the CPU: 6.4 s against 3.0 s for 1,000,000
# accounts); an id a service call created meanwhile fails the statement instead, and
# create_all falls back to _CREATE_ACCOUNTS.
_CREATE_ALL = """
INSERT INTO accounts (user_id, nick, face_url)
SELECT user_id, nick, face_url FROM import_profiles ORDER BY user_id
"""
# One of them is being deleted (a tombstone committed since the checks): the fallback.
_ANY_TOMBSTONED = """
SELECT EXISTS (SELECT 1 FROM account_tombstones t JOIN accounts a ON a.user_id = t.user_id)
"""
# A deletion of an earlier account of the same id that committed while the insert waited
# for its key shows its tombstone now (a new statement, a new snapshot): that id is not
# created after all (the locked account batches then refuse it as being deleted).
_TOMBSTONED = """
WITH t AS (
    DELETE FROM import_fresh f USING account_tombstones t WHERE f.user_id = t.user_id
    RETURNING f.user_id
)
DELETE FROM accounts a USING t WHERE a.user_id = t.user_id
"""
# The staged new edges between two created accounts, in (follower, target) order, each with
# its mutual state: mutual when the reverse edge is among them too (both then created
# here), since the later of the two follow times.
# (A hash join with import_new outside keeps its order, (follower, target): no sort. When
# every edge names created accounts, the joins with import_fresh are left out.)
_BULK_EDGES = """
INSERT INTO import_bulk (follower, target, at, mutual_since)
SELECT n.follower, n.target, n.at,
       CASE WHEN r.at IS NOT NULL THEN greatest(n.at, r.at) END
FROM import_new n
{fresh}
LEFT JOIN import_new r ON r.follower = n.target AND r.target = n.follower
"""
_BOTH_FRESH = """JOIN import_fresh a ON a.user_id = n.follower
JOIN import_fresh b ON b.user_id = n.target"""
# Into the live tables, each in its key order (B-tree inserts close to the last one).
_WRITE_EDGES = (
    EDGE_TABLES[0].fill.format(table="following") + " ORDER BY follower, target",
    EDGE_TABLES[1].fill.format(table="followers") + " ORDER BY target, follower",
)
# Every created account's counter row, with its counts ({fresh}: import_fresh, or
# import_profiles when every profile was created). A counter row already there would be one
# a service call is creating with the same account: the counts add to it (_ADD_TO_ROW);
# when every account was created into an empty table there is none to meet, and the plain
# INSERT is tried first (write_counts).
_WRITE_COUNTS = """
INSERT INTO follow_counts AS c (user_id, following, followers, mutual)
SELECT f.user_id, COALESCE(o.n, 0), COALESCE(i.n, 0), COALESCE(o.mutual, 0)
FROM {fresh} f
LEFT JOIN (SELECT follower, count(*) AS n, count(mutual_since) AS mutual
           FROM import_bulk GROUP BY follower) o ON o.follower = f.user_id
LEFT JOIN (SELECT target, count(*) AS n FROM import_bulk GROUP BY target) i
       ON i.target = f.user_id
ORDER BY f.user_id
"""
_ADD_TO_ROW = """
ON CONFLICT (user_id) DO UPDATE SET following = c.following + EXCLUDED.following,
    followers = c.followers + EXCLUDED.followers, mutual = c.mutual + EXCLUDED.mutual
"""
# After the commit, what is left for the locked batches: the profiles of accounts that
# existed, and the edges touching them. (Nothing, when every profile was created.)
_LEFT_PROFILES = "DELETE FROM import_profiles p USING import_fresh f WHERE p.user_id = f.user_id"
_LEFT_EDGES = """
DELETE FROM import_new n USING import_fresh a, import_fresh b
WHERE a.user_id = n.follower AND b.user_id = n.target
"""


async def write_fresh(
    conn: Conn,
    second: Conn | None,
    report: ImportReport,
    *,
    edges: bool,
    only_file: bool,
) -> None:
    """Create the import's new accounts and write the new edges among them, in one
    transaction (see the module's doc); leave the rest of import_profiles and import_new
    to the locked batches. `only_file`: the edges were checked when the accounts table was
    empty, so each names an account of the file. `second`, the importer's second
    connection (one PostgreSQL), builds the new edge tables with `conn` beforehand when
    they may be swapped in (server.importer.prebuild). When `conn` rests after each
    statement (into a graph in use), the accounts are created in several."""
    await conn.execute(
        'CREATE TEMP TABLE IF NOT EXISTS import_fresh (user_id text COLLATE "C" NOT NULL);'
        ' CREATE TEMP TABLE IF NOT EXISTS import_bulk (follower text COLLATE "C" NOT NULL,'
        ' target text COLLATE "C" NOT NULL, at timestamptz NOT NULL, mutual_since timestamptz)'
    )
    prebuilt = None
    if second is not None and edges and only_file:
        prebuilt = await prebuild.build(conn, second)
        report.lap("build new edge tables")
    async with conn.transaction():
        await conn.execute("TRUNCATE import_fresh, import_bulk")
        # The self-join of the new edges hashes them all: in memory, it keeps their order,
        # and costs half what the merge join the planner prefers does (two sorts of all
        # of them: 16 s against 31 s for 5,000,000 edges on a loaded box).
        await conn.execute("SET LOCAL work_mem = '1GB'; SET LOCAL enable_mergejoin = off")
        # Every edge names an account created here when the accounts table was empty as the
        # edges were checked and still is (nothing the service created meanwhile), and no
        # id turned out to be being deleted. Then every staged profile is created, and
        # import_profiles stands for import_fresh.
        all_fresh = only_file and not await conn.fetchval(_ANY_ACCOUNT)
        created = await create_all(conn) if all_fresh else None
        all_fresh = created is not None
        if created is None:
            created = await _create_accounts(conn, ACCOUNTS_PER_STATEMENT if rests(conn) else 0)
            if created:
                _rowcount(await conn.execute(_TOMBSTONED))
                created = await conn.fetchval("SELECT count(*) FROM import_fresh")
                await conn.execute("ANALYZE import_fresh")
        added = await _write_edges(
            conn, report, prebuilt, created=created, all_fresh=all_fresh, edges=edges
        )
    report.lap("write new accounts and their edges")
    if prebuilt is not None:
        await prebuild.drop(conn)
    report.accounts_written += created
    report.edges_added += added
    if all_fresh:
        await conn.execute("TRUNCATE import_profiles")
    elif created:
        await conn.execute(_LEFT_PROFILES)
    if added:
        # Every new edge was written here (without the joins with the created accounts,
        # all of import_new was)?
        staged = added if all_fresh else await conn.fetchval("SELECT count(*) FROM import_new")
        if staged == added:
            await conn.execute("TRUNCATE import_new")
        else:
            await conn.execute(_LEFT_EDGES)
    report.lap("what is left for the batches")


async def _write_edges(
    conn: Conn,
    report: ImportReport,
    prebuilt: prebuild.Prebuilt | None,
    *,
    created: int,
    all_fresh: bool,
    edges: bool,
) -> int:
    """In the bulk transaction, once the accounts are created: the new edges among them
    (both copies, swapped in when the edge tables were empty) and the created accounts'
    counter rows. How many edges."""
    swappable = await swap.can_swap(conn)
    fresh = "import_profiles" if all_fresh else "import_fresh"
    if prebuilt is not None and all_fresh:
        # Every edge is in the new tables: the counts and the swap are what is left.
        await conn.execute(prebuild.WRITE_COUNTS)
        report.lap("create accounts, write their counts")
        if swappable:
            report.swapped = await _swap_in(conn, report, prebuilt.indexes, prebuild.WRITE_LIVE)
        else:
            for statement in prebuild.WRITE_LIVE:
                await conn.execute(statement)
        return prebuilt.edges
    added = 0
    if created and edges:
        fresh_join = "" if all_fresh else _BOTH_FRESH
        added = _rowcount(await conn.execute(_BULK_EDGES.format(fresh=fresh_join)))
    report.lap("create accounts, pick their edges")
    if not created:
        return added
    if swappable and added >= swap.SWAP_MIN_EDGES:
        built = await swap.build(conn)
        await write_counts(conn, fresh)
        report.lap("build new edge tables")
        report.swapped = await _swap_in(conn, report, built, _WRITE_EDGES)
    else:
        for statement in _WRITE_EDGES:
            await conn.execute(statement)
        await write_counts(conn, fresh)
    return added


async def _create_accounts(conn: Conn, per_statement: int) -> int:
    """_CREATE_ACCOUNTS in one statement, or `per_statement` accounts at a time (rounded to
    whole batches of import_profiles); how many were created."""
    if not per_statement:
        return _rowcount(await conn.execute(_CREATE_ACCOUNTS.format(batches="")))
    last = await conn.fetchval("SELECT max(batch) FROM import_profiles")
    step = max(1, per_statement // ACCOUNT_BATCH)
    statement = _CREATE_ACCOUNTS.format(batches=_IN_BATCHES)
    created = 0
    for first in range(0, (last if last is not None else -1) + 1, step):
        created += _rowcount(await conn.execute(statement, first, first + step))
    return created


class _TakenError(Exception):
    """An account of the import turned out to exist or to be being deleted."""


async def create_all(conn: Conn) -> int | None:
    """Create every staged profile's account, in a savepoint, by a plain INSERT (the
    accounts table was empty as this transaction looked); None, having created nothing,
    when one of the ids was created by a service call meanwhile or is being deleted."""
    try:
        async with conn.transaction():
            created = _rowcount(await conn.execute(_CREATE_ALL))
            if await conn.fetchval(_ANY_TOMBSTONED):
                raise _TakenError
            return created
    except (asyncpg.UniqueViolationError, _TakenError):
        return None


async def write_counts(conn: Conn, fresh: str) -> None:
    """The created accounts' counter rows (`fresh`: the table naming them). When every
    profile was created, first by a plain INSERT in a savepoint (no counter row can be
    there: see _WRITE_COUNTS), again adding to rows met when one was after all."""
    statement = _WRITE_COUNTS.format(fresh=fresh)
    if fresh == "import_profiles":
        try:
            async with conn.transaction():
                await conn.execute(statement)
                return
        except asyncpg.UniqueViolationError:
            pass
    await conn.execute(statement + _ADD_TO_ROW)


async def _swap_in(
    conn: Conn, report: ImportReport, built: dict[str, list[Index]], instead: tuple[str, ...]
) -> bool:
    """Put the new edge tables in the live ones' place (see server.importer.swap); else
    drop them and run `instead` (the statements writing the edges into the live tables).
    Whether the swap was made."""
    if await swap.few_live_rows(conn) and await swap.lock_live(conn):
        await swap.swap(conn, built)
        report.lap("swap")
        return True
    for statement in instead:
        await conn.execute(statement)
    await swap.drop_built(conn)
    return False


def _rowcount(status: str) -> int:
    return int(status.rsplit(" ", 1)[-1])
