"""From CSV into the staging tables, the checks only SQL can make there, and the plan of
the merge's batches. Nothing here locks a row or a table that the service's calls wait on:
the live tables are only read (an ACCESS SHARE lock, which only DDL waits for), each
statement in its own transaction.

Rows are COPYed into staging tables (import_accounts, import_edges; bad rows found so far
in import_bad). The checks (accounts being deleted, self-follows, unknown accounts,
duplicate edges in the file, followers the import would take over the cap) are set-based
statements over the staged rows, made against the live tables as they are at that moment,
and leave import_profiles (the accounts to write) and import_new (the edges to add, written in
(follower, target) order). server.importer.bulk takes from them the accounts the import
creates and the edges among them; what is left of import_new is then cut into chunks of
about CHUNK_EDGES edges (ranges of followers: plan_chunks), which server.importer.merge
writes in batches of consecutive chunks, checking again, under the locks, what the service
may have changed since (the cap, deletions, edges it added).

Where the staging tables live (Staging): on one PostgreSQL they are temporary tables of the
import's session (gone with it), except, when the import has a second connection (into
empty edge tables: Staging.detect), those it reads too (import_accounts, import_profiles,
import_edges, import_bad, import_new: see server.importer.pair), which are unlogged tables.
On Citus a temporary table cannot be joined with a distributed one, so each staging table
that meets the live tables is an unlogged table distributed on the column naming the user
its rows belong to and co-located with the live tables, so that a join between them is a
join within each shard, as every live table is keyed by user_id (server.migrations).
Unlogged tables are dropped at the end, and an import killed before that leaves them for
the next import to drop (only one import runs per database at a time:
server.importer.transaction). Two relations hold rows keyed by the other user of an edge:
import_targets (each staged edge's target, for Citus' unknown-account check) and
import_batch_rev (a batch's new edges under their target, for the followers copy and mutual
state). On Citus they are tables filled by an INSERT ... SELECT that re-partitions the
rows; on one PostgreSQL they are views of the same rows, so every statement reads the same
on both and nothing is copied where nothing has to move.
"""

from __future__ import annotations

import functools
import itertools
import math
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

from server.graph_invariants import graph_is_distributed
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
from server.importer.pair import Job, rests, run_jobs
from server.importer.report import BadRow, ImportReport, progress_bar

if TYPE_CHECKING:
    from server.importer.pair import Conn


@dataclass(frozen=True, slots=True)
class StagingTable:
    """One staging relation. `owner` names the column holding the user each row belongs to
    (the distribution column on Citus; None for the small tables only the coordinator
    reads, which stay temporary everywhere). `rekeys`, for a relation holding other rows
    under another owner, is the query of those rows: a view of it on one PostgreSQL, a
    table filled from it on Citus (Staging.fill). `made` tables are filled once, from one
    query (Staging.make): on one PostgreSQL they are made by it. `per_batch` tables hold
    one merge batch's rows: emptied at each commit on one PostgreSQL (ON COMMIT DELETE
    ROWS), emptied at the start of each batch on Citus (Staging.clear). `shared` tables are
    read by the importer's second connection on one PostgreSQL too (the checks and the
    new edge tables run two statements at once there: server.importer.pair), so they are
    unlogged tables there as well, not temporary ones."""

    name: str
    columns: str
    owner: str | None
    rekeys: str | None = None
    made: bool = False
    per_batch: bool = False
    shared: bool = False


_ID = 'text COLLATE "C" NOT NULL'
# The row's line in its file (both paths give it: csvread).
_LINE = "line int NOT NULL"
_BATCH = (
    f"line int NOT NULL, follower {_ID}, target {_ID}, at timestamptz NOT NULL,"
    " verdict smallint NOT NULL"
)

