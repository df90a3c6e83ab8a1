"""All SQL: one transaction per call, every statement scoped by the user that owns its rows.

Lock discipline (what keeps counts, both copies of each edge and mutual state exact under
concurrency): a transaction touches rows owned by user U only while it holds a lock on U's
`follow_counts` row. A call locks the acting user's row FOR UPDATE (which also serialises
the following cap) and the rows of the users it acts on FOR SHARE, all in one global order
(ids sorted), one statement per user. So A following B while B follows A waits instead of
deadlocking, on one PostgreSQL and on Citus alike. A share lock waits for U's own
transaction in flight and keeps U's next one out until we commit, yet many followers of one
user hold it at once: following a celebrity is not serialised.

So a follower's changes to U's counts cannot go to U's counter row (that needs U's row
exclusively). They go to `follow_count_deltas`, one row per (U, shard of the follower), and
U's counts are the counter row plus the sum of U's delta rows. Delta rows are written one
statement per owner, in id order, so two followers sharing a delta shard never lock them in
opposite orders.

Distribution (Citus, see server.migrations): every statement is either scoped to one owner
(`user_id = $1`: a single-shard router query) or names its owners with `user_id = ANY($n)`
or one VALUES row each, which Citus prunes to those owners' shards. None joins on another
owner's id, none writes through a CTE and none is an INSERT ... SELECT (each of those is
refused or pulled to the coordinator on Citus). tests/test_citus_plans.py EXPLAINs every
statement here on a real cluster.

Inputs arrive validated (see server.core); this module decides nothing about ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import secrets
import time
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, TypeVar

import asyncpg

from server.database import has_citus
from server.deadline import call_deadline, remaining
from server.errors import FollowType, ItemCode, Reason, ServiceError
from server.origin import call_origin
from server.outbox import FOLLOWED, UNFOLLOWED

T = TypeVar("T")
if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    Conn = PoolConnectionProxy[asyncpg.Record]

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MAX_ATTEMPTS = 8
DELTA_SHARDS = 16
DEFAULT_ACQUIRE_TIMEOUT = 2.0  # seconds a call may wait for a free database connection
_RETRYABLE = (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)


def to_micros(at: datetime | int) -> int:
    """Unix microseconds of a timestamp read from the database: already an int on the
    service's pool (server.database.use_int_timestamps), a datetime on a plain connection."""
    if isinstance(at, int):
        return at
    return (at - EPOCH) // timedelta(microseconds=1)


def from_micros(at_us: int) -> datetime:
    return EPOCH + timedelta(microseconds=at_us)


@dataclass(frozen=True, slots=True)
class Counts:
    """A user's stored counts (counter row plus delta rows), never computed with COUNT(*)."""

    followers: int
    following: int
    mutual: int


@dataclass(frozen=True, slots=True)
class Profile:
    """The account fields a List entry carries."""

    nick: str | None
    face_url: str | None
    profile_sequence: int


@dataclass(frozen=True, slots=True)
class PageRow:
    """One keyset-page row: the listed user and the time (µs) the page is ordered by."""

    user_id: str
    at_us: int


@dataclass(frozen=True, slots=True)
class AccountInput:
    """An account to create or update; None leaves a field as it is."""

    user_id: str
    nick: str | None
    face_url: str | None


# The time is read only once the lock is held (outside the locking subquery): a select list
# beside FOR UPDATE is computed before the wait, so a call queued behind another holder of
# the row would stamp its follows with the time it started waiting, earlier than follows it
# then sees (mutual_since older than the follow that made the pair mutual).
_LOCK_OWNER = """
SELECT following, clock_timestamp() AS now
FROM (SELECT following FROM follow_counts WHERE user_id = $1 FOR UPDATE) AS owner
"""

# The acting user's own rows about the targets (one owner: one shard on Citus), read in a
# statement of its own after the locks: a statement that waits for a row lock still reads
# everything else with the snapshot it started with, which would miss what the previous
# holder of the lock just committed. kind 1: followed (mutual or not), 2: a fan.
_OWN_EDGES_AMONG = """
SELECT 1 AS kind, target_id AS id, mutual_since IS NOT NULL AS mutual FROM following
WHERE user_id = $1 AND target_id = ANY($2::text[])
UNION ALL
SELECT 2, follower_id, false FROM followers
WHERE user_id = $1 AND follower_id = ANY($2::text[])
"""

# Unfollow's read of the acting user's edges to the targets, each with whether the target is
# being deleted (its edges are the background cleanup's to remove). account_tombstones is a
# reference table: the join stays on the acting user's shard. Read under the targets' gates
# (shared): no deletion of a target can commit or end meanwhile, so unfollow takes no lock on
# the targets' counter rows, which it does not write (their counts go to delta rows).
_OWN_FOLLOWS_AMONG = """
SELECT f.target_id, f.mutual_since IS NOT NULL AS mutual,
       EXISTS (SELECT 1 FROM account_tombstones x WHERE x.user_id = f.target_id) AS deleting
FROM following f
WHERE f.user_id = $1 AND f.target_id = ANY($2::text[])
"""

# Before any row lock, advisory locks in the same id order, in one statement (on Citus it
# runs on the coordinator alone, where every session of the service is). Row locks alone let
# a stream of followers starve a celebrity's own call: a share request is granted at once
# while other share locks are held, even past an exclusive request already waiting.
# PostgreSQL's lock manager queues heavyweight locks fairly (a new request waits behind a
# waiting one it conflicts with), so a call that takes its own advisory lock exclusively
# waits only for the followers already in. Followers take theirs shared; the acting user
# takes its own exclusively, and that also orders its events (see _lock_users).
_GATE = """
SELECT CASE WHEN $3 OR s.id = $2 THEN pg_advisory_xact_lock(hashtextextended(s.id, 0))
            ELSE pg_advisory_xact_lock_shared(hashtextextended(s.id, 0)) END::text
FROM (SELECT id FROM unnest($1::text[]) AS u(id) ORDER BY id OFFSET 0) AS s
"""
# ($1 ids, $2 the one id locked exclusively or NULL, $3 true: all of them exclusively.)
# Scalars, not a bool[]: asyncpg looks an array type up once per connection, and on a Citus
# coordinator that lookup took 0.67 s (test-citus).

# One owner per statement (Citus locks one shard per statement); asyncpg's fetchmany sends
# them all in one round trip and answers with the users that exist.
_SHARE_LOCK = "SELECT user_id FROM follow_counts WHERE user_id = $1 FOR SHARE"

