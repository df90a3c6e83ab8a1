"""The new edge tables built before the bulk transaction, two statements at a time.

When the edge tables are empty and every staged edge names an account the import creates
(the accounts table was empty as the edges were checked, and still is), the edges to write
are all of import_new. Then the new edge tables of server.importer.swap, their indexes and
each user's counts need nothing from the bulk transaction, so they are built before it, on
the importer's two connections at once (server.importer.pair): the following table (with
each edge's mutual state, joining import_new with itself, in two halves of the followers,
one on each connection), the followers table (in its key's order), each of their indexes
once its table is filled, and the counts per user. They are tables nobody else reads
(import_swap_*, import_count*), each statement committing on its own; a killed import
leaves them for the next one to drop. The bulk transaction (server.importer.bulk) then
creates the accounts, writes their counter rows from the counts and swaps the tables in;
if an account turned out to exist meanwhile, it drops them and takes its own way.

On 2 cores the build took as long as the same statements in the bulk transaction on one
connection (5,000,000 edges: 38-43 s against 42 s, see the README's import figures); what
it shortens is that transaction (~6 s instead of ~42 s), and with it how long change
events and calls creating the same accounts wait.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import server.importer.swap as swap
from server.importer.pair import Job, run_jobs
from server.importer.swap import EDGE_TABLES, Index, new_name

if TYPE_CHECKING:
    from server.importer.pair import Conn

_FOLLOWING, _FOLLOWERS = EDGE_TABLES
# The new edges of the followers from {lo} to before {hi}, with their mutual state: mutual
# when the reverse edge is new too, since the later of the two follow times. The self-join
# hashes the reverse edges in memory (see server.importer.bulk for why not a merge join).
# The followers are cut in two halves at the median one, each half's join run on its own
# connection: an edge's reverse has its target as follower, so it is in the same half's
# reverse rows (those whose target is in the half).
_FILL_FOLLOWING = f"""
INSERT INTO {new_name(_FOLLOWING)} (user_id, target_id, followed_at, mutual_since)
SELECT n.follower, n.target, n.at, CASE WHEN r.at IS NOT NULL THEN greatest(n.at, r.at) END
FROM (SELECT follower, target, at FROM import_new WHERE {{half}}) n
LEFT JOIN (SELECT follower, target, at FROM import_new WHERE {{reverse_half}}) r
       ON r.follower = n.target AND r.target = n.follower
"""  # noqa: S608 - constant names
_HALVES = (
    ("follower < {pivot}", "target < {pivot}"),
    ("follower >= {pivot}", "target >= {pivot}"),
)
# The follower in the middle of import_new, as a literal: the median of a 1% sample of its
# pages (milliseconds; reading to the middle took seconds), or for a table too small to
# sample, of all of it.
_PIVOT = """
SELECT quote_literal(percentile_disc(0.5) WITHIN GROUP (ORDER BY follower))
FROM import_new {sample}
"""
_SAMPLE = "TABLESAMPLE SYSTEM (1) REPEATABLE (0)"
# The join's and the followers' sort's settings, for their own transaction only.
_SORT_SETTINGS = "BEGIN; SET LOCAL work_mem = '1GB'"
_JOIN_SETTINGS = _SORT_SETTINGS + "; SET LOCAL enable_mergejoin = off"
# The followers table written in its primary key's order (import_new is in the following
# table's): its two indexes are then built from sorted rows, which costs less than the sort
# here (5,000,000 edges: ~3% less CPU for the whole import), and each user's fans lie on
# neighbouring pages, which is what a List of fans reads.
_FILL_FOLLOWERS = f"""
INSERT INTO {new_name(_FOLLOWERS)} (user_id, follower_id, followed_at)
SELECT target, follower, at FROM import_new ORDER BY target, follower
"""  # noqa: S608 - constant names
_COUNT_OUT = f"""
CREATE UNLOGGED TABLE import_count_out AS
SELECT user_id, count(*) AS n, count(mutual_since) AS mutual
FROM {new_name(_FOLLOWING)} GROUP BY user_id
"""  # noqa: S608 - constant names
_COUNT_IN = f"""
CREATE UNLOGGED TABLE import_count_in AS
SELECT user_id, count(*) AS n FROM {new_name(_FOLLOWERS)} GROUP BY user_id
"""  # noqa: S608 - constant names
_ENOUGH = "SELECT count(*) >= $1 FROM (SELECT 1 FROM import_new LIMIT $1) n"
# Every created account's counter row (all of import_profiles), in id order, and in the
# bulk transaction only their INSERT.
_COUNTS = """
CREATE UNLOGGED TABLE import_counts AS
SELECT p.user_id, COALESCE(o.n, 0) AS following, COALESCE(i.n, 0) AS followers,
       COALESCE(o.mutual, 0) AS mutual