TABLES: tuple[StagingTable, ...] = (
    StagingTable(
        "import_accounts",
        f"{_LINE}, user_id {_ID}, nick text, face_url text",
        "user_id",
        shared=True,
    ),
    StagingTable(
        "import_edges",
        f"{_LINE}, follower {_ID}, target {_ID}, at numeric, problem text",
        "follower",
        shared=True,
    ),
    StagingTable(
        "import_targets", f"user_id {_ID}", "user_id", "SELECT target AS user_id FROM import_edges"
    ),
    StagingTable("import_unknown", f"user_id {_ID}", None),
    StagingTable("import_bad", "line int NOT NULL, problem text NOT NULL", None, shared=True),
    StagingTable(
        "import_profiles",
        f"user_id {_ID}, nick text, face_url text, line int NOT NULL, batch int NOT NULL",
        "user_id",
        made=True,
        shared=True,
    ),
    StagingTable(
        "import_new",
        f"line int NOT NULL, follower {_ID}, target {_ID}, at timestamptz NOT NULL,"
        " stored bool NOT NULL",
        "follower",
        shared=True,
    ),
    StagingTable("import_batch", _BATCH, "follower", per_batch=True),
    StagingTable(
        "import_batch_rev",
        _BATCH,
        "target",
        "SELECT line, follower, target, at, verdict FROM import_batch WHERE verdict = 0",
        per_batch=True,
    ),
)
_BY_NAME = {t.name: t for t in TABLES}
_ANY_EDGE = "SELECT EXISTS (SELECT 1 FROM following)"


@dataclass(frozen=True, slots=True)
class Staging:
    """Where one import's staging relations live: temporary ones on one PostgreSQL (the
    `shared` ones unlogged when the import is `paired`: it has a second connection),
    distributed ones co-located with the live tables on Citus (see the module's doc)."""

    citus: bool
    paired: bool = False

    @classmethod
    async def detect(cls, conn: Conn, *, edges: bool) -> Staging:
        """On one PostgreSQL an import of edges into empty edge tables (an initial load)
        is paired (server.importer.pair); into a graph a service is using, one connection
        takes one core at most, leaving the other to the service's calls."""
        citus = await graph_is_distributed(conn)
        empty = not await conn.fetchval(_ANY_EDGE)
        return cls(citus, paired=not citus and edges and empty)

    async def create(self, conn: Conn) -> None:
        """Make every staging relation (each statement committing on its own)."""
        if not self.citus:
            await self.drop(conn)
            for t in TABLES:
                if t.made:
                    continue
                if t.shared and self.paired:
                    await conn.execute(f"CREATE UNLOGGED TABLE {t.name} ({t.columns})")
                elif t.rekeys is not None:
                    await conn.execute(f"CREATE TEMP VIEW {t.name} AS {t.rekeys}")
                else:
                    on_commit = " ON COMMIT DELETE ROWS" if t.per_batch else ""
                    await conn.execute(f"CREATE TEMP TABLE {t.name} ({t.columns}){on_commit}")
            return
        # Citus: what an import killed earlier left behind goes first (one import at a time
        # runs per database, so nobody else is using it); owned rows in distributed tables.
        await self.drop(conn)
        for t in TABLES:
            if t.owner is None:
                await conn.execute(f"CREATE TEMP TABLE {t.name} ({t.columns})")
                continue
            await conn.execute(f"CREATE UNLOGGED TABLE {t.name} ({t.columns})")
            await conn.execute(
                "SELECT create_distributed_table($1, $2, colocate_with => 'follow_counts')",
                t.name,
                t.owner,
            )

    async def fill(self, conn: Conn, name: str) -> None:
        """Fill a re-keyed relation from its query: on Citus an INSERT ... SELECT that
        moves each row to its new owner's shard; on one PostgreSQL nothing (a view)."""
        query = _BY_NAME[name].rekeys
        if self.citus and query is not None:
            await conn.execute(f"INSERT INTO {name} {query}")

    async def clear(self, conn: Conn) -> None:
        """Empty the per-batch tables (Citus; on one PostgreSQL each commit empties them)."""
        if self.citus:
            for t in TABLES:
                if t.per_batch:
                    await conn.execute(f"DELETE FROM {t.name}")  # noqa: S608 - constant names

    async def make(self, conn: Conn, name: str, query: str) -> int:
        """Fill the `made` table `name` with the rows of `query`; how many. On one
        PostgreSQL CREATE TABLE AS makes it (written in bulk, as a new table is); on Citus
        the distributed table made at the start takes them, each row on its owner's shard."""
        if self.citus:
            return rowcount(await conn.execute(f"INSERT INTO {name} {query}"))
        kind = "UNLOGGED" if _BY_NAME[name].shared and self.paired else "TEMP"
        return rowcount(await conn.execute(f"CREATE {kind} TABLE {name} AS {query}"))

    async def drop(self, conn: Conn) -> None:
        """Drop what would outlive the session: on Citus the distributed tables, and the
        line sequence earlier versions made; on one PostgreSQL the shared tables (with the
        temporary views over them; everything else is temporary and goes with the
        session)."""
        if not self.citus:
            names = ", ".join(t.name for t in TABLES if t.shared)
            await conn.execute(f"DROP TABLE IF EXISTS {names} CASCADE")
        else:
            await conn.execute(
                "DROP TABLE IF EXISTS " + ", ".join(t.name for t in TABLES if t.owner)
            )
            await conn.execute("DROP SEQUENCE IF EXISTS import_line CASCADE")