# Citus: the gate (_GATE, the same locks in the same order) also answers each user's shard
# (a lookup in the coordinator's metadata cache), so that a call's statements about other
# users go one per shard rather than one per user (_by_shard): a statement costs the
# coordinator about the same for one row as for several of one shard.
_GATE_SHARDS = _GATE.replace(
    "SELECT CASE", "SELECT s.id, get_shard_id_for_distribution_column('follow_counts', s.id), CASE"
).replace("END::text", "END::text AS locked")
# Citus: each user's shard (the coordinator's metadata cache; no table read).
_SHARDS_OF = """
SELECT s.id, get_shard_id_for_distribution_column('follow_counts', s.id)
FROM unnest($1::text[]) AS s(id)
"""
# The users of one shard (Citus refuses FOR SHARE over several shards).
_SHARE_LOCKS = "SELECT user_id FROM follow_counts WHERE user_id = ANY($1::text[]) FOR SHARE"

# Citus: the other side of each edge one shard per statement ($1 the users of one shard). A
# multi-shard UPDATE or DELETE makes Citus lock every shard it touches against other
# multi-shard modifications until commit, which serialises concurrent calls (measured:
# unfollow20 at 0.03 of one PostgreSQL, 11 of 16 coordinator backends waiting on those locks).
_SET_THEIR_MUTUALS = (
    "UPDATE following SET mutual_since = $3 WHERE user_id = ANY($1::text[]) AND target_id = $2"
)

_DELETE_FOLLOWING = "DELETE FROM following WHERE user_id = $1 AND target_id = ANY($2::text[])"
_DELETE_THEIR_FOLLOWERS = (
    "DELETE FROM followers WHERE user_id = ANY($2::text[]) AND follower_id = $1"
)

# Citus, unfollow: a writing CTE whose statements are all DELETE or UPDATE of one shard's
# rows is one router task (an INSERT in it, or beside it, is planned separately and its
# rows pass through the coordinator: not used; so is a statement of it that prunes to no
# shard, an empty array). The acting user's edges and its own counts ($3 following, $4
# mutual: negative) in one statement; on each shard of the targets, their copies of the
# edges and their mutual state in one (a target's edge back to the acting user is mutual
# exactly when its mutual_since is set).
_UNFOLLOW_OWN = """
WITH gone AS (DELETE FROM following WHERE user_id = $1 AND target_id = ANY($2::text[]))
UPDATE follow_counts SET following = following + $3, mutual = mutual + $4 WHERE user_id = $1
"""
_UNFOLLOW_THEIRS = """
WITH gone AS (DELETE FROM followers WHERE user_id = ANY($1::text[]) AND follower_id = $2)
UPDATE following SET mutual_since = NULL
WHERE user_id = ANY($1::text[]) AND target_id = $2 AND mutual_since IS NOT NULL
"""

# One PostgreSQL: each call's writes in one statement (one round trip). The delta rows are
# written in id order (ORDER BY), so two followers sharing a delta shard never lock them in
# opposite orders. Citus pulls a writing CTE to the coordinator, so there the same writes
# are sent one owner-scoped statement at a time instead (_write_follows_per_owner).
_WRITE_FOLLOWS = """
WITH new_following AS (
    INSERT INTO following (user_id, target_id, followed_at, mutual_since)
    SELECT $1, t.id, $3, CASE WHEN t.id = ANY($4::text[]) THEN $3::timestamptz END
    FROM unnest($2::text[]) AS t(id)
), new_followers AS (
    INSERT INTO followers (user_id, follower_id, followed_at)
    SELECT t.id, $1, $3 FROM unnest($2::text[]) AS t(id)
), their_mutual AS (
    UPDATE following SET mutual_since = $3 WHERE user_id = ANY($4::text[]) AND target_id = $1
), their_counts AS (
    INSERT INTO follow_count_deltas AS d (user_id, shard, followers, mutual)
    SELECT t.id, $5, 1, (t.id = ANY($4::text[]))::int
    FROM unnest($2::text[]) AS t(id) ORDER BY t.id
    ON CONFLICT (user_id, shard) DO UPDATE
    SET followers = d.followers + EXCLUDED.followers, mutual = d.mutual + EXCLUDED.mutual
), event AS (
    INSERT INTO follow_events (user_id, kind, others, mutual, at, client_ip, platform)
    VALUES ($1, 1, $2, $4, $3, $6, $7)
)
UPDATE follow_counts
SET following = following + cardinality($2::text[]), mutual = mutual + cardinality($4::text[])
WHERE user_id = $1
"""

_WRITE_UNFOLLOWS = """
WITH gone_following AS (
    DELETE FROM following WHERE user_id = $1 AND target_id = ANY($2::text[])
), gone_followers AS (
    DELETE FROM followers WHERE user_id = ANY($2::text[]) AND follower_id = $1
), their_mutual AS (
    UPDATE following SET mutual_since = NULL WHERE user_id = ANY($3::text[]) AND target_id = $1
), their_counts AS (
    INSERT INTO follow_count_deltas AS d (user_id, shard, followers, mutual)
    SELECT t.id, $4, -1, -(t.id = ANY($3::text[]))::int
    FROM unnest($2::text[]) AS t(id) ORDER BY t.id
    ON CONFLICT (user_id, shard) DO UPDATE
    SET followers = d.followers + EXCLUDED.followers, mutual = d.mutual + EXCLUDED.mutual
), event AS (
    INSERT INTO follow_events (user_id, kind, others, mutual, at, client_ip, platform)
    VALUES ($1, 2, $2, $3, $5, $6, $7)
)
UPDATE follow_counts
SET following = following - cardinality($2::text[]), mutual = mutual - cardinality($3::text[])
WHERE user_id = $1
"""

# Statements sent only to one PostgreSQL, never to Citus (see Store._distributed); the
# Citus plan test skips them.
SINGLE_NODE_ONLY = frozenset(
    {"_WRITE_FOLLOWS", "_WRITE_UNFOLLOWS", "_TRY_LOCK_FANS", "_TRY_SHARE_LOCKS"}
)

# One owner per statement, in id order (see the module docstring).
_ADD_DELTA = """
INSERT INTO follow_count_deltas AS d (user_id, shard, followers, mutual)
VALUES ($1, $2, $3, $4)
ON CONFLICT (user_id, shard) DO UPDATE
SET followers = d.followers + EXCLUDED.followers, mutual = d.mutual + EXCLUDED.mutual
"""