FROM import_profiles p
LEFT JOIN import_count_out o ON o.user_id = p.user_id
LEFT JOIN import_count_in i ON i.user_id = p.user_id
ORDER BY p.user_id
"""
WRITE_COUNTS = """
INSERT INTO follow_counts (user_id, following, followers, mutual)
SELECT user_id, following, followers, mutual FROM import_counts
"""
# Into the live tables instead, when they cannot be swapped after all.
WRITE_LIVE = tuple(
    f"INSERT INTO {t.name} SELECT * FROM {new_name(t)} ORDER BY {key}"  # noqa: S608
    for t, key in ((_FOLLOWING, "user_id, target_id"), (_FOLLOWERS, "user_id, follower_id"))
)


@dataclass(frozen=True, slots=True)
class Prebuilt:
    """The new edge tables' indexes (by live table) and how many edges they hold."""

    indexes: dict[str, list[Index]]
    edges: int


async def build(conn: Conn, second: Conn) -> Prebuilt | None:
    """Build the new edge tables and the counts from import_new on both connections, when
    it fits (see the module's doc); None, having built nothing, when it does not."""
    if await conn.fetchval("SELECT EXISTS (SELECT 1 FROM accounts)"):
        return None
    if not await swap.can_swap(conn) or not await conn.fetchval(_ENOUGH, swap.SWAP_MIN_EDGES):
        return None
    await drop(conn)
    plans = {t.name: await swap.index_plan(conn, t) for t in EDGE_TABLES}
    pivot = await conn.fetchval(_PIVOT.format(sample=_SAMPLE))
    if pivot is None:
        pivot = await conn.fetchval(_PIVOT.format(sample=""))
    await conn.execute(swap.create_new(_FOLLOWING))
    await conn.execute(swap.create_new(_FOLLOWERS))
    halves = [
        _FILL_FOLLOWING.format(half=n.format(pivot=pivot), reverse_half=r.format(pivot=pivot))
        for n, r in _HALVES
    ]
    filled = {_FOLLOWING.name: ("half 1", "half 2"), _FOLLOWERS.name: (_FOLLOWERS.name,)}
    jobs = [
        *(Job(f"half {n}", (_JOIN_SETTINGS, h, "COMMIT")) for n, h in enumerate(halves, 1)),
        Job(_FOLLOWERS.name, (_SORT_SETTINGS, _FILL_FOLLOWERS, "COMMIT")),
    ]
    for table in EDGE_TABLES:
        jobs += [
            Job(index.built, (statement,), after=filled[table.name])
            for statement, index in plans[table.name]
        ]
    jobs += [
        Job("count_out", (_COUNT_OUT,), after=filled[_FOLLOWING.name]),
        Job("count_in", (_COUNT_IN,), after=filled[_FOLLOWERS.name]),
        Job("counts", (_COUNTS,), after=("count_out", "count_in")),
    ]
    await run_jobs([conn, second], jobs)
    edges = await conn.fetchval("SELECT sum(n)::bigint FROM import_count_out")
    return Prebuilt({t: [i for _, i in plan] for t, plan in plans.items()}, int(edges))


async def drop(conn: Conn) -> None:
    """Drop what build made (or an earlier, killed import left)."""
    names = [new_name(t) for t in EDGE_TABLES] + [f"import_count{s}" for s in ("_out", "_in", "s")]
    await conn.execute(f"DROP TABLE IF EXISTS {', '.join(names)}")
