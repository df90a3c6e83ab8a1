"""follow.v1.EventService/Watch over a real channel to a real server (server.watch_servicer,
server.watch_hub, server.watch_token): per-edge events with their fields, several per
message, filters, only-new, resuming inside a call's events and inside a message, no gap
under concurrent writers and late commits, tokens, retention, flow control, the watcher cap,
shutdown and restarts."""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import socket
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta

import aiohttp
import asyncpg
import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from follow.v1 import events_pb2 as ev
from follow.v1 import events_pb2_grpc as ev_grpc
from follow.v1 import follow_pb2 as pb
from follow.v1 import follow_pb2_grpc as pb_grpc
from server import outbox
from server.app import RunningService
from server.outbox import Position
from server.watch_token import Cursor, WatchTokens
from tests.conftest import ServiceFactory
from tests.helpers import error_info, follow_server, import_users

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


def check_message(message: ev.WatchResponse) -> None:
    """What every WatchResponse holds: at most 500 events, a position, the server's time."""
    assert len(message.events) <= 500
    assert message.position
    assert abs(message.sent_time.seconds - datetime.now(UTC).timestamp()) < 600


class Watcher:
    """One Watch call and what it received: its messages, their events one by one, and its
    heartbeats (messages with no events) apart. A task reads the stream into a queue: a
    timed-out read of the call itself would cancel the call."""

    def __init__(self, channel: grpc.aio.Channel, request: ev.WatchRequest) -> None:
        self.call = ev_grpc.EventServiceStub(channel).Watch(request)
        self.messages: list[ev.WatchResponse] = []
        self.events: list[ev.Event] = []
        self.heartbeats: list[ev.WatchResponse] = []
        self._queue: asyncio.Queue[ev.Event | ev.WatchResponse | BaseException | None] = (
            asyncio.Queue()
        )
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for message in self.call:
                check_message(message)
                self.messages.append(message)
                if not message.events:
                    self._queue.put_nowait(message)
                for event in message.events:
                    self._queue.put_nowait(event)
            self._queue.put_nowait(None)
        except BaseException as exc:  # the error, or the cancellation, is the test's to see
            self._queue.put_nowait(exc)

    async def next(self) -> ev.Event | ev.WatchResponse:
        """The next event, or heartbeat (a WatchResponse with no events); AssertionError if
        the stream ended."""
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._queue.put_nowait(item)
            raise item
        assert item is not None, "the stream ended with OK"
        if isinstance(item, ev.WatchResponse):
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
                if isinstance(message, ev.Event):
                    got.append(message)
        return got

    async def heartbeat(self, within: float = WAIT) -> ev.WatchResponse:
        """Read until the next heartbeat; events on the way are recorded."""
        async with asyncio.timeout(within):
            while not isinstance(message := await self.next(), ev.WatchResponse):
                pass
        return message

    async def nothing_for(self, seconds: float) -> None:
        """No event (heartbeats allowed) arrives within `seconds`."""
        try:
            async with asyncio.timeout(seconds):
                while True:
                    message = await self.next()
                    assert isinstance(message, ev.WatchResponse), summary(message)
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


async def test_a_burst_shares_messages_and_every_event_and_message_resumes(
    service: RunningService, channel: grpc.aio.Channel, conn: asyncpg.Connection
) -> None:
    """Calls committed together come in few messages (several calls' events in one, up to
    the hub's bound; a call longer than the bound straddles two); a message's position is
    that of its last event or further on; resuming from any event's position, also one in
    the middle of a message, or from a message's, continues exactly after it."""
    targets = [f"t{i:02}" for i in range(20)]
    await import_users(pb_grpc.AccountServiceStub(channel), "a", "b", *targets)
    follow = pb_grpc.FollowServiceStub(channel)
    for user in ("a", "b"):
        await follow.Follow(pb.FollowRequest(user_id=user, target_ids=targets))
        await follow.Unfollow(pb.UnfollowRequest(user_id=user, target_ids=targets[:10]))
    whole = Watcher(channel, ev.WatchRequest())
    everything = await whole.take(60)
    whole.cancel()
    assert len([m for m in whole.messages if m.events]) <= 4  # at most a message per call
    assert max(len(m.events) for m in whole.messages) > 20  # several calls in one
    ids = [e.id for e in everything]
    assert len(set(ids)) == 60
    tokens = WatchTokens(
        await conn.fetchval("SELECT value FROM service_secrets WHERE name = 'cursor'")
    )
    hub = service.watch_hub
    assert hub is not None
    hub.max_events = 7
    small = Watcher(channel, ev.WatchRequest(start_after=everything[2].position))
    assert [e.id for e in await small.take(57)] == ids[3:]
    small.cancel()
    sizes = [len(m.events) for m in small.messages if m.events]
    assert max(sizes) == 7
    assert sum(sizes) == 57
    for message in small.messages:
        if message.events:
            last = tokens.decode(message.events[-1].position)
            assert tokens.decode(message.position) >= last
    middle = small.messages[1]
    for start_after, expected in (
        (middle.events[3].position, ids.index(middle.events[3].id) + 1),
        (middle.position, ids.index(middle.events[-1].id) + 1),
    ):
        resumed = Watcher(channel, ev.WatchRequest(start_after=start_after))
        assert [e.id for e in await resumed.take(60 - expected)] == ids[expected:]
        await resumed.nothing_for(0.3)
        resumed.cancel()


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
                for _ in range(rng.randint(1, 15)):  # cut anywhere, inside a message too
                    message = await watcher.next()
                    if isinstance(message, ev.Event):
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
        response_deserializer=ev.WatchResponse.FromString,
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


