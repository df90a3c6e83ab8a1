"""The webhook delivery queue's claim protocol (server.webhook_queue) on a real database (also
under make test-citus): a batch claims each user's oldest due delivery, oldest first, at most
one per user; a leased, backing-off or parked head holds its user's later deliveries back
(a parked one lets them go); a claim that ran out deletes nothing when its request ends."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

import asyncpg
import pytest

from server import webhook_queue
from server.database import has_citus, use_int_timestamps
from server.outbox import START, Position
from server.webhook_queue import Delivery, Queued
from tests.conftest import skip_on_citus

URL = "http://127.0.0.1:9/hook"
LEASE = 30.0


@pytest.fixture
async def conn(db_url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(db_url)
    await use_int_timestamps(connection)
    yield connection
    await connection.close()


async def _queue(conn: asyncpg.Connection, *events: tuple[str, int]) -> None:
    """Queue one delivery per (user, event id), in that order (the outbox order)."""
    items = [
        Queued(user, event_id, event_id, "c", f'{{"e":{event_id}}}', "", "gRPC", 1_000_000)
        for user, event_id in events
    ]
    await webhook_queue.ensure_positions(conn, [URL], START)
    last = events[-1][1]
    assert await webhook_queue.queue(conn, URL, START, Position(last, last), items)


async def _claim(
    conn: asyncpg.Connection, limit: int, token: int, lease: float = LEASE
) -> list[Delivery]:
    """A sender's claim: one statement, or on Citus the pruned two."""
    return await webhook_queue.claim(conn, URL, limit, lease, token, await has_citus(conn))


async def _delivered(conn: asyncpg.Connection, done: list[Delivery]) -> set[int]:
    return await webhook_queue.delivered(conn, URL, done, await has_citus(conn))


def _keys(batch: list[Delivery]) -> list[tuple[str, int]]:
    return [(d.user_id, d.event_id) for d in batch]


async def test_a_batch_claims_each_users_oldest_delivery_oldest_first(
    conn: asyncpg.Connection,
) -> None:
    """Up to the limit, in queue order, one per user: a user's second delivery waits for
    its first even when the batch has room; the claimed ones carry the batch's token."""
    await _queue(conn, ("a", 1), ("b", 2), ("a", 3), ("c", 4), ("d", 5))
    first = await _claim(conn, 2, 11)
    assert _keys(first) == [("a", 1), ("b", 2)]
    assert {d.claim for d in first} == {11}
    assert (first[0].body, first[0].url, first[0].attempts) == ('{"e":1}', URL, 0)
    rest = await _claim(conn, 10, 12)
    assert _keys(rest) == [("c", 4), ("d", 5)]
    assert await _claim(conn, 10, 13) == []


async def test_queue_writes_every_field_of_a_batch_once(conn: asyncpg.Connection) -> None:
    """A batch queued in one statement keeps each delivery's fields, its event time to the
    microsecond; a delivery queued again (a feeder retrying after a crash) stays one row."""
    distributed = await has_citus(conn)
    items = [
        Queued("a", 7, 1, "cmd.a", '{"e":1}', "10.0.0.1", "Web", 1_700_000_000_123_457),
        Queued("b", 7, 2, "cmd.b", '{"e":2}', "", "gRPC", 1_700_000_000_999_999),
    ]
    await webhook_queue.ensure_positions(conn, [URL], START)
    assert await webhook_queue.queue(conn, URL, START, Position(7, 1), items[:1], distributed)
    assert await webhook_queue.queue(conn, URL, Position(7, 1), Position(7, 2), items, distributed)
    claimed = await _claim(conn, 10, 21)
    assert [Queued(*dataclasses.astuple(d)[:8]) for d in claimed] == items
    assert await conn.fetchval("SELECT count(*) FROM webhook_deliveries") == 2


async def test_delivered_deletes_a_batch_and_frees_each_users_next(
    conn: asyncpg.Connection,
) -> None:
    """Marking several 2xx at once deletes their rows (the event ids returned); each user's
    next delivery is then its head and is claimed."""
    await _queue(conn, ("a", 1), ("b", 2), ("a", 3), ("b", 4))
    batch = await _claim(conn, 10, 21)
    assert await _delivered(conn, batch) == {1, 2}
    assert _keys(await _claim(conn, 10, 22)) == [("a", 3), ("b", 4)]


