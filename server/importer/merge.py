"""From the staging tables into the live ones, in bounded batches, each its own short
transaction, while the service keeps serving: accounts first (ACCOUNT_BATCH ids at a time),
then the new edges a range of followers at a time. (On one PostgreSQL the accounts the
import creates and the edges among them were written before, in bulk: server.importer.bulk;
what is left here touches accounts that existed before the import.)

An edge batch is a run of the plan's consecutive chunks (server.importer.staging, about
CHUNK_EDGES edges each), sized to a time budget (ImportOptions.batch_seconds, 0.1 s): each
batch's hold time (gate to commit) gives the rate, and the next batch gets the edges that
rate writes in the budget, at most twice the last size (so a batch that ran slow is
followed by a smaller one at once, and growth is gradual), at most MAX_BATCH_EDGES edges
and MAX_BATCH_FOLLOWERS followers (one advisory lock each, in the shared lock table).
So the locks a service call may wait for stay bounded by about the budget, on a loaded box
as on an idle one, while an idle box writes bigger batches (fewer round trips per edge).

After each batch the merge rests ImportOptions.pause_ratio times as long as the batch took
(1 by default: a duty cycle of one half): on a small machine the importer and its
PostgreSQL backend otherwise keep a core busy, and bench-ops found the slowest calls of
other users during an import were ones that met none of the import's locks (their
latency was CPU sharing, 2 cores for the service, its database, the clients and the
import), while those that met a batch's locks waited at most a few hundred ms. A batch
slowed past its limit is retried smaller, down to MIN_BATCH_EDGES (below one of the plan's
chunks), so that on a starved CPU the tries still fit their limit instead of failing again
and again (the work of a cancelled try is lost).

A batch waits at most LOCK_WAIT_MS for any one lock; when a call holds one, the batch
rolls back, letting go of the locks it took, and is tried again at half the size after a
short pause, so it never holds many users' gates while it queues behind one call (which
made the calls on all those users wait: a convoy).

Each batch takes its locks the way a service call does (server.store's lock discipline: a
transaction touches rows owned by user U only while it holds a lock on U's follow_counts
row), and in the same orders, so it cannot deadlock with the calls:
1. the advisory gate (server.store's _GATE, the same keys and order), exclusive on each of
   the batch's followers (the users whose following lists it extends), as the acting user
   of a Follow takes its own; so, as for that call, a stream of other users' follows of
   one of them cannot starve the batch, and no call acting for one of them runs meanwhile;
2. the counter rows, in id order: FOR UPDATE for the followers (their following count and
   cap), FOR SHARE for the other users the batch follows (like the targets of a Follow:
   many followers may hold it at once, so a celebrity's fans keep following it while a
   batch adds more); a row that is gone means an account deleted meanwhile;
3. what the batch writes to the targets' counts goes to their follow_count_deltas rows (a
   shard per batch), upserted in id order, as a Follow's do.
Then, under those locks, what the service may have changed since the checks is checked
again: edges it added meanwhile are skipped (already present), a follower's cap is
counted from its locked counter row, and an edge naming an account deleted meanwhile is
refused. Counts change by exactly what the batch did (the service's increments, made
set-based), so they stay exact while calls change the same users.

Mutual state, per batch: an inserted edge a->b is mutual when b->a exists now (old, or
added by this batch: the followers copies are written first); then both rows get the later
follow time (a new row is written with it; an old reverse row is updated). The counts go up
once per following row with mutual_since set by the batch: in the counter row for a batch
follower's own rows, in the delta rows for rows of the users it follows.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import random
import time
from collections import Counter
from typing import TYPE_CHECKING, TypeVar

import asyncpg

from server.importer.batchlog import BatchLog
from server.importer.options import ImportOptions
from server.importer.pair import pause_after
from server.importer.report import BadRow, ImportReport, progress_bar
from server.importer.staging import BEING_DELETED, Batch, Staging
from server.store import _GATE, _SHARDS_OF, DELTA_SHARDS

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    from server.importer.pair import Conn

T = TypeVar("T")
MAX_ATTEMPTS = 8
_RETRYABLE = (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)

# -- accounts ------------------------------------------------------------------------------

_PROFILE_IDS = "SELECT user_id, line FROM import_profiles WHERE batch = $1 ORDER BY user_id"
_TOMBSTONED_AMONG = "SELECT user_id FROM account_tombstones WHERE user_id = ANY($1::text[])"
# A counter row for each new account (the service makes one with the account, too), then
# the accounts: new ones added, known ones' profiles updated where the file gives a field
# (profile_sequence counts real changes, as the service's ImportAccounts does).
_WRITE_ACCOUNTS = (
    """