async def test_a_slow_watcher_keeps_server_memory_bounded_and_misses_nothing(
    service: RunningService, channel: grpc.aio.Channel
) -> None:
    """A client that stops reading while 2,000 events commit: the server's shared ring never
    holds more than its capacity (the stream holds at most a batch), the stream falls behind
    the ring and, once the client reads again, reads the outbox from its own position: every
    event arrives, in order, none twice."""
    hub = service.watch_hub
    assert hub is not None
    hub.ring_capacity, hub.batch = 20, 10
    targets = [f"t{i}" for i in range(20)]
    await import_users(pb_grpc.AccountServiceStub(channel), "a", *targets)
    follow = pb_grpc.FollowServiceStub(channel)
    options = [("grpc.http2.bdp_probe", 0), ("grpc.use_local_subchannel_pool", 1)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}", options=options) as slow:
        call = ev_grpc.EventServiceStub(slow).Watch(ev.WatchRequest(only_new=True))
        await wait_watching(service)
        for _ in range(50):
            await follow.Follow(pb.FollowRequest(user_id="a", target_ids=targets))
            await follow.Unfollow(pb.UnfollowRequest(user_id="a", target_ids=targets))
        await until(lambda: hub.tailer_reads > 0 and hub.ring_size == 20, "the ring full")
        before = hub.catch_up_reads
        got: list[ev.Event] = []
        async with asyncio.timeout(WAIT):
            async for message in call:
                assert len(message.events) <= hub.max_events
                got.extend(message.events)
                if len(got) >= 2000:
                    break
        call.cancel()
    assert hub.ring_peak <= 20
    assert hub.catch_up_reads > before, "the stream never fell behind the ring"
    assert len({e.id for e in got}) == 2000
    assert _replay(got) == set()
    kinds = [e.kind for e in got]
    assert kinds == ([ev.EVENT_KIND_FOLLOW] * 20 + [ev.EVENT_KIND_UNFOLLOW] * 20) * 50


async def test_watchers_are_capped_and_take_no_in_flight_slot(
    make_service: ServiceFactory,
) -> None:
    """With --max-watchers 2 a third stream gets RESOURCE_EXHAUSTED / TOO_MANY_WATCHERS at
    once; the two open streams take no slot of --max-in-flight 1 (a call still answers);
    when one closes, a new stream is served."""
    service = await make_service(max_watchers=2, max_in_flight=1)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        await import_users(pb_grpc.AccountServiceStub(channel), "a", "b")
        first = Watcher(channel, ev.WatchRequest(only_new=True))
        second = Watcher(channel, ev.WatchRequest(only_new=True))
        await wait_watching(service, 2)
        error = await Watcher(channel, ev.WatchRequest()).failure()
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_info(error).reason == "TOO_MANY_WATCHERS"
        assert "2 Watch streams" in (error.details() or "")
        await pb_grpc.FollowServiceStub(channel).Follow(
            pb.FollowRequest(user_id="a", target_ids=["b"])
        )
        assert [summary(e)[1:3] for e in await second.take(1)] == [("a", "b")]
        first.cancel()
        hub = service.watch_hub
        assert hub is not None
        await until(lambda: hub.watchers == 1, "the cancelled stream to close")
        third = Watcher(channel, ev.WatchRequest())
        assert [summary(e)[1:3] for e in await third.take(1)] == [("a", "b")]
        second.cancel()
        third.cancel()


