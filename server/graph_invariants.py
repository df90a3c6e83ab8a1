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
"""

from __future__ import annotations

from dataclasses import dataclass


def true_counts(users: str, only: str | None = None) -> str:
    """A query of (user_id, following, followers, mutual) for each row of `users` (a FROM
    item aliased `u`, with a user_id column), counted from the edge lists: one GROUP BY pass
    over each edge table. `only`, a subquery of user ids, limits those passes to the users it
    names (the planner cannot push `users` down through the GROUP BY itself)."""
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
"""


@dataclass(frozen=True, slots=True)
class Invariant:
    name: str
    description: str
    count_sql: str  # one row, one column: how many violations
    sample_sql: str  # a few violating rows, for the report
    repair_sql: tuple[str, ...] = ()


# Each counted user's true counts, from the edges.
_ACTUAL_COUNTS = f"WITH actual AS ({true_counts('follow_counts u')})\n"

INVARIANTS: tuple[Invariant, ...] = (
    Invariant(
        "edge_to_missing_account",
        "an edge (either copy) whose user or other user is not an account",
        """SELECT (SELECT count(*) FROM following f WHERE NOT EXISTS
                      (SELECT 1 FROM accounts a WHERE a.user_id = f.user_id)
                   OR NOT EXISTS (SELECT 1 FROM accounts a WHERE a.user_id = f.target_id))
                + (SELECT count(*) FROM followers r WHERE NOT EXISTS
                      (SELECT 1 FROM accounts a WHERE a.user_id = r.user_id)
                   OR NOT EXISTS (SELECT 1 FROM accounts a WHERE a.user_id = r.follower_id))""",
        """SELECT 'following' AS copy, user_id, target_id AS other FROM following f
           WHERE NOT EXISTS (SELECT 1 FROM accounts a WHERE a.user_id = f.user_id)
              OR NOT EXISTS (SELECT 1 FROM accounts a WHERE a.user_id = f.target_id)
           UNION ALL
           SELECT 'followers', user_id, follower_id FROM followers r
           WHERE NOT EXISTS (SELECT 1 FROM accounts a WHERE a.user_id = r.user_id)
              OR NOT EXISTS (SELECT 1 FROM accounts a WHERE a.user_id = r.follower_id)
           LIMIT 5""",
        (
            """DELETE FROM following f WHERE NOT EXISTS
                   (SELECT 1 FROM accounts a WHERE a.user_id = f.user_id)
               OR NOT EXISTS (SELECT 1 FROM accounts a WHERE a.user_id = f.target_id)""",
            """DELETE FROM followers r WHERE NOT EXISTS
                   (SELECT 1 FROM accounts a WHERE a.user_id = r.user_id)
               OR NOT EXISTS (SELECT 1 FROM accounts a WHERE a.user_id = r.follower_id)""",
        ),
    ),
    Invariant(
        "missing_edge_copy",
        "following(a, b) without followers(b, a), or the reverse",
        """SELECT (SELECT count(*) FROM following f WHERE NOT EXISTS (SELECT 1 FROM followers r
                      WHERE r.user_id = f.target_id AND r.follower_id = f.user_id))
                + (SELECT count(*) FROM followers r WHERE NOT EXISTS (SELECT 1 FROM following f
                      WHERE f.user_id = r.follower_id AND f.target_id = r.user_id))""",
        """SELECT 'no followers copy' AS problem, f.user_id, f.target_id AS other FROM following f
           WHERE NOT EXISTS (SELECT 1 FROM followers r
                             WHERE r.user_id = f.target_id AND r.follower_id = f.user_id)
           UNION ALL
           SELECT 'no following copy', r.follower_id, r.user_id FROM followers r
           WHERE NOT EXISTS (SELECT 1 FROM following f
                             WHERE f.user_id = r.follower_id AND f.target_id = r.user_id)
           LIMIT 5""",
        (
            # Restore the half that is missing: an edge was acknowledged when either copy
            # was written, so a lone copy is evidence of a follow, not noise.
            """INSERT INTO followers (user_id, follower_id, followed_at)
               SELECT f.target_id, f.user_id, f.followed_at FROM following f
               ON CONFLICT DO NOTHING""",
            """INSERT INTO following (user_id, target_id, followed_at)
               SELECT r.follower_id, r.user_id, r.followed_at FROM followers r
               ON CONFLICT DO NOTHING""",
        ),
    ),
    Invariant(
        "edge_time_mismatch",
        "the two copies of an edge carry different follow times",
        """SELECT count(*) FROM following f JOIN followers r
               ON r.user_id = f.target_id AND r.follower_id = f.user_id
           WHERE r.followed_at <> f.followed_at""",
        """SELECT f.user_id, f.target_id AS other, f.followed_at, r.followed_at AS copy_at
           FROM following f JOIN followers r
               ON r.user_id = f.target_id AND r.follower_id = f.user_id
           WHERE r.followed_at <> f.followed_at LIMIT 5""",
        (
            """UPDATE followers r SET followed_at = f.followed_at FROM following f
               WHERE r.user_id = f.target_id AND r.follower_id = f.user_id
                 AND r.followed_at <> f.followed_at""",
        ),
    ),
    Invariant(
        "mutual_asymmetric",
        "mutual_since set without the reverse follow, missing with it, or differing",
        """SELECT count(*) FROM following f LEFT JOIN following g
               ON g.user_id = f.target_id AND g.target_id = f.user_id
           WHERE (g.user_id IS NULL AND f.mutual_since IS NOT NULL)
              OR (g.user_id IS NOT NULL AND f.mutual_since IS DISTINCT FROM g.mutual_since)
              OR (g.user_id IS NOT NULL AND f.mutual_since IS NULL)""",
        """SELECT f.user_id, f.target_id AS other, f.mutual_since, g.mutual_since AS reverse
           FROM following f LEFT JOIN following g
               ON g.user_id = f.target_id AND g.target_id = f.user_id
           WHERE (g.user_id IS NULL AND f.mutual_since IS NOT NULL)
              OR (g.user_id IS NOT NULL AND f.mutual_since IS DISTINCT FROM g.mutual_since)
              OR (g.user_id IS NOT NULL AND f.mutual_since IS NULL)
           LIMIT 5""",
        (
            """UPDATE following f SET mutual_since = NULL WHERE mutual_since IS NOT NULL
               AND NOT EXISTS (SELECT 1 FROM following g
                               WHERE g.user_id = f.target_id AND g.target_id = f.user_id)""",
            # Became mutual when the second of the two follows happened. Both rows of a pair
            # match here and see the pre-statement values, so they get the same time.
            """UPDATE following f SET mutual_since = greatest(f.followed_at, g.followed_at)
               FROM following g
               WHERE g.user_id = f.target_id AND g.target_id = f.user_id
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
        _ACTUAL_COUNTS
        + """SELECT count(*) FROM follow_totals c JOIN actual a USING (user_id)
           WHERE (c.following, c.followers, c.mutual)
                 IS DISTINCT FROM (a.following, a.followers, a.mutual)""",
        _ACTUAL_COUNTS
        + """SELECT c.user_id, c.following, a.following AS edges_following,
                  c.followers, a.followers AS edges_followers,
                  c.mutual, a.mutual AS edges_mutual
           FROM follow_totals c JOIN actual a USING (user_id)
           WHERE (c.following, c.followers, c.mutual)
                 IS DISTINCT FROM (a.following, a.followers, a.mutual)
           LIMIT 5""",
        (
            # Fold: every counter row becomes the true count and the deltas go.
            _ACTUAL_COUNTS
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
