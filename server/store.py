"""All SQL: one transaction per call, every statement scoped by the user that owns its rows.

Lock discipline (what keeps counts, both copies of each edge and mutual state exact under
concurrency): a transaction touches rows owned by user U only while it holds a lock on U's
`follow_counts` row. The acting user locks their own row FOR UPDATE first (which also
serialises the following cap); the users they follow or unfollow are locked FOR SHARE, one
statement per user, in id order, before any of their rows are touched. A share lock waits
for U's own transaction in flight and keeps U's next one out until we commit, yet many
followers of one user hold it at once: following a celebrity is not serialised.

So a follower's changes to U's counts cannot go to U's counter row (that needs U's row
exclusively). They go to `follow_count_deltas`, one row per (U, shard of the follower), and
U's counts are the counter row plus the sum of U's delta rows (the `follow_totals` view).
Two users acting on each other at the same moment (A follows B while B follows A) can
deadlock; PostgreSQL detects that, and the call is retried, a bounded number of times.

Inputs arrive validated (see server.core); this module decides nothing about ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, TypeVar

import asyncpg

from server.deadline import call_deadline, remaining
from server.errors import FollowType, ItemCode, Reason, ServiceError

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

_CLASSIFY_TARGETS = """
SELECT t.id,
       EXISTS (SELECT 1 FROM follow_counts c WHERE c.user_id = t.id) AS known,
       EXISTS (SELECT 1 FROM following f WHERE f.user_id = $1 AND f.target_id = t.id) AS followed
FROM unnest($2::text[]) AS t(id)
"""

# One owner per statement (a distributed PostgreSQL locks one shard at a time); asyncpg's
# executemany sends them all in one round trip.
_SHARE_LOCK = "SELECT 1 FROM follow_counts WHERE user_id = $1 FOR SHARE"

# After the share locks: which targets still exist (an account deleted meanwhile has lost
# its counter row), and which of them follow the acting user (mutual from now on).
_RECHECK_TARGETS = """
SELECT t.id,
       EXISTS (SELECT 1 FROM follow_counts c WHERE c.user_id = t.id) AS known,
       EXISTS (SELECT 1 FROM followers r WHERE r.user_id = $1 AND r.follower_id = t.id) AS fan
FROM unnest($2::text[]) AS t(id)
"""


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
)
UPDATE follow_counts
SET following = following + cardinality($2::text[]), mutual = mutual + cardinality($4::text[])
WHERE user_id = $1
"""

_FOLLOWED_AMONG = """
SELECT target_id, mutual_since IS NOT NULL AS mutual
FROM following WHERE user_id = $1 AND target_id = ANY($2::text[])
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
)
UPDATE follow_counts
SET following = following - cardinality($2::text[]), mutual = mutual - cardinality($3::text[])
WHERE user_id = $1
"""

# The FollowType number itself: 2 if the user follows the target, plus 1 if it follows back.
_CHECK = """
SELECT (SELECT true FROM follow_counts WHERE user_id = $1) AS owner_known,
       t.id,
       2 * EXISTS (SELECT 1 FROM following f WHERE f.user_id = $1 AND f.target_id = t.id)::int
       + EXISTS (SELECT 1 FROM followers r WHERE r.user_id = $1 AND r.follower_id = t.id)::int
FROM unnest($2::text[]) AS t(id)
"""

_COUNTS = """
SELECT user_id, followers, following, mutual FROM follow_totals WHERE user_id = ANY($1::text[])
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

_IMPORT_ACCOUNTS = """
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[]) AS i(user_id, nick, face_url)
), counters AS (
    INSERT INTO follow_counts (user_id) SELECT user_id FROM input ON CONFLICT DO NOTHING
)
INSERT INTO accounts AS a (user_id, nick, face_url)
SELECT user_id, nick, face_url FROM input
ON CONFLICT (user_id) DO UPDATE SET
    nick = COALESCE(EXCLUDED.nick, a.nick),
    face_url = COALESCE(EXCLUDED.face_url, a.face_url),
    profile_sequence = a.profile_sequence + (
        COALESCE(EXCLUDED.nick, a.nick) IS DISTINCT FROM a.nick
        OR COALESCE(EXCLUDED.face_url, a.face_url) IS DISTINCT FROM a.face_url)::int
"""

_LOCK_ACCOUNT = "SELECT 1 FROM follow_counts WHERE user_id = $1 FOR UPDATE"

_NEIGHBOURS = """
SELECT target_id AS id, true AS followee, false AS follower, mutual_since IS NOT NULL AS mutual
FROM following WHERE user_id = $1
UNION ALL
SELECT follower_id, false, true, false FROM followers WHERE user_id = $1
"""

_UNCOUNT_NEIGHBOURS = """
UPDATE follow_counts c
SET followers = c.followers - d.followers, following = c.following - d.following,
    mutual = c.mutual - d.mutual
FROM (SELECT * FROM unnest($1::text[], $2::int[], $3::int[], $4::int[])
      AS d(user_id, followers, following, mutual) ORDER BY user_id) AS d
