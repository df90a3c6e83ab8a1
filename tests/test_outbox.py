"""The change-event outbox (server.store writes it, server.outbox reads it): one row per
acknowledged change, written in the change's transaction and nowhere else; read past a
visibility horizon so that no row is skipped, and one user's rows in commit order."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import pytest

from follow.v1 import follow_pb2 as pb
from follow.v1 import follow_pb2_grpc as pb_grpc
from server import outbox
from server.outbox import ACCOUNT_DELETED, FOLLOWED, START, UNFOLLOWED, OutboxRow, Position
from tests.conftest import ServiceFactory
from tests.helpers import import_users

pytest_plugins = ["tests.v4_fixtures"]


@pytest.fixture
async def conn(db_url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(db_url)
    yield connection
    await connection.close()


async def settled_horizon(conn: asyncpg.Connection, wait: bool = True) -> int:
    """The horizon, once it has passed every row visible now (up to 10 s): transaction ids
    are cluster-wide, so another database's transaction on the same test cluster (a server
    of the previous test still stopping) may hold it back for a moment."""
    distributed = await outbox.is_distributed(conn)
    newest = await conn.fetchval("SELECT max(txid)::text::bigint FROM follow_events")
    deadline = asyncio.get_running_loop().time() + (10 if wait else 0)
    while True:
        below = await outbox.horizon(conn, distributed)
        if newest is None or below > newest or asyncio.get_running_loop().time() >= deadline:
            return below
        await asyncio.sleep(0.05)


async def read_all(
    conn: asyncpg.Connection, after: Position = START, wait: bool = True
) -> list[OutboxRow]:
    below = await settled_horizon(conn, wait)
    return await outbox.read_after(conn, after, below, 10_000)


async def test_follow_records_only_the_targets_really_followed(
    make_service: ServiceFactory, conn: asyncpg.Connection
) -> None:
    """One row per Follow call: the new edges only (not the already followed, unknown or
    over-cap targets), the ones that became mutual, the time of the call, and the caller's
    gRPC address."""
    service = await make_service(max_following=3)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        follow = pb_grpc.FollowServiceStub(channel)
        await import_users(pb_grpc.AccountServiceStub(channel), "a", "b", "c", "d", "e")
        await follow.Follow(pb.FollowRequest(user_id="b", target_ids=["a"]))
        await follow.Follow(pb.FollowRequest(user_id="a", target_ids=["c"]))
        answer = await follow.Follow(
            pb.FollowRequest(user_id="a", target_ids=["c", "ghost", "b", "d", "e"])
        )
    assert [r.code for r in answer.results][-1] != 0  # e: over the cap of 3
    rows = await read_all(conn)
    assert [(r.user_id, r.kind, r.others, r.mutual) for r in rows] == [
        ("b", FOLLOWED, ("a",), frozenset()),
        ("a", FOLLOWED, ("c",), frozenset()),
        ("a", FOLLOWED, ("b", "d"), frozenset({"b"})),
    ]
    assert {(r.client_ip, r.platform) for r in rows} == {("127.0.0.1", "gRPC")}
    times = await conn.fetch(
        "SELECT followed_at FROM following WHERE user_id = 'a' AND target_id = ANY('{b,d}')"
    )
    expected = {
        (t[0] - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1) for t in times
    }
    assert {rows[-1].at_us} == expected
    assert len({r.id for r in rows}) == 3


async def test_unfollow_records_only_edges_that_existed(
    make_service: ServiceFactory, conn: asyncpg.Connection
) -> None:
    """An Unfollow writes the edges it removed and the pairs that stopped being mutual; one
    that removes nothing writes nothing."""
    service = await make_service()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        follow = pb_grpc.FollowServiceStub(channel)
        await import_users(pb_grpc.AccountServiceStub(channel), "a", "b", "c")
        await follow.Follow(pb.FollowRequest(user_id="a", target_ids=["b", "c"]))
        await follow.Follow(pb.FollowRequest(user_id="b", target_ids=["a"]))
        await follow.Unfollow(pb.UnfollowRequest(user_id="a", target_ids=["b", "c"]))
        await follow.Unfollow(pb.UnfollowRequest(user_id="a", target_ids=["b", "c"]))
    rows = await read_all(conn)
    assert [(r.user_id, r.kind, r.others, r.mutual) for r in rows] == [
        ("a", FOLLOWED, ("b", "c"), frozenset()),
        ("b", FOLLOWED, ("a",), frozenset({"a"})),
        ("a", UNFOLLOWED, ("b", "c"), frozenset({"b"})),
    ]


async def test_failed_and_unchanged_calls_write_nothing(
    make_service: ServiceFactory, conn: asyncpg.Connection
) -> None:
    """An unknown acting user (NOT_FOUND), a follow of only unknown or already-followed
    targets, and an unfollow of edges that do not exist leave the outbox as it was."""
    service = await make_service()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        follow = pb_grpc.FollowServiceStub(channel)
        await import_users(pb_grpc.AccountServiceStub(channel), "a", "b")
        await follow.Follow(pb.FollowRequest(user_id="a", target_ids=["b"]))
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await follow.Follow(pb.FollowRequest(user_id="nobody", target_ids=["a"]))
        assert failed.value.code() == grpc.StatusCode.NOT_FOUND
        await follow.Follow(pb.FollowRequest(user_id="a", target_ids=["b", "ghost"]))
        await follow.Unfollow(pb.UnfollowRequest(user_id="b", target_ids=["a"]))
    rows = await read_all(conn)
    assert [(r.user_id, r.kind) for r in rows] == [("a", FOLLOWED)]


async def test_account_deletion_writes_one_event(
    make_service: ServiceFactory, conn: asyncpg.Connection
) -> None:
    """Deleting an account writes one ACCOUNT_DELETED event for it (not one per edge: the
    event means every edge of that account is gone); an unknown id writes none."""
    service = await make_service()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        accounts = pb_grpc.AccountServiceStub(channel)
        await import_users(accounts, "a", "b")
        await pb_grpc.FollowServiceStub(channel).Follow(
            pb.FollowRequest(user_id="b", target_ids=["a"])
        )
        await accounts.DeleteAccounts(pb.DeleteAccountsRequest(user_ids=["a", "ghost"]))
    rows = await read_all(conn)
    assert [(r.user_id, r.kind, r.others) for r in rows] == [
        ("b", FOLLOWED, ("a",)),
        ("a", ACCOUNT_DELETED, ()),
    ]


async def test_v4_calls_record_restapi_and_the_http_client(
    make_shim: object, conn: asyncpg.Connection
) -> None:
    """A change made through the v4 door is recorded with platform RESTAPI and the HTTP
    client's address, as the hosted service's webhooks report it."""
    v4 = await make_shim()  # type: ignore[operator]
    await v4.import_users("a", "b")
    await v4.ok("follow_add", {"From_Account": "a", "FollowItem": [{"To_Account": "b"}]})
    rows = await read_all(conn)
    assert [(r.user_id, r.others, r.client_ip, r.platform) for r in rows] == [
        ("a", ("b",), "127.0.0.1", "RESTAPI")
    ]


async def _insert_event(conn: asyncpg.Connection, user_id: str) -> None:
    await conn.execute(
        "INSERT INTO follow_events (user_id, kind, others, at) VALUES ($1, 1, '{x}', now())",
        user_id,
    )


async def test_a_row_committed_late_is_not_skipped(db_url: str, conn: asyncpg.Connection) -> None:
    """A transaction that took its id first but commits last holds the horizon: a reader
    sees neither it nor anything after it until it commits, then sees both, in order; a
    reader that had resumed past a later id would have lost it."""
    slow = await asyncpg.connect(db_url)
    fast = await asyncpg.connect(db_url)
    try:
        slow_tx = slow.transaction()
        await slow_tx.start()
        await _insert_event(slow, "slow")  # the lower transaction id, not committed
        await _insert_event(fast, "fast")  # a higher id, committed at once
        assert [r.user_id for r in await read_all(conn, wait=False)] == []
        await slow_tx.commit()
        rows = await read_all(conn)
        assert [r.user_id for r in rows] == ["slow", "fast"]
        assert rows[0].position < rows[1].position
        assert await read_all(conn, rows[-1].position) == []
    finally:
        await slow.close()
        await fast.close()


async def test_a_rolled_back_change_leaves_no_row(db_url: str, conn: asyncpg.Connection) -> None:
    """A rolled-back transaction's event never appears, and does not hold readers back."""
    other = await asyncpg.connect(db_url)
    try:
        tx = other.transaction()
        await tx.start()
        await _insert_event(other, "gone")
        await _insert_event(conn, "kept")
        await tx.rollback()
        assert [r.user_id for r in await read_all(conn)] == ["kept"]
    finally:
        await other.close()