# A call's change event (the outbox, see server.migrations, version 4): one row, on the acting
# user's shard, in the call's transaction.
_WRITE_EVENT = """
INSERT INTO follow_events (user_id, kind, others, mutual, at, client_ip, platform)
VALUES ($1, $2, $3, $4, $5, $6, $7)
"""
_WRITE_DELETION_EVENT = """
INSERT INTO follow_events (user_id, kind, at, client_ip, platform)
VALUES ($1, 3, clock_timestamp(), $2, $3)
"""

_ADD_OWN_COUNTS = """
UPDATE follow_counts SET following = following + $2, mutual = mutual + $3 WHERE user_id = $1
"""

# The FollowType number itself: 2 if the user follows the target, plus 1 if it follows back;
# 0 for an account being deleted (its edges go in the background; account_tombstones is a
# reference table, so the join stays on the asking user's shard on Citus).
_CHECK = """
SELECT (SELECT true FROM follow_counts WHERE user_id = $1) AS owner_known,
       t.id,
       CASE WHEN EXISTS (SELECT 1 FROM account_tombstones x WHERE x.user_id = t.id) THEN 0
       ELSE 2 * EXISTS (SELECT 1 FROM following f WHERE f.user_id = $1 AND f.target_id = t.id)::int
            + EXISTS (SELECT 1 FROM followers r WHERE r.user_id = $1 AND r.follower_id = t.id)::int
       END
FROM unnest($2::text[]) AS t(id)
"""

# Counts: the counter row plus the delta rows, both read by distribution column only (a
# co-located join Citus prunes to the asked users' shards; the follow_totals view is the
# same sum for ad-hoc queries, but Citus cannot prune through its lateral subquery).
_COUNTS = """
SELECT c.user_id, c.following,
       c.followers + coalesce(d.followers, 0) AS followers,
       c.mutual + coalesce(d.mutual, 0) AS mutual
FROM follow_counts c
LEFT JOIN (SELECT user_id, sum(followers)::bigint AS followers, sum(mutual)::bigint AS mutual
           FROM follow_count_deltas WHERE user_id = ANY($1::text[]) GROUP BY user_id) d
       ON d.user_id = c.user_id
WHERE c.user_id = ANY($1::text[])
"""

# Citus, several users: the counter rows and the delta rows as they are, one UNION ALL that
# Citus pushes down as one task per shard of the users (both tables are read by
# distribution column, and the users are named in each branch, or Citus does not prune);
# Store.counts sums them (a delta row is told by its NULL following). The cheapest form for
# the workers, which parse and plan each task's text anew: on 4 shards, coordinator +
# workers CPU per GetInfo(20) 4.3 ms, against 5.2 for the delta rows summed per counter row
# by a correlated subquery and 4.6 for _COUNTS' join with an aggregate (an ad-hoc
# microbench of the three on one 3-node cluster with the bench's data, 3 x 500 calls each,
# interleaved, medians); in the bench's A/B on one cluster (tests.bench.citus, a checkout
# variant, 3 rounds) GetInfo(20) 281 / 354 / 227 calls/s against 263 / 181 / 120, workers'
# CPU 2.4 ms per call against 4.9. One user keeps _COUNTS (one shard either way).
_COUNT_ROWS = """
SELECT * FROM (
    SELECT user_id, following, followers, mutual FROM follow_counts
    WHERE user_id = ANY($1::text[])
    UNION ALL
    SELECT user_id, NULL, followers, mutual FROM follow_count_deltas
    WHERE user_id = ANY($1::text[])
) AS rows
"""

_PROFILES = """
SELECT user_id, nick, face_url, profile_sequence FROM accounts WHERE user_id = ANY($1::text[])
"""

# Keyset pages: (time, id) descending; a row comparison is an index range, so a deep page
# costs what the first page costs.
_PAGES: dict[FollowType, tuple[str, str]] = {
    FollowType.FAN: (
        """SELECT follower_id AS id, followed_at AS at FROM followers WHERE user_id = $1
           ORDER BY followed_at DESC, follower_id DESC LIMIT $2""",
        """SELECT follower_id AS id, followed_at AS at FROM followers WHERE user_id = $1
             AND (followed_at, follower_id) < ($3, $4)
           ORDER BY followed_at DESC, follower_id DESC LIMIT $2""",
    ),
    FollowType.FOLLOWING: (
        """SELECT target_id AS id, followed_at AS at FROM following WHERE user_id = $1
           ORDER BY followed_at DESC, target_id DESC LIMIT $2""",
        """SELECT target_id AS id, followed_at AS at FROM following WHERE user_id = $1
             AND (followed_at, target_id) < ($3, $4)
           ORDER BY followed_at DESC, target_id DESC LIMIT $2""",
    ),
    FollowType.MUTUAL: (
        """SELECT target_id AS id, mutual_since AS at FROM following
           WHERE user_id = $1 AND mutual_since IS NOT NULL
           ORDER BY mutual_since DESC, target_id DESC LIMIT $2""",
        """SELECT target_id AS id, mutual_since AS at FROM following
           WHERE user_id = $1 AND mutual_since IS NOT NULL
             AND (mutual_since, target_id) < ($3, $4)
           ORDER BY mutual_since DESC, target_id DESC LIMIT $2""",
    ),
}

_ACCOUNT_UPSERT_TAIL = """
ON CONFLICT (user_id) DO UPDATE SET
    nick = COALESCE(EXCLUDED.nick, a.nick),
    face_url = COALESCE(EXCLUDED.face_url, a.face_url),
    profile_sequence = a.profile_sequence + (
        COALESCE(EXCLUDED.nick, a.nick) IS DISTINCT FROM a.nick
        OR COALESCE(EXCLUDED.face_url, a.face_url) IS DISTINCT FROM a.face_url)::int
"""

_LOCK_FOR_DELETE = "SELECT user_id FROM follow_counts WHERE user_id = $1 FOR UPDATE"

_TOMBSTONE = "INSERT INTO account_tombstones (user_id) VALUES ($1) ON CONFLICT DO NOTHING"
_TOMBSTONED_AMONG = "SELECT user_id FROM account_tombstones WHERE user_id = ANY($1::text[])"
_PENDING_DELETIONS = "SELECT user_id FROM account_tombstones ORDER BY deleted_at, user_id LIMIT $1"
_LOCK_TOMBSTONE = "SELECT 1 FROM account_tombstones WHERE user_id = $1 FOR UPDATE"
_END_DELETION = "DELETE FROM account_tombstones WHERE user_id = $1"
# What goes at once when an account is deleted, one owner each: its counters and profile
# (so it is unknown to every call from then on). Its edges go in batches (clean_up_deletion).
_DELETE_OWN = tuple(
    f"DELETE FROM {table} WHERE user_id = $1"  # noqa: S608 - table names are constants
    for table in ("follow_count_deltas", "follow_counts", "accounts")
)

