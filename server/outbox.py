"""Reading the change-event outbox (follow_events) in a stable order, with no gap.

server.store writes one follow_events row per acknowledged change, in the change's own
transaction, stamped with that transaction's id (`txid`, a default of the column). Event ids
come from a sequence, and neither ids nor transaction ids are handed out in commit order: a
reader that advanced past an id still uncommitted would never see it. So readers advance by
a visibility horizon instead: every transaction whose id is below the xmin of a snapshot
has finished, so the rows with `txid` below it are final (present for good, or never). A
reader takes the horizon first, then reads rows past its last position (txid, id) and below
the horizon, in (txid, id) order, and resumes from the last row it saw. A row that commits
later has a txid at or above the horizon it was skipped under, so it comes in a later read.

Per acting user the order is commit order: every call that writes an event for a user holds
that user's exclusive gate lock (server.store._lock_users) from before its transaction has an
id until it commits, so one user's transaction ids grow in commit order.

On Citus the service's transactions are the coordinator's, and the txid default is evaluated
there (Citus computes column defaults before routing an INSERT). A transaction spanning two
workers commits on the coordinator first and on the workers just after (two-phase commit:
COMMIT PREPARED), so the coordinator's xmin alone could pass a row a worker does not show yet.
The coordinator records each such transaction in pg_dist_transaction, with its id
(outer_xid), in the committing transaction itself, and the record stays until Citus has
confirmed the worker's commit (its recovery, every citus.recover_2pc_interval, or
recover_prepared_transactions()). So there the horizon is the lesser of the snapshot's xmin
and the oldest recorded outer_xid, read in one statement (one snapshot). Records whose
outer_xid is not a normal transaction id (0: seen on test clusters, from transactions that
had none on the coordinator) are left out: every transaction that writes an event has one
(the txid default assigns it), so such a record cannot hold an event back.

The cost: a long-running transaction anywhere in the cluster (PostgreSQL's xids are
cluster-wide) holds the horizon, and so delivery, back until it ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import asyncpg

from server.database import has_citus

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

FOLLOWED, UNFOLLOWED, ACCOUNT_DELETED = 1, 2, 3


class Position(NamedTuple):
    """Where a reader stands: the (txid, id) of the last row it has seen. A NamedTuple
    (ordered and hashed as the pair), like OutboxRow: made for every row read, and a frozen
    dataclass's construction cost ~6 times a tuple's."""

    txid: int
    id: int


START = Position(0, 0)  # before every event
MAX_ID = 2**63 - 1


class OutboxRow(NamedTuple):
    """One change event: one call's change, as server.store wrote it (every reader makes
    one per row it reads: the Watch tailer, the webhook feeder)."""

    user_id: str  # the acting user (or the deleted account)
    id: int
    txid: int
    kind: int  # FOLLOWED, UNFOLLOWED or ACCOUNT_DELETED
    others: tuple[str, ...]  # followed: in the call's order; unfollowed: sorted by id
    mutual: frozenset[str]  # those that became (follow) or stopped being (unfollow) mutual
    at_us: int  # when, Unix microseconds
    client_ip: str
    platform: str

    @property
    def position(self) -> Position:
        return Position(self.txid, self.id)


_HORIZON = "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint"
_HORIZON_CITUS = """
SELECT least(pg_snapshot_xmin(pg_current_snapshot()),
             (SELECT min(outer_xid) FROM pg_dist_transaction WHERE outer_xid >= '3'))::text::bigint
"""

_HORIZON_CITUS_PARTS = """
SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint,
       (SELECT min(outer_xid) FROM pg_dist_transaction WHERE outer_xid >= '3')::text::bigint