async def test_stopping_the_server_ends_streams_at_once(make_service: ServiceFactory) -> None:
    """A graceful stop ends open streams with UNAVAILABLE / SHUTTING_DOWN (resume from the
    last position) instead of letting them hold the whole grace period."""
    service = await make_service()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        watchers = [Watcher(channel, ev.WatchRequest()) for _ in range(3)]
        await wait_watching(service, 3)
        started = asyncio.get_running_loop().time()
        await service.stop(60)
        assert asyncio.get_running_loop().time() - started < 30
        for watcher in watchers:
            error = await watcher.failure()
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert error_info(error).reason == "SHUTTING_DOWN"


async def test_heartbeats_keep_an_idle_stream_alive_and_move_its_position(
    make_service: ServiceFactory,
) -> None:
    """A stream with nothing to send gets heartbeats (messages with no events, only position
    and time set); one filtered to a quiet user moves past the other users' events, so
    resuming from a heartbeat's position, even unfiltered, does not deliver them again."""
    service = await make_service(watch_heartbeat_seconds=0.3)
    hub = service.watch_hub
    assert hub is not None
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        await import_users(pb_grpc.AccountServiceStub(channel), "a", "b", "quiet")
        watcher = Watcher(channel, ev.WatchRequest(user_ids=["quiet"], only_new=True))
        await wait_watching(service)
        beat = await watcher.heartbeat()
        assert list(beat.events) == []
        assert beat.position
        assert abs(beat.sent_time.seconds - datetime.now(UTC).timestamp()) < 600
        follow = pb_grpc.FollowServiceStub(channel)
        await follow.Follow(pb.FollowRequest(user_id="a", target_ids=["b"]))
        await until(lambda: hub.ring_size >= 1, "the tailer to read the follow")
        await watcher.heartbeat()
        later = await watcher.heartbeat()
        assert watcher.events == []
        watcher.cancel()
        resumed = Watcher(channel, ev.WatchRequest(start_after=later.position))
        await follow.Follow(pb.FollowRequest(user_id="b", target_ids=["a"]))
        assert [summary(e)[1:3] for e in await resumed.take(1)] == [("b", "a")]
        resumed.cancel()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def test_resuming_across_kill_and_restart_loses_and_repeats_nothing(db_url: str) -> None:
    """A real server process killed with SIGKILL mid-stream, then a new one on the same
    database: the stream resumed from the last position processed (inside a call's events)
    continues exactly after it; a SIGTERM then ends the stream with SHUTTING_DOWN and the
    process exits 0."""
    port = _free_port()
    args = ("--database-url", db_url, "--grpc-listen", f"127.0.0.1:{port}", "--http-listen", "")
    address = f"127.0.0.1:{port}"
    async with follow_server(*args) as first:
        await first.wait_for("gRPC listening")
        async with grpc.aio.insecure_channel(address) as channel:
            await import_users(pb_grpc.AccountServiceStub(channel), "a", "b", "c", "d")
            follow = pb_grpc.FollowServiceStub(channel)
            await follow.Follow(pb.FollowRequest(user_id="a", target_ids=["b", "c", "d"]))
            watcher = Watcher(channel, ev.WatchRequest())
            seen = await watcher.take(2)
            first.process.send_signal(signal.SIGKILL)
            await first.process.wait()
            error = await watcher.failure()
            assert error.code() == grpc.StatusCode.UNAVAILABLE
    async with follow_server(*args) as second:
        await second.wait_for("gRPC listening")
        async with grpc.aio.insecure_channel(address) as channel:
            follow = pb_grpc.FollowServiceStub(channel)
            await follow.Follow(pb.FollowRequest(user_id="b", target_ids=["a"]))
            resumed = Watcher(channel, ev.WatchRequest(start_after=seen[-1].position))
            rest = await resumed.take(2)
            assert [summary(e)[1:4] for e in seen + rest] == [
                ("a", "b", "NONE"),
                ("a", "c", "NONE"),
                ("a", "d", "NONE"),
                ("b", "a", "BECAME_MUTUAL"),
            ]
            await resumed.nothing_for(0.5)
            second.process.send_signal(signal.SIGTERM)
            error = await resumed.failure()
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert error_info(error).reason == "SHUTTING_DOWN"
        assert await asyncio.wait_for(second.process.wait(), WAIT) == 0