# The background cleanup, one bounded batch per transaction: first the deleted account's
# fans (each loses one following, and a mutual if the account followed them back), then
# whom it followed (each loses one follower, counted in its delta rows). Each reads the next
# ids after a cursor (keyset, so a batch never rescans the index entries of the rows the
# batches before it deleted), '' being before every id.
_FANS_BATCH = """
SELECT follower_id FROM followers WHERE user_id = $1 AND follower_id > $2
ORDER BY follower_id LIMIT $3
"""
_FOLLOWEES_BATCH = """
SELECT target_id FROM following WHERE user_id = $1 AND target_id > $2
ORDER BY target_id LIMIT $3
"""
# The gate (_GATE's keys) of each id that is free now, exclusively ($2) or shared, never
# waiting: the ids it got. A batch that waited for one busy user while holding the gates of
# hundreds would make every call needing one of those wait as long (and, the lock queue
# being fair, every newcomer to the busy user's gate behind it too).
_TRY_GATE = """
SELECT s.id FROM (SELECT id FROM unnest($1::text[]) AS u(id) ORDER BY id OFFSET 0) AS s
WHERE CASE WHEN $2 THEN pg_try_advisory_xact_lock(hashtextextended(s.id, 0))
           ELSE pg_try_advisory_xact_lock_shared(hashtextextended(s.id, 0)) END
"""
# Counter rows under a gate the batch holds, skipping any locked all the same (a writer that
# takes no gate on it: the importer's merge shares the rows of the users it adds followers
# to); _EXISTING_AMONG then tells a skipped row from a gone one (a deleted fan). One
# statement for the batch on one PostgreSQL (500 single-row statements took half of a
# batch's time); one per owner on Citus, which locks rows only in single-shard queries.
_TRY_LOCK_FANS = """
SELECT user_id FROM follow_counts WHERE user_id = ANY($1::text[]) ORDER BY user_id
FOR UPDATE SKIP LOCKED
"""
_TRY_SHARE_LOCKS = """
SELECT user_id FROM follow_counts WHERE user_id = ANY($1::text[]) ORDER BY user_id
FOR SHARE SKIP LOCKED
"""
_TRY_LOCK_FAN = "SELECT user_id FROM follow_counts WHERE user_id = $1 FOR UPDATE SKIP LOCKED"
_TRY_SHARE_LOCK = "SELECT user_id FROM follow_counts WHERE user_id = $1 FOR SHARE SKIP LOCKED"
_EXISTING_AMONG = "SELECT user_id FROM follow_counts WHERE user_id = ANY($1::text[])"
_FOLLOWED_BY = "SELECT target_id FROM following WHERE user_id = $1 AND target_id = ANY($2)"
_UNCOUNT_FOLLOWING = (
    "UPDATE follow_counts SET following = following - 1 WHERE user_id = ANY($1::text[])"
)
_UNCOUNT_MUTUAL = "UPDATE follow_counts SET mutual = mutual - 1 WHERE user_id = ANY($1::text[])"
_DELETE_THEIR_FOLLOWING = "DELETE FROM following WHERE user_id = ANY($2::text[]) AND target_id = $1"
_DELETE_OWN_FOLLOWERS = "DELETE FROM followers WHERE user_id = $1 AND follower_id = ANY($2::text[])"
# A cleanup batch's transaction: committed without waiting for the WAL flush (see
# clean_up_deletion), and every statement planned for its parameters: a generic plan of
# _DELETE_OWN_FOLLOWERS scans all of a celebrity's fans in followers_by_time (the user id is
# its only usable key there) for every batch of 500 (measured: 12 ms a batch at 40,000 fans,
# growing with the fans), where a custom plan reads the primary key for the 500 (1 ms).
_CLEANUP_SETTINGS = (
    "SET LOCAL synchronous_commit = off; SET LOCAL plan_cache_mode = force_custom_plan"
)
# Edges per cleanup transaction: sized to a time budget unless the caller fixes it. A batch
# holds its users' gates from its first lock to its commit, so a call needing one of them
# may wait up to that long; the size is what the last batch's rate removes in the budget,
# at most twice the last size (growth is gradual, a slow batch shrinks the next at once).
DELETION_BATCH = 500  # the first batch's size
# 0.1 s: worst other call 530 ms during a 400,000-fan cleanup at load 12 (4,270 fans/s);
# 0.05 s: 401 ms (2,340 fans/s) (tests/bench/ops.py, one run each).
DELETION_BATCH_SECONDS = 0.05
MIN_DELETION_BATCH, MAX_DELETION_BATCH = 20, 2000


@functools.cache
def _values(head: str, row: str, rows: int, fixed: int, tail: str = "") -> str:
    """`head VALUES row, row, ... tail` for `rows` rows: a plain multi-row INSERT, which
    Citus routes row by row to the owners' shards (an INSERT ... SELECT over unnest() is
    pulled to the coordinator instead). In `row`, {0}, {1}, ... are the row's own
    parameters; $1..$`fixed` are shared by every row. One text per row count, each prepared
    once per connection."""
    width = row.count("{")
    parts = []
    for i in range(rows):
        first = fixed + 1 + i * width
        parts.append("(" + row.format(*(f"${first + k}" for k in range(width))) + ")")
    return f"{head} VALUES {', '.join(parts)}{tail}"


def _insert_following(rows: int) -> str:
    return _values(
        "INSERT INTO following (user_id, target_id, followed_at, mutual_since)",
        "$1, {0}, $2, {1}::timestamptz",
        rows,
        2,
    )


def _insert_followers(rows: int) -> str:
    return _values(
        "INSERT INTO followers (user_id, follower_id, followed_at)", "{0}, $1, $2", rows, 2
    )


def _add_deltas(rows: int) -> str:
    """Delta rows of one acting user's shard ($1) for several users, each by $2 followers
    and its own mutual change: the Citus form of _WRITE_FOLLOWS' their_counts, one
    statement per shard of the targets."""
    return _values(
        "INSERT INTO follow_count_deltas AS d (user_id, shard, followers, mutual)",
        "{0}, $1, $2, {1}",
        rows,
        2,
        " ON CONFLICT (user_id, shard) DO UPDATE"
        " SET followers = d.followers + EXCLUDED.followers, mutual = d.mutual + EXCLUDED.mutual",
    )