async def test_one_users_events_are_in_commit_order(
    make_service: ServiceFactory, conn: asyncpg.Connection
) -> None:
    """Many concurrent calls by one user, whose targets sort before and after it (a share
    lock on an earlier target gives a transaction its id before it holds the user's own
    lock): read in (txid, id) order, the user's events come in the order they took effect,
    which is the order of their call times (each call's time is read under the user's
    lock)."""
    service = await make_service()
    users = ["m", *(f"a{i}" for i in range(8)), *(f"z{i}" for i in range(8))]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        follow = pb_grpc.FollowServiceStub(channel)
        await import_users(pb_grpc.AccountServiceStub(channel), *users)
        rng = random.Random(7)

        async def actor(n: int) -> None:
            for _ in range(25):
                targets = rng.sample(users[1:], 3)
                if rng.random() < 0.5:
                    await follow.Follow(pb.FollowRequest(user_id="m", target_ids=targets))
                else:
                    await follow.Unfollow(pb.UnfollowRequest(user_id="m", target_ids=targets))

        async def others(n: int) -> None:
            for _ in range(25):
                user = rng.choice(users[1:])
                await follow.Follow(pb.FollowRequest(user_id=user, target_ids=["m"]))
                await follow.Unfollow(pb.UnfollowRequest(user_id=user, target_ids=["m"]))

        await asyncio.gather(*(actor(n) for n in range(6)), *(others(n) for n in range(4)))
    mine = [r for r in await read_all(conn) if r.user_id == "m"]
    assert len(mine) > 20
    assert [r.at_us for r in mine] == sorted(r.at_us for r in mine)
    # Replaying m's events in reading order gives exactly whom m follows now.
    follows: set[str] = set()
    for r in mine:
        if r.kind == FOLLOWED:
            assert not follows & set(r.others)
            follows |= set(r.others)
        else:
            assert set(r.others) <= follows
            follows -= set(r.others)
    stored = await conn.fetch("SELECT target_id FROM following WHERE user_id = 'm'")
    assert follows == {r[0] for r in stored}


