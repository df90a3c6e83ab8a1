"""Event retention (server.retention): outbox events older than --event-retention go, oldest
first, never past what a configured callback URL's feeder still has to read; parked webhooks
go once parked for longer than the retention; the job runs with the service."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import grpc
import pytest
from prometheus_client import CollectorRegistry

from follow.v1 import follow_pb2 as pb
from follow.v1 import follow_pb2_grpc as pb_grpc
from server import outbox, webhook_queue
from server.outbox import START
from server.retention import EventRetention
from server.webhook_metrics import WebhookMetrics
from tests.conftest import ServiceFactory
from tests.helpers import import_users
from tests.webhook_receiver import until

URL = "http://127.0.0.1:9/hook"


@pytest.fixture
async def conn(db_url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(db_url)
    yield connection
    await connection.close()


async def _write_events(make_service: ServiceFactory, count: int) -> None:
    service = await make_service()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        stub = pb_grpc.FollowServiceStub(channel)
        targets = [f"t{i}" for i in range(count)]
        await import_users(pb_grpc.AccountServiceStub(channel), "a", *targets)
        for target in targets:
            await stub.Follow(pb.FollowRequest(user_id="a", target_ids=[target]))


async def _events(conn: asyncpg.Connection) -> int:
    count: int = await conn.fetchval("SELECT count(*) FROM follow_events")
    return count


def _retention(db_url: str, seconds: float, urls: tuple[str, ...] = ()) -> EventRetention:
    return EventRetention(db_url, seconds, urls, WebhookMetrics(CollectorRegistry()), batch=2)


async def test_expired_events_go_but_not_past_a_callback_urls_position(
    make_service: ServiceFactory, db_url: str, conn: asyncpg.Connection
) -> None:
    """Events older than the retention are kept while a configured URL's feeder has not
    read them (its position before them), and go, in batches, once it has; the outbox's
    floor then says where reading can resume from."""
    await _write_events(make_service, 5)
    await webhook_queue.ensure_positions(conn, [URL], START)
    await asyncio.sleep(0.6)
    retention = _retention(db_url, 0.5, (URL,))
    assert await retention.run_once(conn) == (0, 0)
    assert await _events(conn) == 5
    distributed = await outbox.is_distributed(conn)
    rows = await outbox.read_after(conn, START, await outbox.horizon(conn, distributed), 100)
    await webhook_queue.queue(conn, URL, START, rows[2].position, [])
    assert await retention.run_once(conn) == (3, 0)
    assert await _events(conn) == 2
    assert await outbox.floor(conn) == rows[2].position
    # A URL no longer configured holds nothing back.
    assert await _retention(db_url, 0.5).run_once(conn) == (2, 0)


async def test_fresh_events_stay(
    make_service: ServiceFactory, db_url: str, conn: asyncpg.Connection
) -> None:
    """Without webhooks, only events older than the retention go."""
    await _write_events(make_service, 3)
    assert await _retention(db_url, 3600).run_once(conn) == (0, 0)
    assert await _events(conn) == 3


async def test_parked_webhooks_go_after_the_retention_pending_ones_stay(
    db_url: str, conn: asyncpg.Connection
) -> None:
    """A webhook parked longer ago than the retention is deleted; one parked recently and
    one still pending are kept."""
    insert = """
    INSERT INTO webhook_deliveries (user_id, url, txid, event_id, command, body, client_ip,
                                    platform, event_at, parked_at)
    VALUES ($1, $2, $3, 1, 'c', '{}', '', 'gRPC', now(), now() - $4::float8 * interval '1 second')
    """
    await conn.execute(insert, "old", URL, 1, 7200.0)
    await conn.execute(insert, "recent", URL, 2, 10.0)
    await conn.execute(insert, "p", URL, 3, None)  # pending: parked_at NULL
    assert await _retention(db_url, 3600).run_once(conn) == (0, 1)
    left = await conn.fetch("SELECT user_id FROM webhook_deliveries ORDER BY user_id")
    assert [r[0] for r in left] == ["p", "recent"]


async def test_the_service_runs_retention(
    make_service: ServiceFactory, conn: asyncpg.Connection
) -> None:
    """With --event-retention 1s the service's own job deletes the events soon after."""
    service = await make_service(event_retention=1.0)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        await import_users(pb_grpc.AccountServiceStub(channel), "a", "b")
        await pb_grpc.FollowServiceStub(channel).Follow(
            pb.FollowRequest(user_id="a", target_ids=["b"])
        )
    assert await _events(conn) == 1

    async def gone() -> bool:
        return await _events(conn) == 0

    await until(gone, within=60, what="the event deleted by retention")