# Accounts whose deletion is still being cleaned up (server.cleanup) cannot be imported
# again yet: a new account of the id must not meet the old one's edges. Refused as bad rows.
_PENDING_DELETION = """
DELETE FROM import_accounts i USING account_tombstones t WHERE i.user_id = t.user_id
RETURNING i.line, i.user_id
"""
BEING_DELETED = "is being deleted (its edges are still being removed); import it again later"

# One row per account (later rows win, as if imported one after the other), numbered into
# the merge's batches in id order.
ACCOUNT_BATCH = 2000  # accounts per merge transaction
_PROFILES = f"""
SELECT user_id, nick, face_url, line,
       ((row_number() OVER (ORDER BY user_id) - 1) / {ACCOUNT_BATCH})::int AS batch
FROM (SELECT DISTINCT ON (user_id) user_id, nick, face_url, line FROM import_accounts
      ORDER BY user_id, line DESC) p
"""  # noqa: S608 - constant text

# Citus: the ids the staged edges name that are neither accounts nor in the accounts file
# (a handful, usually none), followers looked up beside their rows, targets beside
# import_targets (each target under its own id), both by anti-join within the shards.
_UNKNOWN_ACCOUNTS = """
INSERT INTO import_unknown (user_id)
SELECT e.follower FROM import_edges e
WHERE NOT EXISTS (SELECT 1 FROM accounts a WHERE a.user_id = e.follower)
  AND NOT EXISTS (SELECT 1 FROM import_accounts i WHERE i.user_id = e.follower)
UNION
SELECT t.user_id FROM import_targets t
WHERE NOT EXISTS (SELECT 1 FROM accounts a WHERE a.user_id = t.user_id)
  AND NOT EXISTS (SELECT 1 FROM import_accounts i WHERE i.user_id = t.user_id)
"""

# Rows that name the same user twice, an account being deleted or an unknown account, or
# whose time the reader could not read, in the order the checks are made for one row.
# Unknown: on one PostgreSQL one pass with a hashed lookup of the accounts and the accounts
# file (_NOT_AN_ACCOUNT); on Citus that lookup would send every account id to every shard,
# so the ids found by _UNKNOWN_ACCOUNTS instead. account_tombstones is small (a Citus
# reference table).
_FIND_BAD_ROWS = f"""
INSERT INTO import_bad (line, problem)
SELECT line, problem FROM (
    SELECT e.line, CASE
        WHEN e.follower = e.target THEN 'a user cannot follow themselves'
        WHEN e.follower IN (SELECT user_id FROM account_tombstones)
        THEN 'follower_id: account ' || e.follower || ' {BEING_DELETED}'
        WHEN e.target IN (SELECT user_id FROM account_tombstones)
        THEN 'target_id: account ' || e.target || ' {BEING_DELETED}'
        WHEN e.follower {{unknown}}
        THEN 'follower_id: account ' || e.follower || ' does not exist'
        WHEN e.target {{unknown}}
        THEN 'target_id: account ' || e.target || ' does not exist'
        ELSE e.problem END AS problem
    FROM import_edges e
) p
WHERE problem IS NOT NULL
"""  # noqa: S608 - constant text
_NOT_AN_ACCOUNT = (
    "NOT IN (SELECT user_id FROM accounts UNION ALL SELECT user_id FROM import_accounts)"
)
_FOUND_UNKNOWN = "IN (SELECT user_id FROM import_unknown)"