def _insert_counters(rows: int) -> str:
    return _values("INSERT INTO follow_counts (user_id)", "{0}", rows, 0, " ON CONFLICT DO NOTHING")


def _upsert_accounts(rows: int) -> str:
    return _values(
        "INSERT INTO accounts AS a (user_id, nick, face_url)",
        "{0}, {1}, {2}",
        rows,
        0,
        _ACCOUNT_UPSERT_TAIL,
    )


class Store:
    """All SQL of the calls, over one asyncpg pool, with bounded waits and bounded retries."""

    def __init__(
        self, pool: asyncpg.Pool, acquire_timeout: float = DEFAULT_ACQUIRE_TIMEOUT
    ) -> None:
        self._pool = pool
        self._acquire_timeout = acquire_timeout
        # One slot per pooled connection: waiting for a slot is waiting for a connection,
        # bounded here, so it is told apart from the database failing to connect.
        self._slots = asyncio.Semaphore(pool.get_max_size())
        # Transactions retried, by error (DeadlockDetectedError, SerializationError): with
        # the one lock order there should be none; tests and metrics read it.
        self.retried: Counter[str] = Counter()
        self._citus: bool | None = None
        # Where each deleted account's cleanup goes on, and the next batch's size
        # (clean_up_deletion).
        self._sweeps: dict[str, _Sweep] = {}
        self._deletion_batch = DELETION_BATCH

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[Conn]:
        """A pooled connection, waited for at most the acquire timeout (OVERLOADED past it),
        and used at most until the call's deadline (DEADLINE_EXCEEDED past it). Cancelled
        mid-transaction, the connection is rolled back as the pool takes it back."""
        deadline = call_deadline.get()
        if deadline is None and not self._slots.locked():
            # The common case: a slot is free and the call has no deadline, so neither the
            # wait bound nor the deadline scope can fire; skip building them.
            await self._slots.acquire()  # free: returns without suspending
            try:
                async with self._pool.acquire() as conn:
                    yield conn
            finally:
                self._slots.release()
            return
        left = remaining(deadline)
        wait = self._acquire_timeout if left is None else min(self._acquire_timeout, left)
        try:
            # Not asyncio.wait_for: on Python 3.11 it can swallow the call's cancellation
            # when the slot arrives at the same moment, and the cancelled call then runs
            # on with no deadline (seen in test_faults' 1,000 cancelled calls).
            async with asyncio.timeout(wait):
                await self._slots.acquire()
        except TimeoutError:
            if left is not None and left <= self._acquire_timeout:
                raise _deadline_exceeded() from None
            raise ServiceError(
                Reason.OVERLOADED, "no database connection free in time; retry with backoff"
            ) from None
        try:
            async with asyncio.timeout_at(deadline) as scope, self._pool.acquire() as conn:
                yield conn
        except TimeoutError:
            if scope.expired():
                raise _deadline_exceeded() from None
            raise
        finally:
            self._slots.release()

    async def expire_connections(self) -> None:
        """Replace every pooled connection at its next use (after the database restarted,
        the old ones are dead)."""
        await self._pool.expire_connections()

    async def _transaction(self, work: Callable[[Conn], Awaitable[T]]) -> T:
        """Run `work` in one transaction, retrying deadlocks and serialisation failures."""
        for attempt in range(MAX_ATTEMPTS):
            try:
                async with self._connection() as conn, conn.transaction():
                    return await work(conn)
            except _RETRYABLE as exc:
                self.retried[type(exc).__name__] += 1
                if attempt == MAX_ATTEMPTS - 1:
                    break
                await asyncio.sleep(random.uniform(0, 0.002 * 2**attempt))  # noqa: S311 - jitter, not a secret
        raise ServiceError(
            Reason.CONTENTION, "too many concurrent changes to the same users; try again"
        )

    async def _distributed(self, conn: Conn) -> bool:
        """Whether the database is a Citus cluster (asked once): the writes of a call then
        go one owner-scoped statement at a time instead of one writing CTE."""
        if self._citus is None:
            self._citus = await has_citus(conn)
        return self._citus

    async def cursor_key(self) -> bytes:
        """The page-token key, made once per database so every server process shares it."""
        async with self._connection() as conn:
            await conn.execute(
                "INSERT INTO service_secrets (name, value) VALUES ('cursor', $1)"
                " ON CONFLICT DO NOTHING",
                secrets.token_bytes(32),
            )
            key: bytes = await conn.fetchval(
                "SELECT value FROM service_secrets WHERE name = 'cursor'"
            )
            return key

    async def ping(self) -> None:
        """Raise unless the database answers. With every connection busy it is answering
        someone, and a probe must not queue behind the calls it is judging."""
        if self._slots.locked():
            return
        async with self._connection() as conn:
            await conn.fetchval("SELECT 1")

    # -- follow / unfollow ---------------------------------------------------------------

    async def follow(
        self, user_id: str, targets: Sequence[str], max_following: int
    ) -> dict[str, ItemCode]:
        """Follow distinct, valid, non-self `targets` in order; the result code of each."""

        async def work(conn: Conn) -> dict[str, ItemCode]:
            citus = await self._distributed(conn)
            owner, known, shard_of = await _lock_users(conn, user_id, targets, citus)
            own = await conn.fetch(_OWN_EDGES_AMONG, user_id, list(targets))
            followed = {r[1] for r in own if r[0] == 1}
            fans = {r[1] for r in own if r[0] == 2}
            results: dict[str, ItemCode] = {}
            room = max_following - owner["following"]
            new: list[str] = []
            for target in targets:
                if target not in known:
                    results[target] = ItemCode.ACCOUNT_NOT_FOUND
                elif target in followed:
                    results[target] = ItemCode.OK
                elif len(new) < room:
                    new.append(target)
                else:
                    results[target] = ItemCode.FOLLOWING_LIMIT_REACHED
            if new:
                mutual = [t for t in new if t in fans]
                now = owner["now"]
                ip, platform = origin.client_ip, origin.platform
                if citus:
                    await _write_follows_per_owner(conn, user_id, new, now, fans, shard_of)
                    await conn.execute(
                        _WRITE_EVENT, user_id, FOLLOWED, new, mutual, now, ip, platform
                    )
                else:
                    shard = delta_shard(user_id)
                    await conn.execute(
                        _WRITE_FOLLOWS, user_id, new, now, mutual, shard, ip, platform
                    )
                results.update(dict.fromkeys(new, ItemCode.OK))
            return results

        origin = call_origin.get()
        return await self._transaction(work)

    async def unfollow(self, user_id: str, targets: Sequence[str]) -> None:
        """Stop following `targets` (distinct, valid); not following one is no error."""

        async def work(conn: Conn) -> None:
            citus = await self._distributed(conn)
            owner, _, shard_of = await _lock_users(conn, user_id, targets, citus, share=False)
            own = await conn.fetch(_OWN_FOLLOWS_AMONG, user_id, list(targets))
            # An edge to an account being deleted is the background cleanup's to remove.
            gone = sorted(r[0] for r in own if not r[2])
            if not gone:
                return
            mutual = sorted(r[0] for r in own if r[1] and not r[2])
            now, ip, platform = owner["now"], origin.client_ip, origin.platform
            if not citus:
                shard = delta_shard(user_id)
                await conn.execute(
                    _WRITE_UNFOLLOWS, user_id, gone, mutual, shard, now, ip, platform
                )
                return
            await conn.execute(_UNFOLLOW_OWN, user_id, gone, -len(gone), -len(mutual))
            await conn.executemany(
                _UNFOLLOW_THEIRS, [(g, user_id) for g in _by_shard(gone, shard_of)]
            )
            await _add_their_deltas(conn, user_id, gone, -1, set(mutual), shard_of)
            await conn.execute(_WRITE_EVENT, user_id, UNFOLLOWED, gone, mutual, now, ip, platform)

        origin = call_origin.get()
        await self._transaction(work)

    # -- reads ---------------------------------------------------------------------------

    async def check(self, user_id: str, targets: Sequence[str]) -> dict[str, int]:
        """Each target's FollowType number (a plain int: up to 100 per call, on the hot path)."""
        async with self._connection() as conn:
            rows = await conn.fetch(_CHECK, user_id, list(targets))
        if not rows or not rows[0][0]:
            raise _user_not_found()
        return {r[1]: r[2] for r in rows}

    async def counts(self, user_ids: Sequence[str]) -> dict[str, Counts]:
        async with self._connection() as conn:
            if len(user_ids) > 1 and await self._distributed(conn):
                return _summed(await conn.fetch(_COUNT_ROWS, list(user_ids)))
            rows = await conn.fetch(_COUNTS, list(user_ids))
        return {r["user_id"]: Counts(r["followers"], r["following"], r["mutual"]) for r in rows}

    async def page(
        self,
        user_id: str,
        list_type: FollowType,
        limit: int,
        after: tuple[int, str] | None,
    ) -> tuple[list[PageRow], dict[str, Profile]]:
        """Up to `limit` entries after `after` (time in µs, id), and the profiles of the
        owner and of every listed user. The owner missing from the profiles means unknown."""
        first, next_ = _PAGES[list_type]
        async with self._connection() as conn:
            if after is None:
                rows = await conn.fetch(first, user_id, limit)
            else:
                rows = await conn.fetch(next_, user_id, limit, from_micros(after[0]), after[1])
            page = [PageRow(r[0], to_micros(r[1])) for r in rows]
            profile_rows = await conn.fetch(_PROFILES, [user_id, *(p.user_id for p in page)])
        profiles = {
            r["user_id"]: Profile(r["nick"], r["face_url"], r["profile_sequence"])
            for r in profile_rows
        }
        return page, profiles

    # -- accounts ------------------------------------------------------------------------

    async def import_accounts(self, accounts: Sequence[AccountInput]) -> None:
        """Create or update distinct accounts, in one transaction. Raises PendingDeletionError,
        and changes nothing, when one of them is still being deleted (a new account of the
        same id must not inherit the old one's edges)."""
        ids = [a.user_id for a in accounts]
        rows = [v for a in accounts for v in (a.user_id, a.nick, a.face_url)]

        async def work(conn: Conn) -> None:
            await conn.execute(_insert_counters(len(ids)), *ids)
            await conn.execute(_upsert_accounts(len(accounts)), *rows)
            # After the writes: a deletion committing meanwhile is seen here (its tombstone)
            # and this transaction rolls back.
            pending = [r[0] for r in await conn.fetch(_TOMBSTONED_AMONG, ids)]
            if pending:
                raise PendingDeletionError(pending)

        if accounts:
            await self._transaction(work)

    async def existing_accounts(self, user_ids: Sequence[str]) -> set[str]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT user_id FROM accounts WHERE user_id = ANY($1::text[])", list(user_ids)
            )
        return {r["user_id"] for r in rows}

    async def delete_accounts(self, user_ids: Sequence[str]) -> None:
        """Delete distinct accounts at once: from commit on they are unknown to every call.
        Their edges, and what those counted in other users' rows, are removed afterwards in
        bounded batches (clean_up_deletion); the tombstone written here is the durable job."""

        async def work(conn: Conn) -> None:
            ordered = sorted(user_ids)
            await conn.execute(_GATE, ordered, None, True)
            found = await conn.fetchmany(_LOCK_FOR_DELETE, [(u,) for u in ordered])
            for user_id in sorted(r[0] for r in found):
                await conn.execute(_TOMBSTONE, user_id)
                for statement in _DELETE_OWN:
                    await conn.execute(statement, user_id)
                await conn.execute(
                    _WRITE_DELETION_EVENT, user_id, origin.client_ip, origin.platform
                )

        origin = call_origin.get()

        await self._transaction(work)

    async def pending_deletions(
        self, limit: int = 100, conn: asyncpg.Connection | None = None
    ) -> list[str]:
        """Accounts deleted whose edges are still being removed, oldest first; on `conn`
        when given (the cleanup runner polls on its own connection, not the calls' pool)."""
        if conn is not None:
            return [r[0] for r in await conn.fetch(_PENDING_DELETIONS, limit)]
        async with self._connection() as pooled:
            return [r[0] for r in await pooled.fetch(_PENDING_DELETIONS, limit)]

    async def pending_among(self, user_ids: Sequence[str]) -> set[str]:
        async with self._connection() as conn:
            return {r[0] for r in await conn.fetch(_TOMBSTONED_AMONG, list(user_ids))}

    async def clean_up_deletion(self, user_id: str, batch: int | None = None) -> bool:
        """Remove one bounded batch of a deleted account's edges, in one short transaction
        that locks only users in the batch and never waits for one of them while it holds
        others (_hold). True once nothing is left and the tombstone is gone. Safe to repeat
        and to interrupt: each batch reads what is left. Where the last batch stopped is
        kept here (a keyset cursor, per account), so the next reads on from there; lost
        (a restart), the next batch reads from the start. `batch` edges at most, or as many
        as fit the time budget (DELETION_BATCH_SECONDS).

        A batch commits without waiting for its WAL to reach the disk (synchronous_commit
        off, this transaction only): it releases its locks at once instead of after the
        flush (hundreds of ms on a busy disk, measured). A crash may lose the last batches
        (never part of one, never the deletion itself: its tombstone commits durably), and
        the cleanup, resumed from the tombstone, does them again."""
        size = batch or self._deletion_batch
        started = 0.0

        async def work(conn: Conn) -> _Sweep | None:
            nonlocal started
            # One batch of an account at a time (the caller of DeleteAccounts and the
            # background runner may both be at it); none left to do once it is gone.
            if await conn.fetchrow(_LOCK_TOMBSTONE, user_id) is None:
                return None
            await conn.execute(_CLEANUP_SETTINGS)
            started = time.monotonic()
            sweep = self._sweeps.get(user_id, _Sweep())
            distributed = await self._distributed(conn)
            return await _clean_up_batch(conn, user_id, sweep, size, distributed)

        sweep = await self._transaction(work)
        if batch is None and started:
            self._deletion_batch = _next_batch_size(size, time.monotonic() - started)
        if sweep is None:
            self._sweeps.pop(user_id, None)
            return True
        self._sweeps[user_id] = sweep
        return False