async def test_reading_with_a_user_filter_and_limit(conn: asyncpg.Connection) -> None:
    """A reader may ask for some acting users only, and pages through with a limit."""
    for user in ["a", "b", "a", "c", "a"]:
        await _insert_event(conn, user)
    below = await settled_horizon(conn)
    first = await outbox.read_after(conn, START, below, 2, ["a", "c"])
    assert [r.user_id for r in first] == ["a", "a"]
    rest = await outbox.read_after(conn, first[-1].position, below, 10, ["a", "c"])
    assert [r.user_id for r in rest] == ["c", "a"]


async def test_read_final_is_the_horizon_the_rows_below_it_and_the_floor(
    db_url: str, conn: asyncpg.Connection
) -> None:
    """read_final (one statement off Citus) gives what horizon, read_after and floor give
    in turn: the rows below its horizon after the position, filtered and limited, the floor;
    no row past an uncommitted transaction's, and none (with the horizon and floor still)
    past the last."""
    distributed = await outbox.is_distributed(conn)
    for user in ["a", "b", "a", "c", "a"]:
        await _insert_event(conn, user)
    await settled_horizon(conn)
    rows, below, floor = await outbox.read_final(conn, START, 10, distributed)
    assert rows == await outbox.read_after(conn, START, below, 10)
    assert [r.user_id for r in rows] == ["a", "b", "a", "c", "a"]
    assert all(r.txid < below for r in rows)
    assert floor == await outbox.floor(conn)
    some, _, _ = await outbox.read_final(conn, rows[0].position, 2, distributed, ["a", "c"])
    assert [r.position for r in some] == [rows[2].position, rows[3].position]
    slow = await asyncpg.connect(db_url)
    try:
        async with slow.transaction():
            await _insert_event(slow, "slow")  # holds the horizon until it commits
            await _insert_event(conn, "fast")
            late, held, _ = await outbox.read_final(conn, rows[-1].position, 10, distributed)
            assert late == []
            assert held <= await slow.fetchval("SELECT pg_current_xact_id()::text::bigint")
    finally:
        await slow.close()
    await settled_horizon(conn)
    late, _, _ = await outbox.read_final(conn, rows[-1].position, 10, distributed)
    assert [r.user_id for r in late] == ["slow", "fast"]
    none, below, floor = await outbox.read_final(conn, late[-1].position, 10, distributed)
    assert none == []
    assert below > late[-1].txid
    assert floor == START


async def test_now_position_skips_the_past_only(conn: asyncpg.Connection) -> None:
    """A reader starting "from now" sees the events committed after it started, none
    before."""
    await _insert_event(conn, "old")
    start = await outbox.now_position(conn, await outbox.is_distributed(conn))
    await _insert_event(conn, "new")
    assert [r.user_id for r in await read_all(conn, start)] == ["new"]


async def test_retention_deletes_the_old_prefix_and_raises_the_floor(
    conn: asyncpg.Connection,
) -> None:
    """Expired rows go oldest first, in bounded batches, never past what consumers still
    need (`through`); the floor says up to where rows are gone."""
    for user in ["a", "b", "c", "d"]:
        await _insert_event(conn, user)
    await conn.execute(
        "UPDATE follow_events SET at = now() - interval '8 days' WHERE user_id <> 'd'"
    )
    rows = await read_all(conn)
    below = await settled_horizon(conn)
    cutoff = datetime.now(UTC) - timedelta(days=7)
    # A consumer still needs everything after b: c stays though expired.
    assert await outbox.delete_expired(conn, cutoff, rows[1].position, below, 1) == 1
    assert await outbox.floor(conn) == rows[0].position
    assert await outbox.delete_expired(conn, cutoff, rows[1].position, below, 10) == 1
    assert await outbox.delete_expired(conn, cutoff, rows[1].position, below, 10) == 0
    assert await outbox.floor(conn) == rows[1].position
    assert [r.user_id for r in await read_all(conn)] == ["c", "d"]
    everything = Position(below, outbox.MAX_ID)
    assert await outbox.delete_expired(conn, cutoff, everything, below, 10) == 1
    assert [r.user_id for r in await read_all(conn)] == ["d"]  # not expired