INSERT INTO follow_counts (user_id)
SELECT user_id FROM import_profiles WHERE batch = $1 AND user_id <> ALL($2::text[])
ORDER BY user_id
ON CONFLICT DO NOTHING
""",
    """
INSERT INTO accounts AS a (user_id, nick, face_url)
SELECT user_id, nick, face_url FROM import_profiles
WHERE batch = $1 AND user_id <> ALL($2::text[])
ORDER BY user_id
ON CONFLICT (user_id) DO UPDATE SET
    nick = COALESCE(EXCLUDED.nick, a.nick),
    face_url = COALESCE(EXCLUDED.face_url, a.face_url),
    profile_sequence = a.profile_sequence + 1
WHERE (COALESCE(EXCLUDED.nick, a.nick), COALESCE(EXCLUDED.face_url, a.face_url))
      IS DISTINCT FROM (a.nick, a.face_url)
""",
)

# -- edges ---------------------------------------------------------------------------------

# The users a batch locks: its followers (acts; with their new edges) and the users they
# follow.
_BATCH_USERS = """
SELECT follower AS id, true AS acts, count(*) AS n FROM import_new
WHERE follower BETWEEN $1 AND $2 GROUP BY follower
UNION ALL
SELECT target, false, 0 FROM import_new WHERE follower BETWEEN $1 AND $2 GROUP BY target
"""

# One PostgreSQL: every counter row of the batch in one statement, in the given order (the
# outer rows of a nested loop, each locking its row in its own mode before the next); the
# followers' following counts (NULL: gone) and the other ids whose row is gone (deleted
# accounts).
_LOCK_ROWS = """
SELECT u.id, x.following
FROM unnest($1::text[], $2::bool[]) WITH ORDINALITY AS u(id, acts, n)
LEFT JOIN LATERAL (SELECT c.user_id, c.following FROM follow_counts c
                   WHERE c.user_id = u.id AND u.acts FOR UPDATE) x ON true
LEFT JOIN LATERAL (SELECT c.user_id FROM follow_counts c
                   WHERE c.user_id = u.id AND NOT u.acts FOR SHARE) s ON true
WHERE u.acts OR s.user_id IS NULL
"""
# Citus: one owner per statement (locks are taken shard by shard), sent in runs of one mode.
_LOCK_ONE = {
    True: "SELECT user_id, following FROM follow_counts WHERE user_id = $1 FOR UPDATE",
    False: "SELECT user_id, NULL::bigint FROM follow_counts WHERE user_id = $1 FOR SHARE",
}

# What becomes of each of the batch's edges, decided under the locks: 0 added, 1 already
# present (the service or an earlier run added it), 2 over the follower's cap (its
# earliest new follows are kept), 3 the follower or 4 the target deleted meanwhile. The
# cap is counted only for a batch with a follower whose locked count plus its new edges
# passes it (the service added follows since the checks); otherwise VERDICTS_UNCAPPED.
# (A join, not EXISTS: the planner made that a hashed subplan over all of `following`.)
PRESENT, OVER_CAP, FOLLOWER_GONE, TARGET_GONE = 1, 2, 3, 4
VERDICTS_UNCAPPED = """
INSERT INTO import_batch (line, follower, target, at, verdict)
SELECT n.line, n.follower, n.target, n.at,
       CASE WHEN n.follower = ANY($3::text[]) THEN 3
            WHEN n.target = ANY($3::text[]) THEN 4
            WHEN f.user_id IS NOT NULL THEN 1
            ELSE 0 END