def _next_batch_size(size: int, seconds: float) -> int:
    """The size of the cleanup batch after one of `size` that held its locks `seconds`."""
    fits = int(size * DELETION_BATCH_SECONDS / max(seconds, 1e-3))
    return max(MIN_DELETION_BATCH, min(fits, 2 * size, MAX_DELETION_BATCH))


@dataclass(frozen=True, slots=True)
class _Sweep:
    """Where a deletion's cleanup goes on: in its fans or in whom it followed, after `after`."""

    fans: bool = True
    after: str = ""


class PendingDeletionError(Exception):
    """Accounts that cannot be imported yet: their deletion's cleanup is still running."""

    def __init__(self, user_ids: list[str]) -> None:
        super().__init__(", ".join(user_ids))
        self.user_ids = user_ids


async def _clean_up_batch(
    conn: Conn, user_id: str, sweep: _Sweep, batch: int, distributed: bool
) -> _Sweep | None:
    """One batch of a deletion's cleanup from `sweep` on: where the next one goes on, or
    None when nothing was left (the tombstone is deleted: the deletion is complete)."""
    if sweep.fans:
        fans = await _next_ids(conn, _FANS_BATCH, user_id, sweep.after, batch)
        if fans:
            await _remove_fans(conn, user_id, fans, distributed)
            return _Sweep(True, fans[-1])
        sweep = _Sweep(False)
    followees = await _next_ids(conn, _FOLLOWEES_BATCH, user_id, sweep.after, batch)
    if followees:
        await _remove_followees(conn, user_id, followees, distributed)
        return _Sweep(False, followees[-1])
    await conn.execute(_END_DELETION, user_id)
    return None


