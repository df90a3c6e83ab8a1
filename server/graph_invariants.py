"""The follow graph's invariants, written once as SQL: what every transaction of server.store
keeps true, and how each user's true counts follow from the edge lists.

`follow-server check` (server.checker) scans for and repairs these, the bulk importer
(server.importer) recounts with `true_counts`, and the tests judge a database by the same
text (tests.invariants), so an operator, the importer and a test cannot drift apart on what a
sound graph is:
- both copies of each edge exist: following(a, b) <=> followers(b, a), with one follow time;
- mutual state is symmetric: following(a, b).mutual_since is set <=> following(b, a) exists,
  and both rows carry the same mutual_since;
- counts equal edges: the following / followers / mutual counts of each user (their
  follow_counts row plus their follow_count_deltas rows: the follow_totals view) equal the
  number of their following rows, followers rows, and following rows with mutual_since;
- every edge joins two existing accounts, and every account has exactly one counter row;
- nobody follows more users than the cap.

The same SQL runs on one PostgreSQL and on Citus, where every table is distributed on
user_id and a join must pair rows of one owner (joins on target_id or follower_id are
refused). An invariant that relates an edge row to rows of its other user therefore reads
that edge table keyed by the other user (REKEYED: following_by_target, followers_by_follower;
see rekeyed_edges): on one PostgreSQL a view, which the planner folds into the same plan as a
join on the other column, on Citus a table distributed on user_id beside the others, filled
by one re-partitioning INSERT ... SELECT per scan.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeAlias

import asyncpg

from server.database import has_citus

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    Queryable: TypeAlias = asyncpg.Connection | PoolConnectionProxy[asyncpg.Record]


async def graph_is_distributed(conn: Queryable) -> bool:
    """Whether Citus distributes the graph's tables (server.migrations does wherever the
    extension is), so that a statement may only join rows of one owner."""
    if not await has_citus(conn):
        return False
    distributed: bool = await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM pg_dist_partition"
        " WHERE logicalrelid = to_regclass('follow_counts') AND partmethod = 'h')"
    )
    return distributed


def true_counts(users: str, only: str | None = None) -> str:
    """A query of (user_id, following, followers, mutual) for each row of `users` (a FROM
    item aliased `u`, with a user_id column), counted from the edge lists: one GROUP BY pass
    over each edge table. `only`, a subquery of user ids, limits those passes to the users it
    names (the planner cannot push `users` down through the GROUP BY itself). Every join is
    on user_id, so on Citus each shard counts its own users."""
    only_f = f" WHERE f.user_id IN ({only})" if only else ""
    only_r = f" WHERE r.user_id IN ({only})" if only else ""
    return f"""
SELECT u.user_id, COALESCE(o.following, 0) AS following, COALESCE(i.followers, 0) AS followers,
       COALESCE(o.mutual, 0) AS mutual
FROM {users}
LEFT JOIN (SELECT f.user_id, count(*) AS following, count(f.mutual_since) AS mutual
           FROM following f{only_f} GROUP BY f.user_id) o ON o.user_id = u.user_id
LEFT JOIN (SELECT r.user_id, count(*) AS followers
           FROM followers r{only_r} GROUP BY r.user_id) i ON i.user_id = u.user_id