FROM import_new n
LEFT JOIN following f ON f.user_id = n.follower AND f.target_id = n.target
WHERE n.follower BETWEEN $1 AND $2
"""
VERDICTS = """
INSERT INTO import_batch (line, follower, target, at, verdict)
SELECT line, follower, target, at,
       CASE WHEN v = 0 AND row_number() OVER (PARTITION BY follower, v ORDER BY at, line) > room
            THEN 2 ELSE v END
FROM (
    SELECT n.line, n.follower, n.target, n.at, $3::bigint - COALESCE(c.following, 0) AS room,
           CASE WHEN n.follower = ANY($4::text[]) THEN 3
                WHEN n.target = ANY($4::text[]) THEN 4
                WHEN f.user_id IS NOT NULL THEN 1
                ELSE 0 END AS v
    FROM import_new n
    LEFT JOIN follow_counts c ON c.user_id = n.follower
    LEFT JOIN following f ON f.user_id = n.follower AND f.target_id = n.target
    WHERE n.follower BETWEEN $1 AND $2
    OFFSET 0
) b
"""
# The followers copy first: then the following rows can be written with their mutual
# state, the reverse edge (old, or added by this batch) being the followers row under this
# edge's follower. Each row tells its owner and whether it is mutual, for the counts.
INSERT_FOLLOWERS = """
INSERT INTO followers (user_id, follower_id, followed_at)
SELECT target, follower, at FROM import_batch_rev ORDER BY target, follower
"""
_INSERT_FOLLOWING = """
INSERT INTO following (user_id, target_id, followed_at, mutual_since)
SELECT b.follower, b.target, b.at,
       CASE WHEN r.followed_at IS NOT NULL THEN greatest(b.at, r.followed_at) END
