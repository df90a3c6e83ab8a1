"""The webhook delivery queue's SQL (migration 5): each callback URL's place in the outbox
(webhook_positions) and its deliveries still to do (webhook_deliveries).

Every statement here is short and autocommits, or is one small transaction: none is open
while a request is on the wire, so delivery never holds the outbox's visibility horizon back
and never holds a lock a user's call waits on (the queue's rows are its own; the outbox is
only read).

The claim protocol. A user's deliveries to one URL go out one at a time, oldest (txid, id)
first: only the user's oldest row not parked (its head) may be claimed, and only when it is
due (next_at) and not claimed by a live lease (claimed_until). A sender claims a batch of
heads at once: one UPDATE finds the due heads of the URL oldest first (index
webhook_deliveries_queue) and sets on each a lease and the batch's random claim token (on
Citus: a read-only search, then one single-shard UPDATE per user repeating every condition:
head, due, free). Two senders racing for the same head serialise on its row lock and the
second finds the lease set and claims nothing (the equivalent of FOR UPDATE SKIP LOCKED,
without a transaction around it). Marking the outcome (delete on a 2xx, several users' at
once off Citus; a backoff, or parked past the budget, otherwise) checks the token, so a
sender whose lease ran out cannot overwrite the work of the one that took over. The feeder
may claim a head as it queues it (queue_claiming: the user's first row of the batch, with
nothing of the user pending before it), under its process's sender's token and lease, the
same claim made one statement earlier. A sender
that dies mid-request leaves its lease to run out: the row is claimed and sent again (at
least once).

Timestamps are int Unix microseconds (the connections use server.database's
use_int_timestamps).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from server.outbox import Position

_ENSURE = """
INSERT INTO webhook_positions (url, txid, id) VALUES ($1, $2, $3) ON CONFLICT (url) DO NOTHING
"""
_POSITIONS = "SELECT url, txid, id FROM webhook_positions WHERE url = ANY($1::text[])"
_ADVANCE = """
UPDATE webhook_positions SET txid = $2, id = $3 WHERE url = $1 AND txid = $4 AND id = $5
"""
_INSERT = """
INSERT INTO webhook_deliveries
    (user_id, url, txid, event_id, command, body, client_ip, platform, event_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
ON CONFLICT DO NOTHING
"""
# A whole batch in one statement (off Citus): one parse, plan and executor run for up to
# FEED_BATCH rows, where executemany runs _INSERT once per row (each a Bind/Execute of its
# own, most of the feeder's PostgreSQL time per event). event_at comes as Unix microseconds.
_INSERT_MANY = """
INSERT INTO webhook_deliveries
    (user_id, url, txid, event_id, command, body, client_ip, platform, event_at)
SELECT u, $1, t, e, c, b, ip, p, 'epoch'::timestamptz + a * interval '1 microsecond'
FROM unnest($2::text[], $3::bigint[], $4::bigint[], $5::text[], $6::text[], $7::text[],
            $8::text[], $9::bigint[]) AS q(u, t, e, c, b, ip, p, a)
ON CONFLICT DO NOTHING
"""

# The feeder's whole step in one autocommitted statement (off Citus): move the URL's position
# from where this feeder left it (or nothing at all: another feeder moved it), queue the
# batch, and claim for this process's sender, under its token and lease, the rows flagged in
# $14 that are their user's head (no pending delivery of the user to the URL before them: the
# flag marks a user's first row of the batch, and every row already queued is older). Those
# go on the wire at once, without a claim statement of their own. The first column is 1 when
# the position moved, 0 when not (then nothing was queued); then a row per delivery queued
# (all NULL when none), with its queue time and its claim (NULL: queued for a later claim).
_FEED = """
WITH moved AS (
    UPDATE webhook_positions SET txid = $2, id = $3 WHERE url = $1 AND txid = $4 AND id = $5
    RETURNING 1
), batch AS (
    SELECT q.*, q.k AND NOT EXISTS (
        SELECT 1 FROM webhook_deliveries o
        WHERE o.user_id = q.u AND o.url = $1 AND o.parked_at IS NULL
    ) AS own
    FROM unnest($6::text[], $7::bigint[], $8::bigint[], $9::text[], $10::text[], $11::text[],
                $12::text[], $13::bigint[], $14::bool[]) AS q(u, t, e, c, b, ip, p, a, k)
    WHERE EXISTS (SELECT 1 FROM moved)
), queued AS (
    INSERT INTO webhook_deliveries
        (user_id, url, txid, event_id, command, body, client_ip, platform, event_at,
         claimed_until, claim)
    SELECT u, $1, t, e, c, b, ip, p, 'epoch'::timestamptz + a * interval '1 microsecond',
           CASE WHEN own THEN now() + $15 * interval '1 second' END,
           CASE WHEN own THEN $16::bigint END
    FROM batch
    ON CONFLICT DO NOTHING
    RETURNING event_id, queued_at, claim
)
SELECT (SELECT count(*) FROM moved), queued.* FROM (SELECT 1) one LEFT JOIN queued ON true
"""


def _is_head(d: str) -> str:
    """Row `d` is its user's head: its oldest delivery to the URL not parked. Deliveries are
    queued in outbox order (the feeder's position only moves forward), so no row older than
    a head ever appears after it. A scalar subquery, not NOT EXISTS: it stays a lookup per
    row whatever the statistics say, where the anti-join that NOT EXISTS becomes was planned,
    on a queue analyzed while empty, as a scan of the URL's whole queue per row."""
    return f"""(SELECT 1 FROM webhook_deliveries o
    WHERE o.user_id = {d}.user_id AND o.url = {d}.url AND o.parked_at IS NULL
      AND (o.txid, o.event_id) < ({d}.txid, {d}.event_id) LIMIT 1) IS NULL"""  # noqa: S608


def _free(d: str) -> str:
    """Row `d` is due and not under a live lease."""
    return f"{d}.next_at <= now() AND ({d}.claimed_until IS NULL OR {d}.claimed_until < now())"


# Due heads, oldest first (index webhook_deliveries_queue): a scan in queue order that looks
# up, per row, an older pending row of the same user (primary key); at most {limit} of them.
_DUE_WHERE = f"""
FROM webhook_deliveries h
WHERE h.url = $1 AND h.parked_at IS NULL AND {_free("h")} AND {_is_head("h")}
ORDER BY h.txid, h.event_id
LIMIT {{limit}}
"""
_DUE = "SELECT h.user_id, h.txid, h.event_id" + _DUE_WHERE
_CLAIMED = """
RETURNING d.user_id, d.txid, d.event_id, d.command, d.body, d.client_ip, d.platform,
          d.event_at, d.attempts, d.queued_at
"""
# One statement: claim the due heads _DUE finds, found once (MATERIALIZED) and then each
# updated by its row address: a plan made on a queue analyzed while empty nested the search
# inside a scan of the queue (682 searches for 19 rows, 2.7 s). A row another sender claimed
# or marked meanwhile has moved (its new version fails d.ctid = due.ctid) and is left out.
# The limit is written into the text, one prepared statement per batch size: with LIMIT $n
# PostgreSQL's generic plan guesses a tenth of the table.
_CLAIM_DUE = f"""
WITH due AS MATERIALIZED (SELECT h.ctid{_DUE_WHERE})
UPDATE webhook_deliveries d
SET claimed_until = now() + $2 * interval '1 second', claim = $3
FROM due
WHERE d.ctid = due.ctid AND d.url = $1 AND d.parked_at IS NULL AND {_free("d")}
{_CLAIMED}"""  # noqa: S608 - made of constants
# On Citus, where _CLAIM_DUE would be a multi-shard UPDATE of every shard (and one pruned by
# user_id = ANY(...) is not a router query either: its first run on a connection took 1-5 s
# on the test clusters): claim each head a first statement found, one single-shard statement
# per user (event_id names a URL's delivery: one outbox event, one row), if it is still a
# head, due and free.
_CLAIM_ONE = f"""
UPDATE webhook_deliveries d
SET claimed_until = now() + $4 * interval '1 second', claim = $5
WHERE d.user_id = $2 AND d.url = $1 AND d.event_id = $3
  AND d.parked_at IS NULL AND {_free("d")} AND {_is_head("d")}
{_CLAIMED}"""  # noqa: S608 - made of constants
# Delivered (2xx): the rows of one claim go, if the claim is still theirs.
_DELIVERED = """
DELETE FROM webhook_deliveries
WHERE url = $1 AND user_id = ANY($2::text[]) AND event_id = ANY($3::bigint[]) AND claim = $4
RETURNING event_id
"""
# On Citus, one user's (a router query).
_DELIVERED_ONE = """
DELETE FROM webhook_deliveries
WHERE url = $1 AND user_id = $2 AND event_id = $3 AND claim = $4
RETURNING event_id
"""
# Given back unsent (a clean stop): free again at once, if the claim is still theirs.
_RELEASE_ONE = """
UPDATE webhook_deliveries SET claimed_until = NULL, claim = NULL
WHERE url = $1 AND user_id = $2 AND event_id = $3 AND claim = $4
"""
# A failure: the next try's time, or parked (the times are computed by the caller: Citus
# refuses now() beside a column in an UPDATE's SET).
_FAILED = """
UPDATE webhook_deliveries
SET attempts = attempts + 1, claimed_until = NULL, claim = NULL, last_error = $6,
    parked_at = $7, next_at = $8
WHERE user_id = $1 AND url = $2 AND txid = $3 AND event_id = $4 AND claim = $5
RETURNING attempts
"""
_BACKLOG = """
SELECT count(*) FILTER (WHERE parked_at IS NULL), count(*) FILTER (WHERE parked_at IS NOT NULL)
FROM webhook_deliveries WHERE url = $1
"""
_PARKED_USERS = """
SELECT DISTINCT user_id FROM webhook_deliveries WHERE parked_at < now() - $1 * interval '1 second'
LIMIT $2
"""
_DELETE_PARKED = """
DELETE FROM webhook_deliveries
WHERE user_id = ANY($1::text[]) AND parked_at < now() - $2 * interval '1 second'
"""


# Not frozen: a frozen dataclass's __init__ sets each field through object.__setattr__, ~5
# times the cost of a plain one, and one Queued and one Delivery are made per webhook.
# Nothing changes them once made.
@dataclass(slots=True)
class Queued:
    """One outbox event's webhook, ready to queue for a URL."""

    user_id: str
    txid: int
    event_id: int
    command: str
    body: str
    client_ip: str
    platform: str
    event_at_us: int


@dataclass(slots=True)
class Delivery(Queued):
    """One claimed delivery: a queued webhook, the URL it goes to, and the claim on it."""

    url: str
    attempts: int  # failed tries before this one
    queued_at_us: int  # when the feeder queued it: the retry budget counts from here
    claim: int  # the claim token of the batch that claimed it


async def ensure_positions(conn: Any, urls: Sequence[str], start: Position) -> None:
    """Give each URL without a position one at `start` (a URL seen for the first time gets
    the events that commit from now on, not the whole retained history)."""
    await conn.executemany(_ENSURE, [(url, start.txid, start.id) for url in urls])


async def positions(conn: Any, urls: Sequence[str]) -> dict[str, Position]:
    rows = await conn.fetch(_POSITIONS, list(urls))
    return {r[0]: Position(r[1], r[2]) for r in rows}


class _MovedError(Exception):
    """The position moved under this feeder: its transaction is rolled back."""


async def queue(
    conn: Any,
    url: str,
    after: Position,
    through: Position,
    items: Sequence[Queued],
    distributed: bool = False,
) -> bool:
    """Queue `items` for `url` and move its position from `after` to `through`, in one
    transaction; False (nothing done) when the position was no longer `after` (another
    feeder moved it). Off Citus the rows go in one statement (_INSERT_MANY); on Citus
    (`distributed`) one single-shard INSERT each, as the other statements there."""
    try:
        async with conn.transaction():
            status: str = await conn.execute(
                _ADVANCE, url, through.txid, through.id, after.txid, after.id
            )
            if status != "UPDATE 1":
                raise _MovedError
            if items and distributed:
                await conn.executemany(_INSERT, [_insert_args(url, q) for q in items])
            elif items:
                await conn.execute(_INSERT_MANY, url, *_columns(items))
    except _MovedError:
        return False
    return True


def _columns(items: Sequence[Queued]) -> tuple[list[Any], ...]:
    """The queued rows as one array per column, in _INSERT_MANY's and _FEED's order."""
    return (
        [q.user_id for q in items],
        [q.txid for q in items],
        [q.event_id for q in items],
        [q.command for q in items],
        [q.body for q in items],
        [q.client_ip for q in items],
        [q.platform for q in items],
        [q.event_at_us for q in items],
    )


async def queue_claiming(
    conn: Any,
    url: str,
    after: Position,
    through: Position,
    items: Sequence[Queued],
    limit: int,
    lease_seconds: float,
    token: int,
) -> list[Delivery] | None:
    """As queue() off Citus, in one autocommitted statement (_FEED; queue() takes a
    transaction of four), and claiming at once, under `token` for `lease_seconds`, up to
    `limit` of the rows queued that are their user's head (each user's first of `items`, if
    nothing of the user is pending before it). The deliveries so claimed, in queue order
    (the caller sends them as if claim() had returned them); None (nothing done) when the
    position was no longer `after`."""
    flags: list[bool] = []  # the first row of each of the first `limit` users
    users: set[str] = set()
    for q in items:
        flags.append(q.user_id not in users and len(users) < limit)
        users.add(q.user_id)
    rows = await conn.fetch(
        _FEED,
        url,
        through.txid,
        through.id,
        after.txid,
        after.id,
        *_columns(items),
        flags,
        lease_seconds,
        token,
    )
    if not rows[0][0]:
        return None
    claimed = {r[1]: r[2] for r in rows if r[3] == token}
    return [
        Delivery(
            q.user_id,
            q.txid,
            q.event_id,
            q.command,
            q.body,
            q.client_ip,
            q.platform,
            q.event_at_us,
            url,
            0,
            claimed[q.event_id],
            token,
        )
        for q in items
        if q.event_id in claimed
    ]


def _insert_args(url: str, q: Queued) -> tuple[Any, ...]:
    """_INSERT's parameters for one delivery."""
    return (
        q.user_id,
        url,
        q.txid,
        q.event_id,
        q.command,
        q.body,
        q.client_ip,
        q.platform,
        q.event_at_us,
    )


async def claim(
    conn: Any, url: str, limit: int, lease_seconds: float, token: int, distributed: bool = False
) -> list[Delivery]:
    """Claim up to `limit` users' heads to `url` that are due and free, oldest first, for
    `lease_seconds` under `token`: at most one delivery per user. One short autocommitted
    statement; on Citus (`distributed`) a search of the due heads (read-only), then a
    single-shard claim per user if it is still free (a sender elsewhere may have taken some
    meanwhile: those are left out)."""
    if distributed:
        due = await conn.fetch(_DUE.format(limit=int(limit)), url)
        rows = []
        for head in due:
            row = await conn.fetchrow(_CLAIM_ONE, url, head[0], head[2], lease_seconds, token)
            if row is not None:
                rows.append(row)
    else:
        sql = _CLAIM_DUE.format(limit=int(limit))
        rows = await conn.fetch(sql, url, lease_seconds, token)
    claimed = [
        Delivery(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], url, r[8], r[9], token)
        for r in rows
    ]
    claimed.sort(key=lambda d: (d.txid, d.event_id))
    return claimed


def _by_claim(deliveries: Sequence[Delivery]) -> dict[int, list[Delivery]]:
    by_claim: dict[int, list[Delivery]] = {}
    for d in deliveries:
        by_claim.setdefault(d.claim, []).append(d)
    return by_claim


async def delivered(
    conn: Any, url: str, done: Sequence[Delivery], distributed: bool = False
) -> set[int]:
    """Delivered (a 2xx): their rows go, one statement per claim token (on Citus, per row).
    The event ids of the rows deleted; a delivery missing from it had lost its claim."""
    gone: set[int] = set()
    if distributed:
        for d in done:
            event_id = await conn.fetchval(_DELIVERED_ONE, url, d.user_id, d.event_id, d.claim)
            if event_id is not None:
                gone.add(event_id)
        return gone
    for token, ds in _by_claim(done).items():
        rows = await conn.fetch(
            _DELIVERED, url, [d.user_id for d in ds], [d.event_id for d in ds], token
        )
        gone.update(r[0] for r in rows)
    return gone


async def release(conn: Any, url: str, unsent: Sequence[Delivery]) -> None:
    """Give claimed deliveries back unsent (their leases end now, where still theirs); one
    short statement each (a clean stop's few)."""
    for d in unsent:
        await conn.execute(_RELEASE_ONE, url, d.user_id, d.event_id, d.claim)


async def failed(
    conn: Any, d: Delivery, error: str, backoff_seconds: float, budget_seconds: float
) -> tuple[bool, int] | None:
    """Not done: retry after `backoff_seconds`, or park it once `budget_seconds` have passed
    since it was queued; the last retry is due when the budget ends, so every webhook gets a
    try at its end. (parked, attempts so far), or None when the claim had been lost."""
    now_us = int(time.time() * 1_000_000)
    budget_end = d.queued_at_us + int(budget_seconds * 1_000_000)
    parked = now_us >= budget_end
    next_at = min(now_us + int(backoff_seconds * 1_000_000), budget_end)
    attempts = await conn.fetchval(
        _FAILED,
        d.user_id,
        d.url,
        d.txid,
        d.event_id,
        d.claim,
        error[:500],
        now_us if parked else None,
        next_at,
    )
    return None if attempts is None else (parked, int(attempts))


async def backlog(conn: Any, url: str) -> tuple[int, int]:
    """(deliveries pending, deliveries parked) for `url`."""
    r = await conn.fetchrow(_BACKLOG, url)
    return int(r[0]), int(r[1])


async def delete_parked(conn: Any, older_than_seconds: float, users: int = 500) -> int:
    """Delete parked deliveries parked over `older_than_seconds` ago, for up to `users`
    users at a time (one statement pruned to their shards). The number deleted."""
    rows = await conn.fetch(_PARKED_USERS, older_than_seconds, users)
    if not rows:
        return 0
    status: str = await conn.execute(_DELETE_PARKED, [r[0] for r in rows], older_than_seconds)
    return int(status.rsplit(" ", 1)[1])
