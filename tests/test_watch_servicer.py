"""server.watch_servicer driven through grpcio-testing (grpc_testing), over the real hub,
outbox reads and database: a supplement to tests/test_watch.py, which covers the same door
over real channels (and what grpc_testing cannot: flow control, keepalive, the real aio
context). grpc_testing calls handlers synchronously on a thread of its own, so the async
Watch runs on the test's loop behind a small bridge whose context forwards write() to the
generator grpc_testing reads, and turns an aio abort into set_code / set_details /
set_trailing_metadata (as tests/test_servicer_testing.py does for the unary servicers)."""

from __future__ import annotations

import asyncio
import queue
from collections.abc import AsyncIterator, Iterator
from typing import Any, cast

import asyncpg
import grpc
import grpc_testing
import pytest
from google.rpc import error_details_pb2, status_pb2

from follow.v1 import events_pb2 as ev
from server.outbox import FOLLOWED, OutboxRow, OutboxSource
from server.status import AbortedError
from server.store import Store
from server.watch_hub import MAX_BATCH_EVENTS, Batch, Slice, WatchHub
from server.watch_servicer import EventServicer
from server.watch_token import Cursor, WatchTokens

EVENT_SERVICE = ev.DESCRIPTOR.services_by_name["EventService"]
WATCH = EVENT_SERVICE.methods_by_name["Watch"]


class StreamBridge:
    """A synchronous Watch for grpc_testing that runs the aio one on `loop`."""

    def __init__(self, servicer: EventServicer, loop: asyncio.AbstractEventLoop) -> None:
        self._servicer = servicer
        self._loop = loop

    def Watch(self, request: ev.WatchRequest, context: Any) -> Iterator[ev.WatchResponse]:
        out: queue.Queue[tuple[str, Any]] = queue.Queue()

        class AioContext:
            async def write(self, message: bytes) -> None:  # written serialised
                out.put(("event", ev.WatchResponse.FromString(message)))

            async def abort(self, code: grpc.StatusCode, details: str, trailing: Any) -> None:
                raise AbortedError(code, details, tuple(trailing))

        async def run() -> None:
            try:
                await self._servicer.Watch(request, AioContext())  # type: ignore[arg-type]
            except AbortedError as aborted:
                out.put(("abort", aborted))
                return
            out.put(("end", None))

        future = asyncio.run_coroutine_threadsafe(run(), self._loop)

        def cancelled() -> None:
            future.cancel()
            out.put(("end", None))

        context.add_callback(cancelled)
        while True:
            kind, item = out.get(timeout=60)
            if kind == "event":
                yield item
                continue
            if kind == "abort":
                context.set_trailing_metadata(item.trailing_metadata)
                context.set_code(item.code)
                context.set_details(item.details)
            return


@pytest.fixture
async def bridged(db_url: str) -> AsyncIterator[tuple[Any, asyncpg.Pool]]:
    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=4)
    assert pool is not None
    hub = WatchHub(OutboxSource(pool))
    servicer = EventServicer(hub, WatchTokens(await Store(pool).cursor_key()))
    server = grpc_testing.server_from_dictionary(
        {EVENT_SERVICE: StreamBridge(servicer, asyncio.get_running_loop())},
        grpc_testing.strict_real_time(),
    )
    try:
        yield server, pool
    finally:
        await hub.stop(2)
        await pool.close()


async def test_watch_through_grpc_testing_sends_per_edge_events(
    bridged: tuple[Any, asyncpg.Pool],
) -> None:
    """Two outbox rows (a follow of two users, an unfollow) come out as three Events in
    order, with kinds, users, ids and positions, in WatchResponses that each carry a
    position and the server's time."""
    server, pool = bridged
    await pool.execute(
        "INSERT INTO follow_events (user_id, kind, others, mutual, at)"
        " VALUES ('a', 1, '{b,c}', '{c}', now())"
    )
    await pool.execute(
        "INSERT INTO follow_events (user_id, kind, others, at) VALUES ('a', 2, '{b}', now())"
    )
    rpc = server.invoke_unary_stream(WATCH, (), ev.WatchRequest(), 30)
    got: list[ev.Event] = []
    while len(got) < 3:
        message = await asyncio.to_thread(rpc.take_response)
        assert message.position
        assert message.sent_time.seconds > 0
        got.extend(message.events)
    rpc.cancel()
    assert [(e.kind, e.user_id, e.other_user_id, e.mutual_change) for e in got] == [
        (ev.EVENT_KIND_FOLLOW, "a", "b", ev.MUTUAL_CHANGE_NONE),
        (ev.EVENT_KIND_FOLLOW, "a", "c", ev.MUTUAL_CHANGE_BECAME_MUTUAL),
        (ev.EVENT_KIND_UNFOLLOW, "a", "b", ev.MUTUAL_CHANGE_NONE),
    ]
    assert got[0].id.split(".")[0] == got[1].id.split(".")[0] != got[2].id.split(".")[0]
    assert len({e.position for e in got}) == 3


async def test_a_forged_position_through_grpc_testing_is_invalid_argument(
    bridged: tuple[Any, asyncpg.Pool],
) -> None:
    """A made-up start_after ends the call with INVALID_ARGUMENT and a google.rpc.Status
    whose one ErrorInfo says INVALID_POSITION (domain follow.v1, field start_after)."""
    server, _ = bridged
    rpc = server.invoke_unary_stream(WATCH, (), ev.WatchRequest(start_after="forged"), 30)
    trailing, code, details = await asyncio.to_thread(rpc.termination)
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("start_after: ")
    (raw,) = [v for k, v in trailing if k == "grpc-status-details-bin"]
    status = status_pb2.Status.FromString(raw)
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert (info.reason, info.domain, info.metadata["field"]) == (
        "INVALID_POSITION",
        "follow.v1",
        "start_after",
    )


def test_a_full_message_of_the_longest_events_stays_well_under_the_receive_limit() -> None:
    """500 events (the hub's bound per message) with 32-byte user ids, the longest ids and
    positions the service makes, serialise to under 100 KB: far inside the 256 KiB receive
    limit clients here use (and gRPC's 4 MiB default)."""
    tokens = WatchTokens(b"k" * 32)
    servicer = EventServicer(cast(WatchHub, None), tokens)
    others = tuple(f"{i:0>32}" for i in range(MAX_BATCH_EVENTS))
    row = OutboxRow(
        user_id="u" * 32,
        id=2**63 - 1,
        txid=2**62,
        kind=FOLLOWED,
        others=others,
        mutual=frozenset(others),
        at_us=2**52,
        client_ip="",
        platform="",
    )
    batch = Batch((Slice(row, 0, MAX_BATCH_EVENTS),), Cursor(row.position))
    raw = servicer.response(batch)
    message = ev.WatchResponse.FromString(raw)
    assert len(message.events) == MAX_BATCH_EVENTS
    assert message.events[-1].position == message.position
    assert tokens.decode(message.events[0].position) == Cursor(row.position, 1)
    assert len(raw) < 100_000