# The first row of each edge among the good rows, in (follower, target) order: the order
# of the following table's primary key, and of the merge's batches (ranges of followers).
# `at` is the follow time ({now}, the import's start in µs, when the row gives none).
# `stored` marks edges already present as the check runs (their first follow time is
# kept); it is false without a look when the edge tables were empty.
_NEW_EDGES = """
INSERT INTO import_new (line, follower, target, at, stored)
SELECT d.line, d.follower, d.target, d.at, {stored} FROM (
    SELECT DISTINCT ON (e.follower, e.target) e.line, e.follower, e.target,
           'epoch'::timestamptz
           + COALESCE(trunc(e.at * 1000000)::bigint, {now}) * interval '1 microsecond' AS at
    FROM import_edges e {good}
    ORDER BY e.follower, e.target, e.line
) d
"""
_GOOD = "WHERE e.line NOT IN (SELECT line FROM import_bad)"
# Into a graph in use (one connection resting after each statement: server.importer.pair),
# _NEW_EDGES runs once per range of followers of about SLICE_ROWS staged rows, in follower
# order (so import_new is still written in (follower, target) order), each a statement of
# its own: the one statement took a core for seconds (1.3 s for 300,000 rows on an idle
# machine, most of it looking each edge up in the following table), while the service's
# calls shared the other. The ranges' bounds are quantiles of a sample of the followers;
# each range reads all staged rows again (a scan, cheap beside the sort and the lookups).
# Every range is bounded on both sides (from the least follower to the greatest, the last
# one including its upper bound), so the planner's estimate for each is a range's (no
# statistics on import_edges): small, and it looks the edges up by the following table's
# key; an open range was estimated at a third of the rows and had the whole following
# table hashed for it (1 s, against 0.2 s for 50,000 rows looked up).
SLICE_ROWS = 50_000
_SAMPLE_ROWS = 20_000
_SLICE_BOUNDS = """
SELECT (SELECT min(follower) FROM import_edges), (SELECT max(follower) FROM import_edges),
       (SELECT percentile_disc($2::float8[]) WITHIN GROUP (ORDER BY follower)
        FROM import_edges TABLESAMPLE BERNOULLI ($1))
"""
_IN_SLICE = "e.follower >= $1 AND e.follower < $2"
_IN_LAST_SLICE = "e.follower >= $1 AND e.follower <= $2"
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
SELECT (SELECT COALESCE(max(n), 0)
        FROM (SELECT count(*) AS n FROM import_new GROUP BY follower) p)
     + (SELECT COALESCE(max(following), 0) FROM follow_counts) > $1::bigint
"""

# The same over every staged row (before the duplicates and bad rows are taken out): a
# bound, which can be computed beside them. One row when the cap may bite.
_CAP_BOUND = """
SELECT 1 WHERE (SELECT COALESCE(max(n), 0)
                FROM (SELECT count(*) AS n FROM import_edges GROUP BY follower) p)
             + (SELECT COALESCE(max(following), 0) FROM follow_counts) > {cap}
"""

# Followers whom the import would take over the cap keep their earliest new follows.
# The merge checks again under the follower's lock (server.importer.merge).
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
             row_number() OVER (PARTITION BY n.follower ORDER BY n.at, n.line) AS nth
      FROM import_new n JOIN over o ON o.follower = n.follower) r
WHERE r.nth > r.room
"""

_DROP_LINES = "DELETE FROM import_new WHERE line = ANY($1::int[])"