async def _next_ids(conn: Conn, query: str, user_id: str, after: str, batch: int) -> list[str]:
    """Up to `batch` ids after `after`; past the last one, from the start again (what a
    batch skipped as busy is still there). None at all: this part of the work is done."""
    ids = [r[0] for r in await conn.fetch(query, user_id, after, batch)]
    if not ids and after:
        ids = [r[0] for r in await conn.fetch(query, user_id, "", batch)]
    return ids


async def _hold(
    conn: Conn, ids: list[str], exclusive: bool, distributed: bool
) -> tuple[list[str], list[str]]:
    """Lock what a cleanup batch may change of the users `ids` (sorted) without waiting for
    any of them: the gate of each that is free (exclusive, or shared), then its counter row
    (FOR UPDATE, or FOR SHARE). Busy ones are left for a later batch. When all are busy, the
    first one is waited for, holding no other user's locks, so only calls for that user can
    queue behind the batch. The ids held, and those of them whose counter row exists (the
    others are deleted accounts: nothing to count)."""
    gated = [r[0] for r in await conn.fetch(_TRY_GATE, ids, exclusive)]
    if distributed:
        try_lock = _TRY_LOCK_FAN if exclusive else _TRY_SHARE_LOCK
        alive = [r[0] for r in await conn.fetchmany(try_lock, [(u,) for u in gated])]
    else:
        try_lock = _TRY_LOCK_FANS if exclusive else _TRY_SHARE_LOCKS
        alive = [r[0] for r in await conn.fetch(try_lock, gated)]
    missing = sorted(set(gated) - set(alive))
    busy = {r[0] for r in await conn.fetch(_EXISTING_AMONG, missing)} if missing else set()
    held = [u for u in gated if u not in busy]
    if held:
        return held, alive
    first = ids[0]
    await conn.execute(_GATE, [first], None, exclusive)
    row = await conn.fetchrow(_LOCK_FOR_DELETE if exclusive else _SHARE_LOCK, first)
    return [first], [] if row is None else [first]


async def _remove_fans(conn: Conn, user_id: str, fans: list[str], distributed: bool) -> None:
    """Fans of a deleted account stop following it: each one's following (and mutual, if
    the account followed them back) goes down by one, in their own counter rows. Only the
    fans whose locks _hold got: the others stay for a later batch."""
    held, alive = await _hold(conn, fans, exclusive=True, distributed=distributed)
    if alive:
        followed_back = {r[0] for r in await conn.fetch(_FOLLOWED_BY, user_id, alive)}
        await conn.execute(_UNCOUNT_FOLLOWING, alive)
        mutual = [u for u in alive if u in followed_back]
        if mutual:
            await conn.execute(_UNCOUNT_MUTUAL, mutual)
    await conn.execute(_DELETE_THEIR_FOLLOWING, user_id, held)
    await conn.execute(_DELETE_OWN_FOLLOWERS, user_id, held)