WHERE c.user_id = d.user_id
"""

_DELETE_ACCOUNT = """
WITH their_following AS (
    DELETE FROM following WHERE user_id = ANY($2::text[]) AND target_id = $1
), their_followers AS (
    DELETE FROM followers WHERE user_id = ANY($3::text[]) AND follower_id = $1
), own_following AS (
    DELETE FROM following WHERE user_id = $1
), own_followers AS (
    DELETE FROM followers WHERE user_id = $1
), own_counts AS (
    DELETE FROM follow_counts WHERE user_id = $1
), own_deltas AS (
    DELETE FROM follow_count_deltas WHERE user_id = $1
)
DELETE FROM accounts WHERE user_id = $1
"""


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
            except _RETRYABLE:
                if attempt == MAX_ATTEMPTS - 1:
                    break
                await asyncio.sleep(random.uniform(0, 0.002 * 2**attempt))  # noqa: S311 - jitter, not a secret
        raise ServiceError(
            Reason.CONTENTION, "too many concurrent changes to the same users; try again"
        )

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
            owner = await conn.fetchrow(_LOCK_OWNER, user_id)
            if owner is None:
                raise _user_not_found()
            results: dict[str, ItemCode] = {}
            room = max_following - owner["following"]
            wanted: list[str] = []
            for row in await conn.fetch(_CLASSIFY_TARGETS, user_id, list(targets)):
                target = row["id"]
                if not row["known"]:
                    results[target] = ItemCode.ACCOUNT_NOT_FOUND
                elif row["followed"]:
                    results[target] = ItemCode.OK
                elif len(wanted) < room:
                    wanted.append(target)
                else:
                    results[target] = ItemCode.FOLLOWING_LIMIT_REACHED
            if not wanted:
                return results
            # After this no transaction of a target's own is in flight, and none can start
            # until we commit; other followers of theirs may go on beside us.
            await _share_lock(conn, wanted)
            new: list[str] = []
            fans: list[str] = []
            for row in await conn.fetch(_RECHECK_TARGETS, user_id, wanted):
                if not row["known"]:  # deleted after we classified it
                    results[row["id"]] = ItemCode.ACCOUNT_NOT_FOUND
                    continue
                new.append(row["id"])
                if row["fan"]:
                    fans.append(row["id"])
            if not new:
                return results
            await conn.execute(
                _WRITE_FOLLOWS, user_id, new, owner["now"], fans, delta_shard(user_id)
            )
            results.update(dict.fromkeys(new, ItemCode.OK))
            return results

        return await self._transaction(work)

    async def unfollow(self, user_id: str, targets: Sequence[str]) -> None:
        """Stop following `targets` (distinct, valid); not following one is no error."""

        async def work(conn: Conn) -> None:
            if await conn.fetchrow(_LOCK_OWNER, user_id) is None:
                raise _user_not_found()
            rows = await conn.fetch(_FOLLOWED_AMONG, user_id, list(targets))
            if not rows:
                return
            gone = sorted(r["target_id"] for r in rows)
            mutual = [r["target_id"] for r in rows if r["mutual"]]
            await _share_lock(conn, gone)
            await conn.execute(_WRITE_UNFOLLOWS, user_id, gone, mutual, delta_shard(user_id))

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
        """Create or update distinct accounts, in one transaction."""
        ids = [a.user_id for a in accounts]
        nicks = [a.nick for a in accounts]
        faces = [a.face_url for a in accounts]

        async def work(conn: Conn) -> None:
            await conn.execute(_IMPORT_ACCOUNTS, ids, nicks, faces)

        await self._transaction(work)

    async def existing_accounts(self, user_ids: Sequence[str]) -> set[str]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT user_id FROM accounts WHERE user_id = ANY($1::text[])", list(user_ids)
            )
        return {r["user_id"] for r in rows}

    async def delete_accounts(self, user_ids: Sequence[str]) -> None:
        """Delete distinct accounts with every edge they have, correcting neighbours' counts."""

        async def work(conn: Conn) -> None:
            for user_id in user_ids:
                await _delete_account(conn, user_id)

        await self._transaction(work)


async def _delete_account(conn: Conn, user_id: str) -> None:
    if await conn.fetchrow(_LOCK_ACCOUNT, user_id) is None:
        return
    deltas: dict[str, list[int]] = {}
    followees: list[str] = []
    followers: list[str] = []
    for r in await conn.fetch(_NEIGHBOURS, user_id):
        d = deltas.setdefault(r["id"], [0, 0, 0])
        if r["followee"]:
            followees.append(r["id"])
            d[0] += 1  # they lose a follower
            d[2] += int(r["mutual"])
        if r["follower"]:
            followers.append(r["id"])
            d[1] += 1  # they follow one fewer
    if deltas:
        ids = sorted(deltas)
        await conn.execute(
            _UNCOUNT_NEIGHBOURS,
            ids,
            [deltas[i][0] for i in ids],
            [deltas[i][1] for i in ids],
            [deltas[i][2] for i in ids],
        )
    await conn.execute(_DELETE_ACCOUNT, user_id, followers, followees)


def _deadline_exceeded() -> ServiceError:
    return ServiceError(
        Reason.DEADLINE_EXCEEDED, "the call's deadline passed before the database answered"
    )


def delta_shard(user_id: str) -> int:
    """The delta row a user's follows and unfollows count under, in each target's shards:
    spreading followers over DELTA_SHARDS rows lets that many follow a user at once."""
    return zlib.crc32(user_id.encode()) % DELTA_SHARDS


async def _share_lock(conn: Conn, user_ids: Sequence[str]) -> None:
    await conn.executemany(_SHARE_LOCK, [(u,) for u in sorted(user_ids)])


def _user_not_found() -> ServiceError:
    return ServiceError(Reason.USER_NOT_FOUND, "the acting user has not been imported", "user_id")