# The merge's chunks: ranges of followers (each follower's new edges in one chunk, so its
# cap is checked once, under its lock), cut where the running total of edges plus a weight
# per follower (each is one more lock to take) passes a multiple of CHUNK_EDGES. The merge
# writes a run of consecutive chunks per transaction, as many as its time budget allows
# (server.importer.merge).
_PLAN = """
SELECT min(follower) AS lo, max(follower) AS hi, sum(n)::bigint AS edges,
       count(*)::int AS followers FROM (
    SELECT follower, n, (sum(n + $2::bigint) OVER (ORDER BY follower)::bigint - 1) / $1::bigint
           AS chunk
    FROM (SELECT follower, count(*) AS n FROM import_new GROUP BY follower) p
) q
GROUP BY chunk ORDER BY chunk
"""
CHUNK_EDGES = 500  # the unit the merge's batches are made of (their weight: see _PLAN)
FOLLOWER_WEIGHT = 5  # so a chunk of one-edge followers has ~80 followers to lock, not 500


@dataclass(frozen=True, slots=True)
class Batch:
    """A share of the new edges: the followers from lo to hi, their new edges and how many
    followers that is (one exclusive advisory lock each). The plan's chunks, and the merge's
    batches made of runs of them (Batch.join)."""

    lo: str
    hi: str
    edges: int
    followers: int

    @staticmethod
    def join(run: Sequence[Batch]) -> Batch:
        """The batch of consecutive chunks."""
        return Batch(
            run[0].lo,
            run[-1].hi,
            sum(b.edges for b in run),
            sum(b.followers for b in run),
        )


async def _copy_fast(conn: Conn, table: str, fast: FastReader) -> None:
    """COPY the rows the fast path takes (each with its line number)."""
    chunks = aiter(fast)
    first = await anext(chunks, None)
    if first is None:
        return

    async def data() -> AsyncIterator[bytes]:
        yield first
        async for chunk in chunks:
            yield chunk

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


async def check_accounts(conn: Conn, staging: Staging, report: ImportReport) -> None:
    """Refuse the accounts being deleted; make import_profiles."""
    for line, user_id in await conn.fetch(_PENDING_DELETION):
        report.add_bad(BadRow("accounts", line, f"account {user_id} {BEING_DELETED}"))
    await staging.make(conn, "import_profiles", _PROFILES)
    # Each merge batch reads its own rows: without an index every one of them read the whole
    # table, three times (an import of 1,000,000 accounts spent minutes on it).
    await conn.execute("CREATE INDEX ON import_profiles (batch)")
    await conn.execute("ANALYZE import_profiles")
    report.lap("check accounts")


async def account_batches(conn: Conn) -> list[int]:
    """The numbers of the account batches left to write (server.importer.bulk may have
    written some accounts already)."""
    rows = await conn.fetch("SELECT DISTINCT batch FROM import_profiles ORDER BY batch")
    return [r[0] for r in rows]


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
    conn: Conn,
    staging: Staging,
    report: ImportReport,
    options: ImportOptions,
    staged: int,
    second: Conn | None,
) -> bool:
    """Find the bad edge rows SQL can see and fill import_new (the edges to add), with
    `second` (one PostgreSQL: server.importer.pair) making the two first steps at once.
    Whether the accounts table was empty as the checks ran (every good edge then names
    accounts of the accounts file: server.importer.bulk needs no join to know it)."""
    no_accounts = not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM accounts)")
    was_empty = not await conn.fetchval(_ANY_EDGE)
    unknown = _NOT_AN_ACCOUNT
    if staging.citus:
        await staging.fill(conn, "import_targets")
        await conn.execute(_UNKNOWN_ACCOUNTS)
        unknown = _FOUND_UNKNOWN
    new_edges = functools.partial(
        _NEW_EDGES.format, stored="false" if was_empty else _STORED, now=time.time_ns() // 1000
    )
    find_bad = _FIND_BAD_ROWS.format(unknown=unknown)
    cap_may_bite: bool | None = None
    if second is not None:
        per_row, distinct, cap_may_bite = await _paired_checks(
            conn, second, find_bad, new_edges, options.max_following
        )
    else:
        per_row = rowcount(await conn.execute(find_bad))
        # Into a graph in use: a range of followers at a time (see SLICE_ROWS).
        ranges = math.ceil(staged / SLICE_ROWS) if rests(conn) and not staging.citus else 1
        slices = await _slices(conn, staged, ranges)
        distinct = await _first_rows(conn, new_edges, _GOOD if per_row else "", slices)
    good = _GOOD if per_row else ""
    if distinct < staged - per_row:
        await conn.execute(_DUPLICATES.format(good=good))
    stored = 0 if was_empty else rowcount(await conn.execute("DELETE FROM import_new WHERE stored"))
    report.edges_already_present = stored
    if cap_may_bite is not False and await conn.fetchval(_CAP_MAY_BITE, options.max_following):
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
    report.lap("check edges")
    return no_accounts