async def test_every_worker_process_streams_every_event(db_url: str) -> None:
    """With --workers 2 (processes sharing the port), streams on separate connections, served
    by whichever worker took each, all get every event in the same order; a position from
    one resumes on any."""
    port = _free_port()
    address = f"127.0.0.1:{port}"
    args = ("--database-url", db_url, "--grpc-listen", address, "--http-listen", "")
    async with follow_server("--workers", "2", *args) as server:
        await server.wait_for(r"worker 1 \(pid \d+\): gRPC listening")
        await server.wait_for(r"worker 0 \(pid \d+\): gRPC listening")
        options = [("grpc.use_local_subchannel_pool", 1)]
        channels = [grpc.aio.insecure_channel(address, options=options) for _ in range(4)]
        try:
            watchers = [Watcher(c, ev.WatchRequest()) for c in channels]
            await import_users(pb_grpc.AccountServiceStub(channels[0]), "a", "b", "c")
            follow = pb_grpc.FollowServiceStub(channels[0])
            await follow.Follow(pb.FollowRequest(user_id="a", target_ids=["b", "c"]))
            await follow.Follow(pb.FollowRequest(user_id="c", target_ids=["a"]))
            await follow.Unfollow(pb.UnfollowRequest(user_id="a", target_ids=["b"]))
            streams = [[e.id for e in await w.take(4)] for w in watchers]
            assert all(s == streams[0] for s in streams)
            for w in watchers:
                w.cancel()
            resumed = Watcher(
                channels[3], ev.WatchRequest(start_after=watchers[0].events[1].position)
            )
            assert [e.id for e in await resumed.take(2)] == streams[0][2:]
            resumed.cancel()
        finally:
            for c in channels:
                await c.close(None)


async def _watch_samples(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The follow_watch_* samples of a real scrape of /metrics."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as response,
    ):
        assert response.status == 200
        text = await response.text()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        if family.name.startswith("follow_watch_")
        for s in family.samples
    }


async def test_watch_metrics_are_scraped(make_service: ServiceFactory) -> None:
    """The /metrics scrape shows the open Watch streams (gauge, back to 0 when the client
    cancels), the per-edge events sent by kind, the outbox reads of a stream catching up
    from the oldest event, and one lag observation per call written (its events share the
    call's time and a message), each under a minute."""
    service = await make_service(metrics_listen="127.0.0.1:0")
    assert service.metrics_server is not None
    port = service.metrics_server.port
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        await import_users(pb_grpc.AccountServiceStub(channel), "a", "b", "c")
        follow = pb_grpc.FollowServiceStub(channel)
        await follow.Follow(pb.FollowRequest(user_id="a", target_ids=["b", "c"]))
        watcher = Watcher(channel, ev.WatchRequest())  # from the oldest: a catch-up read
        await wait_watching(service)
        await follow.Follow(pb.FollowRequest(user_id="b", target_ids=["a"]))
        await follow.Unfollow(pb.UnfollowRequest(user_id="a", target_ids=["b"]))
        assert len(await watcher.take(4)) == 4

        def sample(name: str, **labels: str) -> float:
            return got.get((name, frozenset(labels.items())), 0.0)

        async with asyncio.timeout(WAIT):  # counted just after each write returns
            while True:
                got = await _watch_samples(port)
                if sample("follow_watch_lag_seconds_count") >= 3:
                    break
                await asyncio.sleep(0.05)
        assert sample("follow_watch_streams") == 1
        assert sample("follow_watch_events_sent_total", kind="follow") == 3
        assert sample("follow_watch_events_sent_total", kind="unfollow") == 1
        assert sample("follow_watch_events_sent_total", kind="account_deleted") == 0
        assert sample("follow_watch_catch_up_reads_total") >= 1
        assert sample("follow_watch_lag_seconds_count") == 3
        assert 0 <= sample("follow_watch_lag_seconds_sum") < 3 * 60
        assert sample("follow_watch_lag_seconds_bucket", le="86400.0") == 3
        watcher.cancel()
        async with asyncio.timeout(WAIT):
            while sample("follow_watch_streams") != 0:
                await asyncio.sleep(0.05)
                got = await _watch_samples(port)