"""

_COLUMNS = "user_id, id, txid::text::bigint, kind, others, mutual, at, client_ip, platform"
# ORDER BY names the table's columns (follow_events.txid): a bare "txid" is the output
# column txid::text::bigint, which no index orders, so every row after the position was
# read and sorted before the LIMIT (a catch-up read from far back sorted the whole outbox).
_READ = f"""
SELECT {_COLUMNS} FROM follow_events
WHERE (txid, id) > ($1::text::xid8, $2) AND txid < $3::text::xid8
ORDER BY follow_events.txid, follow_events.id LIMIT $4
"""  # noqa: S608 - constant column list
_READ_USERS = f"""
SELECT {_COLUMNS} FROM follow_events
WHERE (txid, id) > ($1::text::xid8, $2) AND txid < $3::text::xid8 AND user_id = ANY($5::text[])
ORDER BY follow_events.txid, follow_events.id LIMIT $4
"""  # noqa: S608 - constant column list
# The horizon, the rows below it and the floor in one statement (off Citus): one snapshot,
# so the rows are those final under the horizon it gives and the floor is the one they were
# read with (a deletion and its floor raise commit together). Always one row at least: the
# horizon and floor, then a row's columns (all NULL when no row is there).
_READ_ALL = f"""
SELECT h.below::text::bigint, f.txid::text::bigint, f.id, e.*
FROM (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS below) h
CROSS JOIN follow_events_floor f
LEFT JOIN LATERAL (
    SELECT {_COLUMNS} FROM follow_events
    WHERE (txid, id) > ($1::text::xid8, $2) AND txid < h.below {{users}}
    ORDER BY follow_events.txid, follow_events.id LIMIT $3
) e ON true
"""  # noqa: S608 - constant column list
_READ_ALL_ANY = _READ_ALL.format(users="")
_READ_ALL_USERS = _READ_ALL.format(users="AND user_id = ANY($4::text[])")
_FLOOR = "SELECT txid::text::bigint, id FROM follow_events_floor"
_LAST = """
SELECT txid::text::bigint, id FROM follow_events
ORDER BY follow_events.txid DESC, follow_events.id DESC LIMIT 1
"""

# Retention, oldest first: the prefix (in reading order) of final rows older than the cutoff.
_OLDEST = """
SELECT txid::text::bigint, id, at FROM follow_events
WHERE txid < $1::text::xid8 AND (txid, id) <= ($2::text::xid8, $3)
ORDER BY follow_events.txid, follow_events.id LIMIT $4
"""
_DELETE_THROUGH = "DELETE FROM follow_events WHERE (txid, id) <= ($1::text::xid8, $2)"
_RAISE_FLOOR = """
UPDATE follow_events_floor SET txid = $1::text::xid8, id = $2
WHERE (txid, id) < ($1::text::xid8, $2)
"""


async def is_distributed(conn: Any) -> bool:
    """Whether the database is a Citus cluster (the horizon then also waits for 2PC)."""
    return await has_citus(conn)


async def horizon(conn: Any, distributed: bool) -> int:
    """The lowest transaction id that may still add rows: rows below it are final.

    On Citus a finished two-phase commit keeps the horizon back until Citus has confirmed
    it on the workers and dropped its record, which its maintenance daemon does only every
    citus.recover_2pc_interval (a minute by default): so when a record holds the horizon
    below the snapshot's xmin, this confirms them now (recover_prepared_transactions(): one
    query per worker) and reads the horizon again."""
    if not distributed:
        value: int = await conn.fetchval(_HORIZON)
        return value
    row = await conn.fetchrow(_HORIZON_CITUS_PARTS)
    if row[1] is None or row[1] >= row[0]:
        return int(row[0])
    await conn.execute("SELECT recover_prepared_transactions()")
    value = await conn.fetchval(_HORIZON_CITUS)
    return value


def _micros(at: datetime | int) -> int:
    """Unix microseconds (the service's pool already reads timestamps as such)."""
    return at if isinstance(at, int) else (at - _EPOCH) // timedelta(microseconds=1)


def _row(r: asyncpg.Record) -> OutboxRow:
    at = r[6]
    return OutboxRow(
        r[0],
        r[1],
        r[2],
        r[3],
        tuple(r[4]),
        frozenset(r[5]),
        at if type(at) is int else _micros(at),
        r[7],
        r[8],
    )


async def read_after(
    conn: Any,
    after: Position,
    below: int,
    limit: int,
    users: Sequence[str] | None = None,
) -> list[OutboxRow]:
    """Up to `limit` final rows after `after` and with txid below the horizon `below`, in
    (txid, id) order; only those acted by `users` when given."""
    if users:
        rows = await conn.fetch(_READ_USERS, str(after.txid), after.id, str(below), limit, users)
    else:
        rows = await conn.fetch(_READ, str(after.txid), after.id, str(below), limit)
    return [_row(r) for r in rows]


async def read_final(
    conn: Any,
    after: Position,
    limit: int,
    distributed: bool,
    users: Sequence[str] | None = None,
) -> tuple[list[OutboxRow], int, Position]:
    """The horizon, then up to `limit` final rows after `after` below it (only those acted
    by `users` when given), then the floor: (rows, horizon, floor). Off Citus one statement
    (_READ_ALL: a reader polling several times a second paid three round trips and three
    statements' overhead per poll); on Citus three (horizon's 2PC check, rows, floor)."""
    if distributed:
        below = await horizon(conn, distributed)
        rows = await read_after(conn, after, below, limit, users)
        return rows, below, await floor(conn)
    if users:
        found = await conn.fetch(_READ_ALL_USERS, str(after.txid), after.id, limit, users)
    else:
        found = await conn.fetch(_READ_ALL_ANY, str(after.txid), after.id, limit)
    first = found[0]
    rows = [] if first[3] is None else [_row(r[3:]) for r in found]
    return rows, int(first[0]), Position(first[1], first[2])


async def floor(conn: Any) -> Position:
    """The position through which events have been deleted: resuming from before it would
    miss events."""
    r = await conn.fetchrow(_FLOOR)
    return Position(r[0], r[1])


async def now_position(conn: Any, distributed: bool) -> Position:
    """A position before every event not final yet and after every final one: a reader
    that wants "only new events" starts here and misses none that commit later."""
    return Position(await horizon(conn, distributed) - 1, MAX_ID)


async def delete_expired(
    conn: Any,
    older_than: datetime,
    through: Position,
    below: int,
    batch: int,
) -> int:
    """Delete up to `batch` of the oldest final rows (txid below `below`) written before
    `older_than` and not after `through` (what every consumer still needing rows has
    passed), in reading order, and raise the floor to the last one deleted; in one
    transaction. The number deleted (0: nothing to do now)."""
    async with conn.transaction():
        rows = await conn.fetch(_OLDEST, str(below), str(through.txid), through.id, batch)
        cutoff = _micros(older_than)
        last: Position | None = None
        for r in rows:
            if _micros(r[2]) >= cutoff:
                break
            last = Position(r[0], r[1])
        if last is None:
            return 0
        status: str = await conn.execute(_DELETE_THROUGH, str(last.txid), last.id)
        await conn.execute(_RAISE_FLOOR, str(last.txid), last.id)
        return int(status.rsplit(" ", 1)[1])


class OutboxSource:
    """The outbox reads of the Watch stream (server.watch_hub) over the service's pool: each
    read is one short use of one pooled connection (horizon, rows, and the floor: read_final),
    bounded in time, so a stream never holds a connection while it waits or sends."""

    def __init__(self, pool: Any, timeout: float = 10.0) -> None:
        self._pool = pool
        self._timeout = timeout
        self._distributed: bool | None = None

    async def _is_distributed(self, conn: Any) -> bool:
        if self._distributed is None:
            self._distributed = await is_distributed(conn)
        return self._distributed

    async def read(
        self, after: Position, limit: int, users: Sequence[str] | None = None
    ) -> tuple[list[OutboxRow], int, Position]:
        """(rows after `after` in reading order, at most `limit`; the horizon they were read
        below; the floor read after them). When the floor is past `after`, rows the reader
        needed may have been deleted before it read them."""
        async with asyncio.timeout(self._timeout), self._pool.acquire() as conn:
            return await read_final(conn, after, limit, await self._is_distributed(conn), users)

    async def now(self) -> Position:
        """now_position, on a pooled connection."""
        async with asyncio.timeout(self._timeout), self._pool.acquire() as conn:
            return await now_position(conn, await self._is_distributed(conn))

    async def floor(self) -> Position:
        """floor, on a pooled connection."""
        async with asyncio.timeout(self._timeout), self._pool.acquire() as conn:
            return await floor(conn)
