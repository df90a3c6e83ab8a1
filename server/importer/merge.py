"""From the staging tables into the live ones: accounts, both copies of each edge, mutual
state and the counters, each built once by a set-based statement rather than row by row.

Mutual state comes from one hash join of the new edges with themselves keyed by target
(import_rev: `mutual_since` is the later of the two follow times) and, for edges already
stored, with the followers copy of the reverse edge, which lives under this edge's follower;
the counters of every user the import touched are recomputed from the lists, so they are
exact afterwards even if they were not before. Every join pairs rows of one owner, so on
Citus each runs within the shards (server.importer.staging). A load that at least doubles
the edge tables may drop their indexes and build them again after.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from server.graph_invariants import true_counts
from server.importer.options import ImportOptions
from server.importer.report import ImportReport, progress_bar
from server.importer.staging import Staging, check_edges, rowcount

if TYPE_CHECKING:
    from server.importer.staging import Conn

# Later rows win, as if the rows had been imported one after the other. Under the lock on
# follow_counts no other transaction creates or deletes an account (the service's account
# writes lock counter rows first), so plain UPDATE and INSERT do what ON CONFLICT would, at
# a fraction of its cost per row. Counter rows are made (with exact counts) by the recount.
_PROFILES = """
SELECT DISTINCT ON (user_id) user_id, nick, face_url FROM import_accounts
ORDER BY user_id, line DESC
"""
_WRITE_ACCOUNTS = (
    """
UPDATE accounts a SET
    nick = COALESCE(p.nick, a.nick),
    face_url = COALESCE(p.face_url, a.face_url),
    profile_sequence = a.profile_sequence + 1
FROM import_profiles p
WHERE a.user_id = p.user_id
  AND (COALESCE(p.nick, a.nick), COALESCE(p.face_url, a.face_url))
      IS DISTINCT FROM (a.nick, a.face_url)
""",
    """
INSERT INTO accounts (user_id, nick, face_url)
SELECT p.user_id, p.nick, p.face_url FROM import_profiles p
WHERE NOT EXISTS (SELECT 1 FROM accounts a WHERE a.user_id = p.user_id)
""",
)

# Mutual pairs by one hash join of the new edges with their copy keyed by target (on one
# PostgreSQL the same rows); the rows go in import_new's order. An edge already stored in
# the other direction shows as the followers row under this edge's follower (the two copies
# of an edge carry one follow time: server.graph_invariants).
_FOLLOWING = """
INSERT INTO following (user_id, target_id, followed_at, mutual_since)
SELECT n.follower, n.target, n.at,
       CASE WHEN back.at IS NOT NULL THEN greatest(n.at, back.at)
            {old_mutual} END
FROM import_new n
LEFT JOIN import_rev back ON back.target = n.follower AND back.follower = n.target
{old_join}
"""
_OLD_MUTUAL = "WHEN old.followed_at IS NOT NULL THEN greatest(n.at, old.followed_at)"
_OLD_JOIN = "LEFT JOIN followers old ON old.user_id = n.follower AND old.follower_id = n.target"

# Each new edge's followers copy, from the copy of the new edges keyed by target.
_FOLLOWERS = """
INSERT INTO followers (user_id, follower_id, followed_at)
SELECT n.target, n.follower, n.at FROM import_rev n
"""

# Old edges that the import made mutual (the reverse edge is new): each old edge's row is
# under its follower, the target of the new edge, so the new edges are read by target.
_OLD_BECOME_MUTUAL = """
UPDATE following f SET mutual_since = greatest(f.followed_at, n.at)
FROM import_rev n
WHERE f.user_id = n.target AND f.target_id = n.follower AND f.mutual_since IS NULL
"""

# Whom to recount: everyone the import touched; every account when the edge tables were
# empty before it (the same counts, found without collecting the touched set).
_TOUCHED = """
SELECT follower AS user_id FROM import_new
UNION SELECT target FROM import_rev
UNION SELECT user_id FROM import_accounts
"""
_ALL_ACCOUNTS = "SELECT user_id FROM accounts"

# Counts from the lists (server.graph_invariants.true_counts, the checker's definition of a
# true count), for the touched users that have an account; the edge scans are limited to the
# touched users unless those are every account.
_COUNT = "{counts}ORDER BY u.user_id\n"
_TOUCHED_ACCOUNTS = "import_touched u\nJOIN accounts a ON a.user_id = u.user_id"
_ONLY_TOUCHED = "SELECT user_id FROM import_touched"

# The counter row holds the whole count: the recounted users' delta rows (see server.store)
# go. The EXCLUSIVE lock on follow_counts keeps every writer out, so no counter row appears
# between the UPDATE and the INSERT.
_WRITE_COUNTS = (
    """
UPDATE follow_counts c
SET following = n.following, followers = n.followers, mutual = n.mutual
FROM import_counts n
WHERE c.user_id = n.user_id
  AND (c.following, c.followers, c.mutual) IS DISTINCT FROM (n.following, n.followers, n.mutual)
""",
    """
INSERT INTO follow_counts (user_id, following, followers, mutual)
SELECT n.user_id, n.following, n.followers, n.mutual FROM import_counts n
WHERE NOT EXISTS (SELECT 1 FROM follow_counts c WHERE c.user_id = n.user_id)
ORDER BY n.user_id
""",
    """