async def test_a_claim_that_ran_out_deletes_nothing(conn: asyncpg.Connection) -> None:
    """A lease that ran out lets another sender claim the row under its own token; the first
    sender's 2xx then deletes nothing (it is not counted twice), the second's does."""
    await _queue(conn, ("a", 1))
    (stale,) = await _claim(conn, 10, 31, lease=-1.0)  # a lease already over
    (taken,) = await _claim(conn, 10, 32)
    assert taken.event_id == stale.event_id
    assert await _delivered(conn, [stale]) == set()
    assert await _delivered(conn, [taken]) == {1}
    forged = dataclasses.replace(taken, claim=33)
    assert await _delivered(conn, [forged]) == set()


async def test_a_backing_off_head_holds_its_user_back(conn: asyncpg.Connection) -> None:
    """A failed delivery waits for its backoff, and its user's later ones wait behind it;
    other users go on."""
    await _queue(conn, ("a", 1), ("a", 2), ("b", 3))
    (a1, b3) = await _claim(conn, 10, 41)
    assert await webhook_queue.failed(conn, a1, "HTTP 500", 60.0, 3600.0) == (False, 1)
    assert await _delivered(conn, [b3]) == {3}
    assert await _claim(conn, 10, 42) == []


async def test_a_parked_head_lets_its_users_next_go(conn: asyncpg.Connection) -> None:
    """Past the retry budget a failure parks the row; the user's next delivery becomes its
    head, and the parked row is never claimed again."""
    await _queue(conn, ("a", 1), ("a", 2))
    (a1,) = await _claim(conn, 10, 51)
    assert await webhook_queue.failed(conn, a1, "HTTP 500", 60.0, 0.0) == (True, 1)
    assert _keys(await _claim(conn, 10, 52)) == [("a", 2)]
    assert await webhook_queue.backlog(conn, URL) == (1, 1)


async def test_released_deliveries_are_claimed_again_at_once(conn: asyncpg.Connection) -> None:
    """Deliveries given back unsent (a clean stop) are free at once, not after their lease;
    a release under a claim that is no longer theirs changes nothing."""
    await _queue(conn, ("a", 1), ("b", 2))
    batch = await _claim(conn, 10, 61)
    await webhook_queue.release(conn, URL, [dataclasses.replace(batch[0], claim=62)])
    assert await _claim(conn, 10, 63) == []
    await webhook_queue.release(conn, URL, batch)
    assert _keys(await _claim(conn, 10, 64)) == [("a", 1), ("b", 2)]


@skip_on_citus("on Citus the feeder queues and the senders claim")
async def test_the_feeder_claims_the_heads_it_queues_for_its_sender(
    conn: asyncpg.Connection,
) -> None:
    """queue_claiming (off Citus) queues a batch and claims, under its token, up to its limit
    of the batch's heads: each user's first row, unless the user has a delivery pending
    before it. The rest stay queued for a claim, which finds them once their turn comes; a
    position moved under the feeder queues and claims nothing."""
    await _queue(conn, ("p", 1))  # user p has a delivery pending before the batch
    items = [
        Queued(user, event_id, event_id, "c", f'{{"e":{event_id}}}', "", "gRPC", 1_000_000)
        for user, event_id in [("a", 2), ("p", 3), ("a", 4), ("b", 5), ("c", 6)]
    ]
    stale = await webhook_queue.queue_claiming(
        conn, URL, START, Position(6, 6), items, 10, LEASE, 41
    )
    assert stale is None  # the position is (1, 1), not START
    assert await conn.fetchval("SELECT count(*) FROM webhook_deliveries") == 1
    handed = await webhook_queue.queue_claiming(
        conn, URL, Position(1, 1), Position(6, 6), items, 2, LEASE, 42
    )
    assert handed is not None
    assert _keys(handed) == [("a", 2)]  # p's waits for 1; b and c are past 2 users
    assert (handed[0].claim, handed[0].attempts, handed[0].body) == (42, 0, '{"e":2}')
    assert handed[0].queued_at_us > 0
    assert await conn.fetchval("SELECT count(*) FROM webhook_deliveries") == 6
    assert _keys(await _claim(conn, 10, 43)) == [("p", 1), ("b", 5), ("c", 6)]
    assert await _delivered(conn, handed) == {2}
    assert _keys(await _claim(conn, 10, 44)) == [("a", 4)]