"""  # noqa: S608 - `users` and `only` are constant SQL fragments of our callers


@dataclass(frozen=True, slots=True)
class Rekeyed:
    """An edge table's rows keyed by the other user of each edge, so that an invariant can
    pair them with rows of that user by user_id (which Citus runs within each shard)."""

    name: str
    columns: str  # the table's columns on Citus; `query` gives them in this order
    query: str


_ID = 'text COLLATE "C" NOT NULL'

# following(a, b) as (user_id b, follower_id a): shaped like the followers row it must have.
# follower_known: whether a is an account, looked up beside a's rows before re-keying.
FOLLOWING_BY_TARGET = Rekeyed(
    "following_by_target",
    f"user_id {_ID}, follower_id {_ID}, followed_at timestamptz NOT NULL,"
    " mutual_since timestamptz, follower_known bool NOT NULL",
    """SELECT f.target_id AS user_id, f.user_id AS follower_id, f.followed_at, f.mutual_since,
          a.user_id IS NOT NULL AS follower_known
   FROM following f LEFT JOIN accounts a ON a.user_id = f.user_id""",
)
# followers(b, a) as (user_id a, target_id b): shaped like the following row it must have.
FOLLOWERS_BY_FOLLOWER = Rekeyed(
    "followers_by_follower",
    f"user_id {_ID}, target_id {_ID}, followed_at timestamptz NOT NULL, target_known bool NOT NULL",
    """SELECT r.follower_id AS user_id, r.user_id AS target_id, r.followed_at,
          a.user_id IS NOT NULL AS target_known
   FROM followers r LEFT JOIN accounts a ON a.user_id = r.user_id""",
)
REKEYED: tuple[Rekeyed, ...] = (FOLLOWING_BY_TARGET, FOLLOWERS_BY_FOLLOWER)


@dataclass(slots=True)
class RekeyedEdges:
    """The re-keyed edge relations on one connection for one scan or repair. On Citus they
    are tables filled on first use and again after the edges change (`changed`); on one
    PostgreSQL views, always current."""

    conn: Queryable
    citus: bool
    _filled: set[str] = field(default_factory=set)
    _fresh: set[str] = field(default_factory=set)

    async def ready_for(self, *statements: str) -> None:
        """Make the re-keyed relations that these statements read hold the live rows."""
        if not self.citus:
            return
        for r in REKEYED:
            if r.name in self._fresh or not any(r.name in s for s in statements):
                continue
            if r.name in self._filled:
                await self.conn.execute(f"TRUNCATE {r.name}")
            await self.conn.execute(f"INSERT INTO {r.name} {r.query}")
            self._filled.add(r.name)
            self._fresh.add(r.name)

    def changed(self) -> None:
        """The edge tables were written: a later reader fills the relations again."""
        self._fresh.clear()


@contextlib.asynccontextmanager
async def rekeyed_edges(conn: Queryable) -> AsyncIterator[RekeyedEdges]:
    """The re-keyed edge relations, for the span of the block: temporary views on one
    PostgreSQL. On Citus distributed tables, made inside the caller's transaction and
    dropped at the end of the block; outside a transaction (a scan, which writes nothing),
    made in one of their own that is rolled back at the end, which also drops them, at a
    fraction of what dropping and committing costs. A failure leaves nothing behind."""
    if not await graph_is_distributed(conn):
        for r in REKEYED:
            await conn.execute(f"CREATE OR REPLACE TEMP VIEW {r.name} AS {r.query}")
        yield RekeyedEdges(conn, citus=False)
        await conn.execute("DROP VIEW " + ", ".join(r.name for r in REKEYED))
        return
    scan = None if conn.is_in_transaction() else conn.transaction()
    if scan is not None:
        await scan.start()
    try:
        for r in REKEYED:
            await conn.execute(f"CREATE UNLOGGED TABLE {r.name} ({r.columns})")
            await conn.execute(
                "SELECT create_distributed_table($1, 'user_id', colocate_with => 'follow_counts')",
                r.name,
            )
        yield RekeyedEdges(conn, citus=True)
        if scan is None:
            await conn.execute("DROP TABLE " + ", ".join(r.name for r in REKEYED))
    finally:
        if scan is not None:
            await scan.rollback()


@dataclass(frozen=True, slots=True)
class Invariant:
    """One property of a sound graph: SQL that counts and shows its violations, and the SQL
    that repairs them where the right state can be derived (none where it cannot)."""

    name: str
    description: str
    count_sql: str  # one row, one column: how many violations
    sample_sql: str  # a few violating rows, for the report
    repair_sql: tuple[str, ...] = ()


# Each counted user's true counts, from the edges.
_ACTUAL_COUNTS = f"WITH actual AS ({true_counts('follow_counts u')})\n"

# Edge rows naming a user that is not an account: the row's owner is looked up beside the
# row, the other user beside the re-keyed row.
_DANGLING_FOLLOWING = """FROM following_by_target t WHERE NOT t.follower_known
               OR NOT EXISTS (SELECT 1 FROM accounts a WHERE a.user_id = t.user_id)"""
_DANGLING_FOLLOWERS = """FROM followers_by_follower b WHERE NOT b.target_known
               OR NOT EXISTS (SELECT 1 FROM accounts a WHERE a.user_id = b.user_id)"""
# following(a, b) without followers(b, a), and followers(b, a) without following(a, b).
_NO_FOLLOWERS_COPY = """FROM following_by_target t WHERE NOT EXISTS (SELECT 1 FROM followers r
               WHERE r.user_id = t.user_id AND r.follower_id = t.follower_id)"""
_NO_FOLLOWING_COPY = """FROM followers r WHERE NOT EXISTS (SELECT 1 FROM following_by_target t
               WHERE t.user_id = r.user_id AND t.follower_id = r.follower_id)"""
_TIMES_DIFFER = """FROM following_by_target t JOIN followers r
               ON r.user_id = t.user_id AND r.follower_id = t.follower_id
           WHERE r.followed_at <> t.followed_at"""
# g is following(b, a), the reverse of f = following(a, b), keyed by its target a.
_MUTUAL_ASYMMETRIC = """FROM following f LEFT JOIN following_by_target g
               ON g.user_id = f.user_id AND g.follower_id = f.target_id
           WHERE (g.user_id IS NULL AND f.mutual_since IS NOT NULL)
              OR (g.user_id IS NOT NULL AND f.mutual_since IS DISTINCT FROM g.mutual_since)
              OR (g.user_id IS NOT NULL AND f.mutual_since IS NULL)"""

INVARIANTS: tuple[Invariant, ...] = (
    Invariant(
        "edge_to_missing_account",
        "an edge (either copy) whose user or other user is not an account",
        f"""SELECT (SELECT count(*) {_DANGLING_FOLLOWING})
                + (SELECT count(*) {_DANGLING_FOLLOWERS})""",
        f"""SELECT 'following' AS copy, t.follower_id AS user_id, t.user_id AS other
           {_DANGLING_FOLLOWING}
           UNION ALL
           SELECT 'followers', b.target_id, b.user_id {_DANGLING_FOLLOWERS}
           LIMIT 5""",
        (
            # The other users that are not accounts, found beside the re-keyed rows.
            """DELETE FROM following f
               WHERE NOT EXISTS (SELECT 1 FROM accounts a WHERE a.user_id = f.user_id)
                  OR f.target_id IN (SELECT t.user_id FROM following_by_target t
                      WHERE NOT EXISTS (SELECT 1 FROM accounts a WHERE a.user_id = t.user_id))""",
            """DELETE FROM followers r
               WHERE NOT EXISTS (SELECT 1 FROM accounts a WHERE a.user_id = r.user_id)
                  OR r.follower_id IN (SELECT b.user_id FROM followers_by_follower b
                      WHERE NOT EXISTS (SELECT 1 FROM accounts a WHERE a.user_id = b.user_id))""",
        ),
    ),
    Invariant(
        "missing_edge_copy",
        "following(a, b) without followers(b, a), or the reverse",
        f"""SELECT (SELECT count(*) {_NO_FOLLOWERS_COPY})
                + (SELECT count(*) {_NO_FOLLOWING_COPY})""",
        f"""SELECT 'no followers copy' AS problem, t.follower_id AS user_id, t.user_id AS other
           {_NO_FOLLOWERS_COPY}
           UNION ALL
           SELECT 'no following copy', r.follower_id, r.user_id {_NO_FOLLOWING_COPY}
           LIMIT 5""",
        (
            # Restore the half that is missing: an edge was acknowledged when either copy
            # was written, so a lone copy is evidence of a follow, not noise.
            """INSERT INTO followers (user_id, follower_id, followed_at)
               SELECT t.user_id, t.follower_id, t.followed_at FROM following_by_target t
               ON CONFLICT DO NOTHING""",
            """INSERT INTO following (user_id, target_id, followed_at)
               SELECT b.user_id, b.target_id, b.followed_at FROM followers_by_follower b
               ON CONFLICT DO NOTHING""",
        ),
    ),
    Invariant(
        "edge_time_mismatch",
        "the two copies of an edge carry different follow times",
        f"SELECT count(*) {_TIMES_DIFFER}",
        f"""SELECT t.follower_id AS user_id, t.user_id AS other, t.followed_at,
                  r.followed_at AS copy_at
           {_TIMES_DIFFER} LIMIT 5""",
        (
            """UPDATE followers r SET followed_at = t.followed_at FROM following_by_target t
               WHERE r.user_id = t.user_id AND r.follower_id = t.follower_id
                 AND r.followed_at <> t.followed_at""",
        ),
    ),
    Invariant(
        "mutual_asymmetric",
        "mutual_since set without the reverse follow, missing with it, or differing",
        f"SELECT count(*) {_MUTUAL_ASYMMETRIC}",
        f"""SELECT f.user_id, f.target_id AS other, f.mutual_since, g.mutual_since AS reverse
           {_MUTUAL_ASYMMETRIC}
           LIMIT 5""",
        (
            """UPDATE following f SET mutual_since = NULL WHERE mutual_since IS NOT NULL
               AND NOT EXISTS (SELECT 1 FROM following_by_target g
                               WHERE g.user_id = f.user_id AND g.follower_id = f.target_id)""",
            # Became mutual when the second of the two follows happened. Both rows of a pair
            # match here and see the pre-statement values, so they get the same time.
            """UPDATE following f SET mutual_since = greatest(f.followed_at, g.followed_at)
               FROM following_by_target g
               WHERE g.user_id = f.user_id AND g.follower_id = f.target_id
                 AND (f.mutual_since IS NULL OR f.mutual_since IS DISTINCT FROM g.mutual_since)""",
        ),
    ),
    Invariant(
        "counter_rows",
        "an account without a counter row, or counter or delta rows without an account",
        """SELECT (SELECT count(*) FROM accounts a WHERE NOT EXISTS
                      (SELECT 1 FROM follow_counts c WHERE c.user_id = a.user_id))
                + (SELECT count(*) FROM follow_counts c WHERE NOT EXISTS
                      (SELECT 1 FROM accounts a WHERE a.user_id = c.user_id))
                + (SELECT count(*) FROM follow_count_deltas d WHERE NOT EXISTS
                      (SELECT 1 FROM accounts a WHERE a.user_id = d.user_id))""",
        """SELECT 'no counter row' AS problem, a.user_id FROM accounts a WHERE NOT EXISTS
               (SELECT 1 FROM follow_counts c WHERE c.user_id = a.user_id)
           UNION ALL
           SELECT 'no account', c.user_id FROM follow_counts c WHERE NOT EXISTS
               (SELECT 1 FROM accounts a WHERE a.user_id = c.user_id)
           UNION ALL
           SELECT 'deltas without account', d.user_id FROM follow_count_deltas d WHERE NOT EXISTS
               (SELECT 1 FROM accounts a WHERE a.user_id = d.user_id)
           LIMIT 5""",
        (
            """INSERT INTO follow_counts (user_id) SELECT user_id FROM accounts
               ON CONFLICT DO NOTHING""",
            """DELETE FROM follow_counts c WHERE NOT EXISTS
                   (SELECT 1 FROM accounts a WHERE a.user_id = c.user_id)""",
            """DELETE FROM follow_count_deltas d WHERE NOT EXISTS
                   (SELECT 1 FROM accounts a WHERE a.user_id = d.user_id)""",
        ),
    ),
    Invariant(
        "counts_differ",
        "a counter that differs from the number of edges it counts",
        _ACTUAL_COUNTS  # noqa: S608 - constant SQL fragments
        + """SELECT count(*) FROM follow_totals c JOIN actual a USING (user_id)
           WHERE (c.following, c.followers, c.mutual)
                 IS DISTINCT FROM (a.following, a.followers, a.mutual)""",
        _ACTUAL_COUNTS  # noqa: S608 - constant SQL fragments
        + """SELECT c.user_id, c.following, a.following AS edges_following,
                  c.followers, a.followers AS edges_followers,
                  c.mutual, a.mutual AS edges_mutual
           FROM follow_totals c JOIN actual a USING (user_id)
           WHERE (c.following, c.followers, c.mutual)
                 IS DISTINCT FROM (a.following, a.followers, a.mutual)
           LIMIT 5""",
        (
            # Fold: every counter row becomes the true count and the deltas go.
            _ACTUAL_COUNTS  # noqa: S608 - constant SQL fragments
            + """UPDATE follow_counts c
               SET following = a.following, followers = a.followers, mutual = a.mutual
               FROM actual a WHERE a.user_id = c.user_id""",
            "DELETE FROM follow_count_deltas",
        ),
    ),
)

OVER_CAP = Invariant(
    "over_cap",
    "a user following more users than the cap (reported, never repaired)",
    "SELECT count(*) FROM follow_counts WHERE following > $1",
    "SELECT user_id, following FROM follow_counts WHERE following > $1 ORDER BY following DESC"
    " LIMIT 5",
)