DELETE FROM follow_count_deltas d USING import_counts n WHERE d.user_id = n.user_id
""",
)

# Bulk mode: the indexes (and primary keys) of the edge tables, to drop before a load that
# at least doubles them and to build again afterwards, which is several times faster than
# maintaining them row by row. Definitions are read from the catalog, so what is built
# again is exactly what the migrations made (on Citus: the distributed tables' definitions,
# which Citus applies to every shard).
_EDGE_INDEXES = """
SELECT i.indexrelid::regclass::text AS name, t.relname AS table_name,
       pg_get_indexdef(i.indexrelid) AS index_def,
       con.conname AS constraint_name, pg_get_constraintdef(con.oid) AS constraint_def
FROM pg_index i
JOIN pg_class t ON t.oid = i.indrelid
LEFT JOIN pg_constraint con ON con.conindid = i.indexrelid AND con.contype IN ('p', 'u')
WHERE t.relname IN ('following', 'followers') AND t.relnamespace = 'public'::regnamespace
ORDER BY con.conname NULLS LAST, 1
"""


async def write_accounts(conn: Conn, staging: Staging, report: ImportReport) -> None:
    """The staged accounts into `accounts`: new ones added, known ones' profiles updated."""
    report.accounts_written = await staging.make(conn, "import_profiles", _PROFILES)
    for statement in _WRITE_ACCOUNTS:
        await conn.execute(statement)
    report.lap("write accounts")


async def write_graph(
    conn: Conn, staging: Staging, report: ImportReport, options: ImportOptions, staged: int | None
) -> None:
    """From the staging tables to the real ones: check, edges, mutual state, counters.
    `staged` is how many edge rows are staged, None without an edges file."""
    steps = ["checking", "edges", "mutual state", "counters"]
    # Under the lock nobody adds edges: an empty table stays empty until the load, and
    # then holds exactly the import's edges.
    was_empty = not await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM following) OR EXISTS (SELECT 1 FROM followers)"
    )
    with progress_bar(options, "building", len(steps), "step") as bar:

        def step(done: str) -> None:
            report.lap(done)
            bar.update(1)
            if bar.n < len(steps):
                bar.set_postfix_str(steps[int(bar.n)])

        bar.set_postfix_str(steps[0])
        if staged is not None:
            await check_edges(conn, staging, report, options, was_empty, staged)
        if report.bad_row_count and not options.skip_bad_rows:
            return  # the caller aborts; don't spend time writing what will be rolled back
        step("check")
        if staged is not None:
            await _write_edges(conn, staging, report, options, was_empty)
        step("edges")
        if staged is not None and not was_empty:
            await conn.execute(_OLD_BECOME_MUTUAL)
        step("mutual state")
        await _recount(conn, staging, report, was_empty)
        step("counters")


async def _write_edges(
    conn: Conn, staging: Staging, report: ImportReport, options: ImportOptions, was_empty: bool
) -> None:
    """Both copies of each new edge, with the mutual state the new edges give each other."""
    new = await conn.fetchval("SELECT count(*) FROM import_new")
    rebuild = await _should_rebuild(conn, options.rebuild_indexes, new)
    indexes = await _drop_edge_indexes(conn) if rebuild else []
    await staging.fill(conn, "import_rev")
    following = _FOLLOWING.format(
        old_mutual="" if was_empty else _OLD_MUTUAL,
        old_join="" if was_empty else _OLD_JOIN,
    )
    # A hash join keeps import_new's order; a merge join would sort it away.
    await conn.execute("SET LOCAL enable_mergejoin = off")
    report.edges_added = rowcount(await conn.execute(following))
    await conn.execute("SET LOCAL enable_mergejoin = on")
    await conn.execute(_FOLLOWERS + ("" if indexes else " ORDER BY n.target, n.follower"))
    report.lap("insert edges")
    for statement in indexes:
        await conn.execute(statement)
    if indexes:
        report.lap("rebuild indexes")


async def _recount(conn: Conn, staging: Staging, report: ImportReport, was_empty: bool) -> None:
    """Exact counter rows, from the lists, for every user the import touched."""
    if was_empty:
        await staging.make(conn, "import_touched", _ALL_ACCOUNTS)
        only = None
    else:
        await staging.make(conn, "import_touched", _TOUCHED)
        only = _ONLY_TOUCHED
        await conn.execute("ANALYZE import_touched")
    count = _COUNT.format(counts=true_counts(_TOUCHED_ACCOUNTS, only))
    report.users_recounted = await staging.make(conn, "import_counts", count)
    for statement in _WRITE_COUNTS:
        await conn.execute(statement)


async def _should_rebuild(conn: Conn, mode: str, new_edges: int) -> bool:
    if mode in ("always", "never"):
        return mode == "always"
    if new_edges < 100_000:
        return False
    present: int = await conn.fetchval(
        "SELECT count(*) FROM (SELECT 1 FROM following LIMIT $1) s", new_edges
    )
    return present < new_edges


async def _drop_edge_indexes(conn: Conn) -> list[str]:
    """Drop every index of the edge tables; the statements that build them again."""
    rebuild: list[str] = []
    for r in await conn.fetch(_EDGE_INDEXES):
        table = r["table_name"]
        if r["constraint_name"] is not None:
            await conn.execute(f'ALTER TABLE {table} DROP CONSTRAINT "{r["constraint_name"]}"')
            rebuild.append(
                f'ALTER TABLE {table} ADD CONSTRAINT "{r["constraint_name"]}" {r["constraint_def"]}'
            )
        else:
            await conn.execute(f"DROP INDEX {r['name']}")
            rebuild.append(r["index_def"])
    return rebuild
