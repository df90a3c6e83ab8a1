"""The stored graph's invariants as SQL, for tests that hammer the service and then look.

The queries are server.graph_invariants' (what the `follow-server check` command scans), so
a test and an operator judge a database by the same rules; this module adds the two that
only hold for a graph written by the service itself, never repaired by hand:
- nobody follows themselves;
- a mutual pair became mutual when the later of its two follows happened, so both rows'
  mutual_since equals the later followed_at (a repeated follow keeps the first time).
They run on one PostgreSQL and on Citus alike: a check that pairs an edge with its reverse
reads the re-keyed relations of server.graph_invariants.rekeyed_edges.
"""

from __future__ import annotations

import asyncpg

from server.graph_invariants import INVARIANTS, OVER_CAP, Invariant, rekeyed_edges

EXTRA_INVARIANTS: tuple[Invariant, ...] = (
    Invariant(
        "self_edge",
        "a user following themselves (either copy)",
        """SELECT (SELECT count(*) FROM following WHERE user_id = target_id)
                + (SELECT count(*) FROM followers WHERE user_id = follower_id)""",
        """SELECT 'following' AS copy, user_id FROM following WHERE user_id = target_id
           UNION ALL
           SELECT 'followers', user_id FROM followers WHERE user_id = follower_id LIMIT 5""",
    ),
    Invariant(
        "mutual_time_not_latest_follow",
        "mutual_since differs from the later of the pair's two follow times",
        # g is following(b, a), the reverse of f = following(a, b), keyed by its target a.
        """SELECT count(*) FROM following f JOIN following_by_target g
               ON g.user_id = f.user_id AND g.follower_id = f.target_id
           WHERE f.mutual_since IS DISTINCT FROM greatest(f.followed_at, g.followed_at)""",
        """SELECT f.user_id, f.target_id AS other, f.mutual_since,
                  f.followed_at, g.followed_at AS reverse_followed_at
           FROM following f JOIN following_by_target g
               ON g.user_id = f.user_id AND g.follower_id = f.target_id
           WHERE f.mutual_since IS DISTINCT FROM greatest(f.followed_at, g.followed_at)
           LIMIT 5""",
    ),
)


async def violations(
    conn: asyncpg.Connection, max_following: int
) -> dict[str, list[dict[str, object]]]:
    """Each broken invariant's name with a few offending rows; empty when the graph is sound.

    Run it on a quiet database: a write landing mid-scan can show as a transient violation."""
    found: dict[str, list[dict[str, object]]] = {}
    async with rekeyed_edges(conn) as edges:
        for inv in (*INVARIANTS, *EXTRA_INVARIANTS, OVER_CAP):
            args = (max_following,) if inv is OVER_CAP else ()
            await edges.ready_for(inv.count_sql, inv.sample_sql)
            if await conn.fetchval(inv.count_sql, *args):
                found[inv.name] = [dict(r) for r in await conn.fetch(inv.sample_sql, *args)]
    return found


async def assert_sound(conn: asyncpg.Connection, max_following: int) -> None:
    """Fail with the offending rows when any invariant is broken."""
    broken = await violations(conn, max_following)
    assert not broken, f"broken invariants: {broken}"


async def edges_touching(conn: asyncpg.Connection, user_id: str) -> int:
    """Rows of any table that still mention `user_id` (a deleted account must leave none)."""
    n: int = await conn.fetchval(
        """SELECT (SELECT count(*) FROM following WHERE user_id = $1 OR target_id = $1)
                + (SELECT count(*) FROM followers WHERE user_id = $1 OR follower_id = $1)
                + (SELECT count(*) FROM follow_counts WHERE user_id = $1)
                + (SELECT count(*) FROM follow_count_deltas WHERE user_id = $1)
                + (SELECT count(*) FROM accounts WHERE user_id = $1)""",
        user_id,
    )
    return n