async def _remove_followees(
    conn: Conn, user_id: str, followees: list[str], distributed: bool
) -> None:
    """Users the deleted account followed lose it as a follower: one delta row each (a
    share lock, as a Follow takes on its targets), in id order (on Citus by shard, then id, as
    the calls write them); busy ones are left for a later batch (_hold). Its fans are gone
    by now, so none of these pairs is still mutual."""
    held, alive = await _hold(conn, followees, exclusive=False, distributed=distributed)
    if alive and distributed:
        # The calls' order on Citus: by shard, then id (_by_shard), one statement per shard.
        shard_of = {r[0]: r[1] for r in await conn.fetch(_SHARDS_OF, alive)}
        await _add_their_deltas(conn, user_id, alive, -1, set(), shard_of)
    elif alive:
        shard = delta_shard(user_id)
        await conn.executemany(_ADD_DELTA, [(u, shard, -1, 0) for u in sorted(alive)])
    await conn.execute(_DELETE_THEIR_FOLLOWERS, user_id, held)
    await conn.execute(_DELETE_FOLLOWING, user_id, held)


async def _lock_users(
    conn: Conn, user_id: str, targets: Sequence[str], citus: bool, *, share: bool = True
) -> tuple[asyncpg.Record, set[str], dict[str, int]]:
    """Lock the acting user's counter row FOR UPDATE and, if `share`, the targets' FOR
    SHARE. The owner's row (following count, the time now), the targets that exist (with
    `share`; else empty), and on Citus each user's shard (empty on one PostgreSQL). A
    Follow shares the targets' rows: it must know they exist, and keep them so until it
    commits. An Unfollow does not: it writes none of their counter rows, and the gate
    alone keeps their deletion out (see _OWN_FOLLOWS_AMONG).

    First, in the same order and in one statement (_GATE), advisory locks: exclusive on the
    acting user, shared on each target. Two things rest on it. Fairness: a celebrity's own
    call queues behind the followers already in and ahead of those still coming, instead of
    waiting for a moment with no share lock on its row. Event order: the gate takes no
    transaction id, and every call that writes an event for a user (its follows, unfollows,
    its deletion) holds that user's exclusive gate until commit, so the transaction ids of
    one user's events grow in commit order (readers of follow_events rely on it).

    The counter rows are locked only under the gate, and so in any order without a
    deadlock: a row lock one gate holder waits for is held by another that holds no gate it
    waits for (a user's row is locked FOR UPDATE only by a holder of its exclusive gate, and
    every gate is taken before any row). One PostgreSQL takes them in id order, one user per
    statement, in one round trip; Citus one statement per shard (_by_shard)."""
    ids = sorted({user_id, *targets})
    if citus:
        shard_of = {r[0]: r[1] for r in await conn.fetch(_GATE_SHARDS, ids, user_id, False)}
        owner = await conn.fetchrow(_LOCK_OWNER, user_id)
        if owner is None:
            raise _user_not_found()
        groups = _by_shard([u for u in ids if u != user_id], shard_of) if share else []
        locked = await conn.fetchmany(_SHARE_LOCKS, [(g,) for g in groups]) if groups else []
        return owner, {r[0] for r in locked}, shard_of
    await conn.execute(_GATE, ids, user_id, False)
    at = ids.index(user_id)
    before, after = (ids[:at], ids[at + 1 :]) if share else ([], [])
    known: set[str] = set()
    if before:
        known.update(r[0] for r in await conn.fetchmany(_SHARE_LOCK, [(u,) for u in before]))
    owner = await conn.fetchrow(_LOCK_OWNER, user_id)
    if owner is None:
        raise _user_not_found()
    if after:
        known.update(r[0] for r in await conn.fetchmany(_SHARE_LOCK, [(u,) for u in after]))
    return owner, known, {}


def _by_shard(users: Sequence[str], shard_of: dict[str, int]) -> list[list[str]]:
    """Users grouped by their Citus shard, groups in shard order, ids sorted in each: the
    one order every call writes other users' delta rows in (no two wait in a circle)."""
    groups: dict[int, list[str]] = {}
    for u in sorted(users):
        groups.setdefault(shard_of[u], []).append(u)
    return [groups[k] for k in sorted(groups)]


async def _write_follows_per_owner(
    conn: Conn,
    user_id: str,
    new: list[str],
    now: object,
    fans: set[str],
    shard_of: dict[str, int],
) -> None:
    """Both copies of each new edge, mutual state on both sides, and the counts: the
    acting user's own row, and a delta row per target, one statement per shard."""
    mutual = [t for t in new if t in fans]
    following_rows: list[object] = []
    for t in new:
        following_rows += (t, now if t in fans else None)
    await conn.execute(_insert_following(len(new)), user_id, now, *following_rows)
    await conn.execute(_insert_followers(len(new)), user_id, now, *new)
    if mutual:
        await conn.executemany(
            _SET_THEIR_MUTUALS, [(g, user_id, now) for g in _by_shard(mutual, shard_of)]
        )
    await _add_their_deltas(conn, user_id, new, 1, fans, shard_of)
    await conn.execute(_ADD_OWN_COUNTS, user_id, len(new), len(mutual))


async def _add_their_deltas(
    conn: Conn,
    user_id: str,
    users: list[str],
    followers: int,
    mutual: set[str],
    shard_of: dict[str, int],
) -> None:
    """`followers` (+1 or -1) on each user's delta row under the acting user's delta shard,
    and as much on its mutual count for those in `mutual`: one statement per Citus shard."""
    shard = delta_shard(user_id)
    for group in _by_shard(users, shard_of):
        rows = [v for u in group for v in (u, followers if u in mutual else 0)]
        await conn.execute(_add_deltas(len(group)), shard, followers, *rows)


def _summed(rows: Sequence[asyncpg.Record]) -> dict[str, Counts]:
    """_COUNT_ROWS' rows summed per user: each counter row plus that user's delta rows
    (those with a NULL following). A user without a counter row is unknown, as in _COUNTS."""
    totals: dict[str, list[int]] = {r[0]: [r[2], r[1], r[3]] for r in rows if r[1] is not None}
    for user, following, followers, mutual in rows:
        if following is None and user in totals:
            total = totals[user]
            total[0] += followers
            total[2] += mutual
    return {u: Counts(t[0], t[1], t[2]) for u, t in totals.items()}


def _deadline_exceeded() -> ServiceError:
    return ServiceError(
        Reason.DEADLINE_EXCEEDED, "the call's deadline passed before the database answered"
    )


def delta_shard(user_id: str) -> int:
    """The delta row a user's follows and unfollows count under, in each target's shards:
    spreading followers over DELTA_SHARDS rows lets that many follow a user at once."""
    return zlib.crc32(user_id.encode()) % DELTA_SHARDS


def _user_not_found() -> ServiceError:
    return ServiceError(Reason.USER_NOT_FOUND, "the acting user has not been imported", "user_id")