FROM import_batch b
LEFT JOIN followers r ON r.user_id = b.follower AND r.follower_id = b.target
WHERE b.verdict = 0
ORDER BY b.follower, b.target
RETURNING user_id, mutual_since IS NOT NULL AS mutual
"""
# Edges stored before this batch that a new edge made mutual: rows of the users followed.
_THEIR_MUTUAL = """
UPDATE following g SET mutual_since = greatest(g.followed_at, b.at)
FROM import_batch_rev b
WHERE g.user_id = b.target AND g.target_id = b.follower AND g.mutual_since IS NULL
RETURNING g.user_id
"""
_PER_TARGET = "SELECT target, count(*) FROM import_batch_rev GROUP BY target"
# The edges not added: present (counted) or refused (reported).
NOT_ADDED = "SELECT line, follower, target, verdict FROM import_batch WHERE verdict >= 1"

# One PostgreSQL: the rows written and the counts they change, in two statements (one for
# each side), the counting done where the rows are. The followers' own counter rows (held
# FOR UPDATE) get what each added; the targets' delta rows (a shard per batch), upserted in
# id order as a Follow's are, what was added under them and the old edges made mutual.
INSERT_FOLLOWING_COUNTED = f"""
WITH added AS ({_INSERT_FOLLOWING.strip()}
), own AS (
    SELECT user_id, count(*) AS n, count(*) FILTER (WHERE mutual) AS mutual
    FROM added GROUP BY user_id
)
UPDATE follow_counts c SET following = c.following + own.n, mutual = c.mutual + own.mutual
FROM own WHERE c.user_id = own.user_id
RETURNING own.n
"""  # noqa: S608 - constant text
THEIR_MUTUAL_COUNTED = f"""
WITH made AS ({_THEIR_MUTUAL.strip()}
), theirs AS (
    SELECT target AS user_id, 1 AS followers, 0 AS mutual FROM import_batch_rev
    UNION ALL
    SELECT user_id, 0, 1 FROM made
)
INSERT INTO follow_count_deltas AS d (user_id, shard, followers, mutual)
SELECT user_id, $1::smallint, sum(followers), sum(mutual) FROM theirs
GROUP BY user_id ORDER BY user_id
ON CONFLICT (user_id, shard) DO UPDATE
SET followers = d.followers + EXCLUDED.followers, mutual = d.mutual + EXCLUDED.mutual
"""  # noqa: S608 - constant text
# Citus: one owner per statement.
_ADD_OWN_ONE = """
UPDATE follow_counts SET following = following + $2, mutual = mutual + $3 WHERE user_id = $1
"""
_ADD_DELTA_ONE = """
INSERT INTO follow_count_deltas AS d (user_id, shard, followers, mutual)
VALUES ($1, $4, $2, $3)
ON CONFLICT (user_id, shard) DO UPDATE
SET followers = d.followers + EXCLUDED.followers, mutual = d.mutual + EXCLUDED.mutual
"""


def refusal(verdict: int, follower: str, target: str, cap: int) -> str:
    if verdict == OVER_CAP:
        return (
            f"following limit reached: {follower} would follow more than {cap} users"
            " (the service added follows while the import ran)"
        )
    gone = follower if verdict == FOLLOWER_GONE else target
    field = "follower_id" if verdict == FOLLOWER_GONE else "target_id"
    return f"{field}: account {gone} was deleted while the import ran"


def record_batch(
    report: ImportReport, added: int, not_added: Sequence[asyncpg.Record], cap: int
) -> None:
    """A committed batch in the report: the edges it added, those already present, and the
    refused ones as bad rows (the service changed their users since the checks)."""
    report.edges_added += added
    for line, follower, target, verdict in not_added:
        if verdict == PRESENT:
            report.edges_already_present += 1
            continue
        report.add_bad(BadRow("edges", line, refusal(verdict, follower, target, cap)))
        report.refused_while_merging += 1
    report.batches += 1


async def in_transaction(conn: Conn, report: ImportReport, work: Callable[[], Awaitable[T]]) -> T:
    """Run one batch in its own transaction, again after a deadlock or serialisation
    failure (none is expected: the locks are taken in the service's orders; a distributed
    deadlock on Citus is the one to expect, found late)."""
    for attempt in range(MAX_ATTEMPTS):
        try:
            async with conn.transaction():
                return await work()
        except _RETRYABLE:
            report.retries += 1
            if attempt == MAX_ATTEMPTS - 1:
                raise
            await asyncio.sleep(random.uniform(0, 0.01 * 2**attempt))  # noqa: S311 - jitter
    raise AssertionError("unreachable")


async def write_accounts(
    conn: Conn, batches: list[int], report: ImportReport, options: ImportOptions
) -> None:
    """import_profiles into `accounts` (and a counter row each), ACCOUNT_BATCH at a time."""
    with progress_bar(options, "accounts", len(batches), "batch") as bar:
        for batch in batches:
            rows = await conn.fetch(_PROFILE_IDS, batch)
            lines = {r[0]: r[1] for r in rows}
            ids = list(lines)

            async def work(batch: int = batch, ids: list[str] = ids, busy: int = 0) -> list[str]:
                if busy < BUSY_TRIES:  # as an edge batch does (see LOCK_WAIT_MS)
                    await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_WAIT_MS}ms'")
                await conn.execute(_GATE, ids, None, True)
                # Under the gate no deletion of these ids can commit; one committed before
                # shows its tombstone.
                refused = [r[0] for r in await conn.fetch(_TOMBSTONED_AMONG, ids)]
                for statement in _WRITE_ACCOUNTS:
                    await conn.execute(statement, batch, refused)
                return refused

            for busy in itertools.count():
                try:
                    refused = await in_transaction(conn, report, functools.partial(work, busy=busy))
                    break
                except asyncpg.LockNotAvailableError:
                    report.retries += 1
                    await asyncio.sleep(min(BUSY_PAUSE * (busy + 1), 1.0))
            for user_id in refused:
                problem = f"account {user_id} {BEING_DELETED}"
                report.add_bad(BadRow("accounts", lines[user_id], problem))
                report.refused_while_merging += 1
            report.accounts_written += len(ids) - len(refused)
            bar.update(1)
    report.lap("write accounts")


# Every statement of a batch joins its rows with the live tables by their keys: index
# lookups (nested loops). Left to itself the planner may hash or sort a whole live table
# for a batch, which costs what the table costs, not what the batch does. No Memoize either:
# a batch names each edge once, so its cache never hits.
_BATCH_PLANS = """
SET enable_hashjoin = off; SET enable_mergejoin = off; SET enable_memoize = off;
SET plan_cache_mode = force_custom_plan
"""
_RESET_PLANS = """
RESET enable_hashjoin; RESET enable_mergejoin; RESET enable_memoize; RESET plan_cache_mode
"""
# And each batch's statements are planned for that batch (one PostgreSQL): a prepared
# statement without parameters keeps the plan made at its first run, when the live tables
# may have been empty (a nested loop over a sequential scan of `following` then, run per
# batch row once the table holds millions: batches got slower as the import went on). The
# batch table needs no ANALYZE for these plans (the original cost ~15% of each batch): a
# temporary table never analysed is estimated from its size, and a nested loop has it outside.
_REPLAN = "DISCARD PLANS"

# How long a batch waits for any one lock (the gate, a counter row, a key another
# transaction is inserting) before it gives all of its locks up and is tried again, smaller,
# after a pause (BUSY_PAUSE, growing with each try in a row): a batch holding many users'
# gates while it waits for one that a call holds would make every call on those users wait
# too. After BUSY_TRIES tries in a row it waits as long as it takes (so it always ends).
LOCK_WAIT_MS = 50
# An edge batch whose statements run past STATEMENT_BUDGETS times the time budget, counted
# from its first statement (each statement gets what is left of it as its statement_timeout),
# is cancelled and tried again smaller, in the same way: it bounds how long the calls on the
# batch's users wait when a batch runs far slower than the last one did.
STATEMENT_BUDGETS = 2
# Less than this left of a batch's time, and it gives up before its next statement: a
# statement_timeout of a few ms also holds for the ROLLBACK (see _end_failed_transaction).
MIN_STATEMENT_MS = 10
BUSY_PAUSE = 0.02
BUSY_TRIES = 20

_OUTCOME = {asyncpg.LockNotAvailableError: "busy", asyncpg.QueryCanceledError: "slow"}

MAX_BATCH_EDGES = 200_000  # whatever the time budget allows
# Exclusive advisory locks per batch (one per follower): PostgreSQL's lock table is shared
# by every session (max_locks_per_transaction x max_connections entries, 6,400+ by default).
MAX_BATCH_FOLLOWERS = 2_000
FIRST_BATCH_EDGES = 2_500  # before any batch has been timed


# The least a batch is asked to hold (it always takes at least one of the plan's chunks):
# on a starved CPU one chunk (~500 edges, up to ~100 followers and ~500 other users to
# lock) ran past the batch's time limit again and again (bench-ops at load 13: half the
# tries were cancelled, their work lost), so a slowed batch shrinks below a chunk's size
# and _take gives it the smallest chunk it can.
MIN_BATCH_EDGES = 50


def next_batch_edges(size: int, edges: int, seconds: float, budget: float) -> int:
    """The next batch's size: what the last one's rate (`edges` in `seconds`) writes in
    `budget`, at most twice `size`, at least MIN_BATCH_EDGES, at most MAX_BATCH_EDGES."""
    want = edges * budget / seconds if seconds > 0 else 2 * size
    return int(max(MIN_BATCH_EDGES, min(2 * size, want, MAX_BATCH_EDGES)))


def _take(chunks: list[Batch], start: int, size: int) -> int:
    """The end of the run of chunks from `start` that makes the next batch: at least one,
    then as many as fit in `size` edges and MAX_BATCH_FOLLOWERS followers."""
    end = start + 1
    edges, followers = chunks[start].edges, chunks[start].followers
    while end < len(chunks):
        nxt = chunks[end]
        if edges + nxt.edges > size or followers + nxt.followers > MAX_BATCH_FOLLOWERS:
            break
        edges += nxt.edges
        followers += nxt.followers
        end += 1
    return end


async def write_edges(
    conn: Conn, staging: Staging, chunks: list[Batch], report: ImportReport, options: ImportOptions
) -> None:
    """import_new into both edge tables, with mutual state and counts, batch by batch, each
    batch sized to options.batch_seconds (see the module's doc)."""
    await conn.execute(_BATCH_PLANS)
    total = sum(b.edges for b in chunks)
    size = FIRST_BATCH_EDGES
    start = number = 0
    busy = 0  # tries in a row that found a lock held
    log = BatchLog(options.batch_log)
    with progress_bar(options, "merging", total, "edge") as bar:
        while start < len(chunks):
            end = _take(chunks, start, size)
            batch = Batch.join(chunks[start:end])
            began = time.perf_counter()
            at = time.monotonic()
            try:
                await _write_batch(conn, staging, number, batch, report, options, busy)
            except (asyncpg.LockNotAvailableError, asyncpg.QueryCanceledError) as exc:
                log.write(at, batch, _OUTCOME.get(type(exc), "?"), 0.0)
                await _end_failed_transaction(conn)
                # A call holds one of the batch's users: the batch gave up its locks after
                # LOCK_WAIT rather than hold the others while it waits (a convoy of the
                # calls on them); or one statement ran past its limit (a checkpoint, a
                # burst of evictions, a starved CPU) while every call on the batch's users
                # waited: again smaller, after a pause in which that call ends.
                busy += 1
                report.retries += 1
                size = max(MIN_BATCH_EDGES, batch.edges // 2)
                await asyncio.sleep(min(BUSY_PAUSE * busy, 1.0))
                continue
            busy = 0
            seconds = time.perf_counter() - began
            pause = pause_after(seconds, options.pause_ratio)
            log.write(at, batch, "ok", pause)
            report.largest_batch = max(report.largest_batch, batch.edges)
            report.longest_batch = max(report.longest_batch, seconds)
            size = next_batch_edges(size, batch.edges, seconds, options.batch_seconds)
            bar.update(batch.edges)
            start, number = end, number + 1
            if pause > 0 and start < len(chunks):
                await asyncio.sleep(pause)
    log.close()
    await conn.execute(_RESET_PLANS)
    report.lap("write edges")


async def _write_batch(
    conn: Conn,
    staging: Staging,
    number: int,
    batch: Batch,
    report: ImportReport,
    options: ImportOptions,
    busy: int = 0,
) -> None:
    if not staging.citus:
        await conn.execute(_REPLAN)
    acts: dict[str, bool] = {}
    new_edges: dict[str, int] = {}
    for user_id, is_follower, n in await conn.fetch(_BATCH_USERS, batch.lo, batch.hi):
        acts[user_id] = acts.get(user_id, False) or is_follower
        if is_follower:
            new_edges[user_id] = n
    ordered = sorted(acts)
    followers = [u for u in ordered if acts[u]]
    shard = number % DELTA_SHARDS

    async def work() -> tuple[int, list[asyncpg.Record]]:
        clock: _BatchClock | None = None
        if busy < BUSY_TRIES:
            # (and its statements together at most twice the budget: see STATEMENT_BUDGETS)
            limit = max(int(options.batch_seconds * STATEMENT_BUDGETS * 1000), LOCK_WAIT_MS)
            clock = _BatchClock(conn, limit)
            await conn.execute(
                f"SET LOCAL lock_timeout = '{LOCK_WAIT_MS}ms';"
                f" SET LOCAL statement_timeout = '{limit}ms'"
            )
        await staging.clear(conn)
        await conn.execute(_GATE, followers, None, True)
        following = await _lock_rows(conn, staging, ordered, acts)
        gone = [u for u in ordered if following.get(u, 0) is None]
        cap = options.max_following
        await _left(clock)
        if any((following.get(u) or 0) + n > cap for u, n in new_edges.items()):
            await conn.execute(VERDICTS, batch.lo, batch.hi, cap, gone)
        else:
            await conn.execute(VERDICTS_UNCAPPED, batch.lo, batch.hi, gone)
        await staging.fill(conn, "import_batch_rev")
        await _left(clock)
        await conn.execute(INSERT_FOLLOWERS)
        if not staging.citus:
            await _left(clock)
            counted = await conn.fetch(INSERT_FOLLOWING_COUNTED)
            await _left(clock)
            await conn.execute(THEIR_MUTUAL_COUNTED, shard)
            return sum(r[0] for r in counted), await conn.fetch(NOT_ADDED)
        added = await conn.fetch(_INSERT_FOLLOWING)
        their_mutual = Counter(r[0] for r in await conn.fetch(_THEIR_MUTUAL))
        per_target = await conn.fetch(_PER_TARGET)
        own_added = Counter(r[0] for r in added)
        own_mutual = Counter(r[0] for r in added if r[1])
        own = sorted((u, n, own_mutual[u]) for u, n in own_added.items())
        theirs = sorted((r[0], r[1], their_mutual[r[0]]) for r in per_target)
        await _add_counts(conn, own, theirs, shard)
        return len(added), await conn.fetch(NOT_ADDED)

    added, not_added = await in_transaction(conn, report, work)
    record_batch(report, added, not_added, options.max_following)


class _BatchClock:
    """What is left of an edge batch's time (limit_ms from its start), given to each of its
    statements as their statement_timeout."""

    def __init__(self, conn: Conn, limit_ms: int) -> None:
        self.conn = conn
        self.ends = time.monotonic() + limit_ms / 1000

    async def give_the_rest(self) -> None:
        left_ms = int((self.ends - time.monotonic()) * 1000)
        if left_ms < MIN_STATEMENT_MS:  # as a statement past its statement_timeout would be
            raise asyncpg.QueryCanceledError("the batch ran past its time budget")
        await self.conn.execute(f"SET LOCAL statement_timeout = '{left_ms}ms'")


async def _end_failed_transaction(conn: Conn) -> None:
    """Roll back what a given-up batch left open. The transaction's statement_timeout (what
    was left of the batch's time, SET LOCAL) still holds for the ROLLBACK that asyncpg sends
    on the way out, and on a starved CPU that ROLLBACK was cancelled too, leaving the
    connection in a failed transaction (bench-ops at load 13: the next try's first
    statement failed, "current transaction is aborted", and the import exited 1)."""
    for _ in range(MAX_ATTEMPTS):
        if not conn.is_in_transaction():
            return
        with contextlib.suppress(asyncpg.QueryCanceledError):
            await conn.execute("ROLLBACK")
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")  # the last try raises what it meets


async def _left(clock: _BatchClock | None) -> None:
    """Bound the next statement by what is left of the batch's time (no bound: None)."""
    if clock is not None:
        await clock.give_the_rest()


async def _lock_rows(
    conn: Conn, staging: Staging, ordered: list[str], acts: dict[str, bool]
) -> dict[str, int | None]:
    """Lock the batch's counter rows in id order: each follower's following count, None
    for an id whose row is gone (its account was deleted); targets found are left out."""
    if not staging.citus:
        rows = await conn.fetch(_LOCK_ROWS, ordered, [acts[u] for u in ordered])
        return {r[0]: r[1] for r in rows}
    found: dict[str, int | None] = {}
    for mode, run in itertools.groupby(ordered, key=acts.__getitem__):
        ids = list(run)
        found.update(
            (r[0], r[1]) for r in await conn.fetchmany(_LOCK_ONE[mode], [(u,) for u in ids])
        )
    return {u: found.get(u) for u in ordered if acts[u] or u not in found}


async def _add_counts(
    conn: Conn,
    own: list[tuple[str, int, int]],
    theirs: list[tuple[str, int, int]],
    shard: int,
) -> None:
    """Citus: the batch's increments, one owner per statement: followers' own rows, then
    the targets' delta rows in (shard, id) order, the order every call writes delta rows
    in on Citus (server.store._by_shard): two writers never wait for each other's in a
    circle."""
    if own:
        await conn.executemany(_ADD_OWN_ONE, own)
    if theirs:
        shard_of = {r[0]: r[1] for r in await conn.fetch(_SHARDS_OF, [t[0] for t in theirs])}
        ordered = sorted(theirs, key=lambda t: (shard_of[t[0]], t[0]))
        await conn.executemany(_ADD_DELTA_ONE, [(*t, shard) for t in ordered])