async def _first_rows(
    conn: Conn, new_edges: Callable[..., str], good: str, slices: Sequence[tuple[str, str]]
) -> int:
    """Fill import_new with each new edge's first row among the `good` rows, in one
    statement or a range of followers at a time (`slices`); how many."""
    if not slices:
        return rowcount(await conn.execute(new_edges(good=good)))
    distinct = 0
    for n, (lo, hi) in enumerate(slices, 1):
        in_slice = _IN_LAST_SLICE if n == len(slices) else _IN_SLICE
        where = f"{good} AND {in_slice}" if good else f"WHERE {in_slice}"
        distinct += rowcount(await conn.execute(new_edges(good=where), lo, hi))
    return distinct


async def _paired_checks(
    conn: Conn,
    second: Conn,
    find_bad: str,
    new_edges: Callable[..., str],
    cap: int,
) -> tuple[int, int, bool]:
    """Fill import_bad and import_new with three statements on the two connections at once
    (server.importer.pair): each edge's first row taken among all rows (when there are bad
    rows, rare in a big import, again among the good ones), the bad rows, and a bound of
    the cap check over all staged rows. How many bad rows, how many new edges, and whether
    a follower may pass the cap."""
    jobs = [
        Job("new", (new_edges(good=""),)),
        Job("bad", (find_bad,)),
        Job("cap", (_CAP_BOUND.format(cap=int(cap)),)),
    ]
    status = await run_jobs([conn, second], jobs)
    per_row, distinct = rowcount(status["bad"]), rowcount(status["new"])
    if per_row:
        await conn.execute("TRUNCATE import_new")
        distinct = rowcount(await conn.execute(new_edges(good=_GOOD)))
    return per_row, distinct, rowcount(status["cap"]) > 0


async def _slices(conn: Conn, staged: int, count: int) -> list[tuple[str, str]]:
    """`count` ranges of followers of the `staged` rows (lo inclusive, hi exclusive but for
    the last range's), in order, with about as many rows each; none (take all rows at once)
    when count is below 2 or no row is staged. Fewer when the sample finds fewer distinct
    bounds."""
    if count < 2:
        return []
    percent = min(100.0, 100.0 * _SAMPLE_ROWS / max(staged, 1))
    fractions = [i / count for i in range(1, count)]
    row = await conn.fetchrow(_SLICE_BOUNDS, percent, fractions)
    least, greatest, quantiles = row if row is not None else (None, None, None)
    if least is None:
        return []
    inner = sorted({q for q in quantiles or () if least < q <= greatest})
    return list(itertools.pairwise([least, *inner, greatest]))


async def plan_chunks(conn: Conn) -> list[Batch]:
    """Cut import_new (the edges left for the locked batches) into the merge's chunks."""
    # Each batch reads its range of followers: a BRIN index suits rows written in that
    # order (small, built in one pass).
    await conn.execute(
        "CREATE INDEX ON import_new USING brin (follower) WITH (pages_per_range = 8)"
    )
    await conn.execute("ANALYZE import_new")
    rows = await conn.fetch(_PLAN, CHUNK_EDGES, FOLLOWER_WEIGHT)
    return [Batch(r["lo"], r["hi"], r["edges"], r["followers"]) for r in rows]


def rowcount(status: str) -> int:
    """The row count of a command status such as "INSERT 0 12" or "SELECT 12"."""
    return int(status.rsplit(" ", 1)[-1])
