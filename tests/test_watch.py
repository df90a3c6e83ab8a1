"""follow.v1.EventService/Watch over a real channel to a real server (server.watch_servicer,
server.watch_hub, server.watch_token): per-edge events with their fields, filters, only-new,
resuming inside a call's events, no gap under concurrent writers and late commits, tokens,
retention, flow control, the watcher cap, shutdown and restarts."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import pytest

from follow.v1 import events_pb2 as ev
from follow.v1 import events_pb2_grpc as ev_grpc
from follow.v1 import follow_pb2 as pb
from follow.v1 import follow_pb2_grpc as pb_grpc
from server import outbox
from server.app import RunningService
from server.outbox import Position
from server.watch_token import Cursor, WatchTokens
from tests.helpers import error_info, import_users

WAIT = 60.0  # generous: a loaded 2-core box, or Citus


@pytest.fixture
async def conn(db_url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(db_url)
    yield connection
    await connection.close()


def summary(e: ev.Event) -> tuple[str, str, str, str]:
    return (
        ev.EventKind.Name(e.kind).removeprefix("EVENT_KIND_"),
        e.user_id,
        e.other_user_id,
        ev.MutualChange.Name(e.mutual_change).removeprefix("MUTUAL_CHANGE_"),
    )


class Watcher:
    """One Watch call and what it received (heartbeats kept apart). A task reads the stream
    into a queue: a timed-out read of the call itself would cancel the call."""

    def __init__(self, channel: grpc.aio.Channel, request: ev.WatchRequest) -> None:
        self.call = ev_grpc.EventServiceStub(channel).Watch(request)
        self.events: list[ev.Event] = []
        self.heartbeats: list[ev.Event] = []
        self._queue: asyncio.Queue[ev.Event | BaseException | None] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for message in self.call:
                self._queue.put_nowait(message)
            self._queue.put_nowait(None)
        except BaseException as exc:  # the error, or the cancellation, is the test's to see
            self._queue.put_nowait(exc)

    async def next(self) -> ev.Event:
        """The next message, heartbeats included; AssertionError if the stream ended."""
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._queue.put_nowait(item)
            raise item
        assert item is not None, "the stream ended with OK"
        if item.kind == ev.EVENT_KIND_HEARTBEAT:
            self.heartbeats.append(item)
        else:
            self.events.append(item)
        return item

    async def take(self, n: int, within: float = WAIT) -> list[ev.Event]:
        """The next `n` events (heartbeats are recorded and skipped)."""
        got: list[ev.Event] = []
        async with asyncio.timeout(within):
            while len(got) < n:
                message = await self.next()
                if message.kind != ev.EVENT_KIND_HEARTBEAT:
                    got.append(message)
        return got

    async def heartbeat(self, within: float = WAIT) -> ev.Event:
        """Read until the next heartbeat; events on the way are recorded."""
        async with asyncio.timeout(within):
            while (message := await self.next()).kind != ev.EVENT_KIND_HEARTBEAT:
                pass
        return message

    async def nothing_for(self, seconds: float) -> None:
        """No event (heartbeats allowed) arrives within `seconds`."""
        try:
            async with asyncio.timeout(seconds):
                while True:
                    message = await self.next()
                    assert message.kind == ev.EVENT_KIND_HEARTBEAT, summary(message)
        except TimeoutError:
            pass

    async def failure(self, within: float = WAIT) -> grpc.aio.AioRpcError:
        """Read until the stream fails; its error."""
        async with asyncio.timeout(within):
            try:
                while True:
                    await self.next()
            except grpc.aio.AioRpcError as error:
                return error

    def cancel(self) -> None:
        self.call.cancel()
        self._reader.cancel()


async def until(done: Callable[[], bool], what: str) -> None:
    """Wait (generously) until `done()`."""
    async with asyncio.timeout(WAIT):
        while True:
            if done():
                return
            await asyncio.sleep(0.02)
    raise AssertionError(what)


async def wait_watching(service: RunningService, n: int = 1) -> None:
    """Until the server process serves `n` streams and its tailer has read once."""
    hub = service.watch_hub
    assert hub is not None
    await until(lambda: hub.watchers >= n and hub.tail is not None, f"{n} streams")


async def test_events_carry_their_fields_one_per_edge(
    service: RunningService, channel: grpc.aio.Channel
) -> None:
    """From the oldest event: one Event per edge followed or unfollowed (a Follow of 3 users is
    3 Events sharing the call's id prefix and time), the mutual change of each pair, one
    ACCOUNT_DELETED per deleted account; ids unique, positions set, in commit order."""
    follow = pb_grpc.FollowServiceStub(channel)
    accounts = pb_grpc.AccountServiceStub(channel)
    await import_users(accounts, "a", "b", "c", "d")
    await follow.Follow(pb.FollowRequest(user_id="b", target_ids=["a"]))
    await follow.Follow(pb.FollowRequest(user_id="a", target_ids=["b", "c", "ghost", "d"]))
    await follow.Unfollow(pb.UnfollowRequest(user_id="a", target_ids=["b", "c"]))
    await accounts.DeleteAccounts(pb.DeleteAccountsRequest(user_ids=["d"]))
    watcher = Watcher(channel, ev.WatchRequest())
    got = await watcher.take(7)
    watcher.cancel()
    assert [summary(e) for e in got] == [
        ("FOLLOW", "b", "a", "NONE"),
        ("FOLLOW", "a", "b", "BECAME_MUTUAL"),
        ("FOLLOW", "a", "c", "NONE"),
        ("FOLLOW", "a", "d", "NONE"),
        ("UNFOLLOW", "a", "b", "STOPPED_BEING_MUTUAL"),
        ("UNFOLLOW", "a", "c", "NONE"),
        ("ACCOUNT_DELETED", "d", "", "NONE"),
    ]
    calls = [e.id.split(".") for e in got]
    assert [index for _, index in calls] == ["0", "0", "1", "2", "0", "1", "0"]
    assert len({e.id for e in got}) == 7
    assert calls[1][0] == calls[2][0] == calls[3][0] != calls[0][0]
    assert got[1].event_time == got[2].event_time == got[3].event_time
    now = datetime.now(UTC).timestamp()
    assert all(abs(e.event_time.seconds - now) < 600 for e in got)
    assert len({e.position for e in got} - {""}) == 7


async def test_user_filter_and_only_new(service: RunningService, channel: grpc.aio.Channel) -> None:
    """user_ids keeps the events those users acted; only_new skips everything committed
    before the call and delivers what commits after."""
    follow = pb_grpc.FollowServiceStub(channel)
    await import_users(pb_grpc.AccountServiceStub(channel), "a", "b", "c")
    await follow.Follow(pb.FollowRequest(user_id="a", target_ids=["b"]))  # before: skipped
    fresh = Watcher(channel, ev.WatchRequest(only_new=True))
    only_c = Watcher(channel, ev.WatchRequest(user_ids=["c", "nobody"]))
    await wait_watching(service, 2)
    await follow.Follow(pb.FollowRequest(user_id="b", target_ids=["a"]))
    await follow.Follow(pb.FollowRequest(user_id="c", target_ids=["a", "b"]))
    assert [summary(e)[1:3] for e in await fresh.take(3)] == [("b", "a"), ("c", "a"), ("c", "b")]
    assert [summary(e)[1:3] for e in await only_c.take(2)] == [("c", "a"), ("c", "b")]
    await follow.Unfollow(pb.UnfollowRequest(user_id="a", target_ids=["b"]))
    await follow.Unfollow(pb.UnfollowRequest(user_id="c", target_ids=["b"]))
    assert [summary(e)[:3] for e in await only_c.take(1)] == [("UNFOLLOW", "c", "b")]
    assert [summary(e)[:3] for e in await fresh.take(2)] == [
        ("UNFOLLOW", "a", "b"),
        ("UNFOLLOW", "c", "b"),
    ]
    fresh.cancel()
    only_c.cancel()


async def test_resuming_inside_a_call_repeats_and_skips_nothing(
    service: RunningService, channel: grpc.aio.Channel
) -> None:
    """A stream resumed from the position of the 2nd event of a 3-target Follow continues
    with the 3rd, then the next call's; from the last event of a call, with the next call."""
    follow = pb_grpc.FollowServiceStub(channel)
    await import_users(pb_grpc.AccountServiceStub(channel), "a", "b", "c", "d", "e")
    await follow.Follow(pb.FollowRequest(user_id="a", target_ids=["b", "c", "d"]))
    await follow.Follow(pb.FollowRequest(user_id="e", target_ids=["a"]))
    first = Watcher(channel, ev.WatchRequest())
    got = await first.take(4)
    first.cancel()
    resumed = Watcher(channel, ev.WatchRequest(start_after=got[1].position))
    assert [e.id for e in await resumed.take(2)] == [got[2].id, got[3].id]
    resumed.cancel()
    again = Watcher(channel, ev.WatchRequest(start_after=got[2].position))
    assert [e.id for e in await again.take(1)] == [got[3].id]
    await again.nothing_for(0.5)
    await follow.Follow(pb.FollowRequest(user_id="b", target_ids=["e"]))
    assert [summary(e)[1:3] for e in await again.take(1)] == [("b", "e")]
    again.cancel()


async def _insert_event(conn: asyncpg.Connection, user_id: str, other: str) -> None:
    await conn.execute(
        "INSERT INTO follow_events (user_id, kind, others, at) VALUES ($1, 1, $2, now())",
        user_id,
        [other],
    )


async def test_a_late_commit_is_delivered_not_skipped(
    service: RunningService, channel: grpc.aio.Channel, db_url: str
) -> None:
    """A transaction that took its id first and commits last (forced here: held open while a
    Follow with a later id commits) holds the stream back; once it commits, the stream
    delivers it and then the later one, and a stream resumed from the later one's position
    is not told anything lost."""
    await import_users(pb_grpc.AccountServiceStub(channel), "a", "b")
    watcher = Watcher(channel, ev.WatchRequest(only_new=True))
    await wait_watching(service)
    slow = await asyncpg.connect(db_url)
    try:
        tx = slow.transaction()
        await tx.start()
        await _insert_event(slow, "slow", "x")
        await pb_grpc.FollowServiceStub(channel).Follow(
            pb.FollowRequest(user_id="a", target_ids=["b"])
        )
        await watcher.nothing_for(1.0)
        await tx.commit()
    finally:
        await slow.close()
    got = await watcher.take(2)
    assert [summary(e)[1:3] for e in got] == [("slow", "x"), ("a", "b")]
    watcher.cancel()


async def _graph(conn: asyncpg.Connection) -> set[tuple[str, str]]:
    rows = await conn.fetch("SELECT user_id, target_id FROM following")
    return {(r[0], r[1]) for r in rows}


def _replay(events: list[ev.Event]) -> set[tuple[str, str]]:
    """The follow graph the events describe, checking each step is possible."""
    edges: set[tuple[str, str]] = set()
    for e in events:
        pair = (e.user_id, e.other_user_id)
        if e.kind == ev.EVENT_KIND_FOLLOW:
            assert pair not in edges, f"followed twice without an unfollow: {pair}"
            edges.add(pair)
        elif e.kind == ev.EVENT_KIND_UNFOLLOW:
            assert pair in edges, f"unfollowed an edge not followed: {pair}"
            edges.remove(pair)
    return edges


async def test_concurrent_writers_replayed_equal_the_final_graph(
    service: RunningService, channel: grpc.aio.Channel, conn: asyncpg.Connection
) -> None:
    """8 clients follow and unfollow at random among 10 users while one stream watches
    without a break and another disconnects every few events and resumes from the last
    position it processed: each gets every event once (no gap, no repeat), one user's
    events in the order of their call times, and replaying them gives the final graph."""
    users = [f"u{i}" for i in range(10)]
    await import_users(pb_grpc.AccountServiceStub(channel), *users)
    follow = pb_grpc.FollowServiceStub(channel)
    steady = Watcher(channel, ev.WatchRequest())
    await wait_watching(service)
    calls = 0

    async def writer(seed: int) -> None:
        nonlocal calls
        rng = random.Random(seed)
        for _ in range(40):
            me = rng.choice(users)
            targets = rng.sample([u for u in users if u != me], rng.randint(1, 3))
            if rng.random() < 0.6:
                await follow.Follow(pb.FollowRequest(user_id=me, target_ids=targets))
            else:
                await follow.Unfollow(pb.UnfollowRequest(user_id=me, target_ids=targets))
            calls += 1

    resumed: list[ev.Event] = []

    async def resumer() -> None:
        position = ""
        rng = random.Random(99)
        while True:
            watcher = Watcher(channel, ev.WatchRequest(start_after=position))
            try:
                for _ in range(rng.randint(1, 15)):
                    message = await watcher.next()
                    if message.kind != ev.EVENT_KIND_HEARTBEAT:
                        resumed.append(message)
                    position = message.position
            finally:
                watcher.cancel()

    resuming = asyncio.create_task(resumer())
    await asyncio.gather(*(writer(seed) for seed in range(8)))
    final = await _graph(conn)
    total = await conn.fetchval(
        "SELECT coalesce(sum(greatest(cardinality(others), 1)), 0) FROM follow_events"
    )
    got = await steady.take(total)
    steady.cancel()
    await until(lambda: len(resumed) >= total, "the resuming stream's events")
    await asyncio.sleep(0.5)  # a repeat would arrive now
    resuming.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await resuming
    for events in (got, resumed[:total]):
        assert len({e.id for e in events}) == total, "an event repeated"
        assert _replay(events) == final
        for user in users:
            times = [e.event_time.ToMicroseconds() for e in events if e.user_id == user]
            assert times == sorted(times), user
    assert len(resumed) == total
    assert [e.id for e in resumed] == [e.id for e in got]


async def test_bad_requests_are_invalid_argument(
    service: RunningService, channel: grpc.aio.Channel
) -> None:
    """Garbage, truncated, altered and foreign positions, a List page token, start_after with
    only_new, a bad user id, more than 100 ids and request bytes that do not parse: each
    INVALID_ARGUMENT with the service's ErrorInfo naming its reason and field."""
    follow = pb_grpc.FollowServiceStub(channel)
    await import_users(pb_grpc.AccountServiceStub(channel), "a", "b")
    await follow.Follow(pb.FollowRequest(user_id="a", target_ids=["b"]))
    first = Watcher(channel, ev.WatchRequest())
    (event,) = await first.take(1)
    first.cancel()
    token = event.position
    flipped = token[:10] + ("A" if token[10] != "A" else "B") + token[11:]
    foreign = WatchTokens(b"k" * 32).encode(Cursor(Position(1, 1)))
    page = await follow.List(
        pb.ListRequest(user_id="a", follow_type=pb.FOLLOW_TYPE_FOLLOWING, page_size=1)
    )
    cases = [
        (ev.WatchRequest(start_after="!!garbage!!"), "INVALID_POSITION", "start_after"),
        (ev.WatchRequest(start_after=token[:-3]), "INVALID_POSITION", "start_after"),
        (ev.WatchRequest(start_after=flipped), "INVALID_POSITION", "start_after"),
        (ev.WatchRequest(start_after=foreign), "INVALID_POSITION", "start_after"),
        (ev.WatchRequest(start_after=token + "x" * 200), "INVALID_POSITION", "start_after"),
        (ev.WatchRequest(start_after=token, only_new=True), "INVALID_POSITION", "start_after"),
        (ev.WatchRequest(user_ids=["ok", ""]), "INVALID_USER_ID", "user_ids"),
        (ev.WatchRequest(user_ids=[f"u{i}" for i in range(101)]), "TOO_MANY_ITEMS", "user_ids"),
    ]
    assert page.next_page_token == ""  # one entry: the list ended; a page token of a longer one:
    for request, reason, field in cases:
        error = await Watcher(channel, request).failure()
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (request, error.details())
        info = error_info(error)
        assert (info.reason, info.domain, info.metadata["field"]) == (reason, "follow.v1", field)
        assert (error.details() or "").startswith(f"{field}: ")
    raw = channel.unary_stream(
        "/follow.v1.EventService/Watch",
        request_serializer=lambda b: b,
        response_deserializer=ev.Event.FromString,
    )
    call = raw(b"\x12\x02\xff\xfe")  # start_after holding invalid UTF-8
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        async for _ in call:
            pass
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(failed.value).reason == "INVALID_ARGUMENT"


async def test_a_position_before_the_retention_floor_is_out_of_range(
    service: RunningService, channel: grpc.aio.Channel, conn: asyncpg.Connection
) -> None:
    """Once retention deleted events after a position, resuming from it fails with
    OUT_OF_RANGE / POSITION_EXPIRED (never a silent skip); an empty start_after starts at
    the oldest event still retained, and a position after the floor still resumes."""
    follow = pb_grpc.FollowServiceStub(channel)
    await import_users(pb_grpc.AccountServiceStub(channel), "a", "b", "c")
    await follow.Follow(pb.FollowRequest(user_id="a", target_ids=["b", "c"]))
    await follow.Follow(pb.FollowRequest(user_id="b", target_ids=["a"]))
    await follow.Follow(pb.FollowRequest(user_id="c", target_ids=["a"]))
    first = Watcher(channel, ev.WatchRequest())
    got = await first.take(4)
    first.cancel()
    distributed = await outbox.is_distributed(conn)
    below = await outbox.horizon(conn, distributed)
    rows = await outbox.read_after(conn, outbox.START, below, 10)
    deleted = await outbox.delete_expired(
        conn, datetime.now(UTC) + timedelta(hours=1), rows[1].position, below, 100
    )
    assert deleted == 2  # the first two calls: a's follow of b and c, b's of a
    for position in (got[0].position, got[1].position):
        error = await Watcher(channel, ev.WatchRequest(start_after=position)).failure()
        assert error.code() == grpc.StatusCode.OUT_OF_RANGE
        assert error_info(error).reason == "POSITION_EXPIRED"
        assert "deleted" in (error.details() or "")
    oldest = Watcher(channel, ev.WatchRequest())
    assert [summary(e)[1:3] for e in await oldest.take(1)] == [("c", "a")]
    oldest.cancel()
    after = Watcher(channel, ev.WatchRequest(start_after=got[2].position))
    assert [summary(e)[1:3] for e in await after.take(1)] == [("c", "a")]
    after.cancel()
