"""Fixtures: one real embedded PostgreSQL per test session, a fresh migrated database per
test (cloned from a template), and a real gRPC server on a free loopback port."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import asyncpg
import grpc
import pytest

from follow.v1 import follow_pb2_grpc as pb_grpc
from server.app import RunningService, start_service
from server.config import Settings
from server.database import Database, open_database
from server.migrations import migrate

TEMPLATE = "follow_template"
_counter = itertools.count()


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Database]:
    """A real PostgreSQL (the embedded one the service uses), migrated into a template db."""
    folder = Path(tempfile.mkdtemp(prefix="follow-test-pg-"))
    database = asyncio.run(open_database(None, folder / "data"))

    async def make_template() -> None:
        conn = await asyncpg.connect(database.url)
        try:
            await conn.execute(f"DROP DATABASE IF EXISTS {TEMPLATE}")
            await conn.execute(f"CREATE DATABASE {TEMPLATE}")
        finally:
            await conn.close()
        conn = await asyncpg.connect(database_url(database, TEMPLATE))
        try:
            await migrate(conn)
        finally:
            await conn.close()

    asyncio.run(make_template())
    try:
        yield database
    finally:
        database.close()
        shutil.rmtree(folder, ignore_errors=True)


def database_url(cluster: Database, name: str) -> str:
    """The cluster's URL with another database name."""
    base, _, query = cluster.url.partition("?")
    return f"{base.rsplit('/', 1)[0]}/{name}" + (f"?{query}" if query else "")


async def admin_execute(cluster: Database, sql: str) -> None:
    """Run one statement on the cluster's maintenance database (CREATE/DROP DATABASE)."""
    conn = await asyncpg.connect(cluster.url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def scratch_database(
    cluster: Database, name: str, template: str | None = TEMPLATE
) -> AsyncIterator[str]:
    """A database made for one test or module (a copy of the migrated template, or empty
    with template=None), dropped afterwards; yields its URL."""
    await admin_execute(
        cluster, f"CREATE DATABASE {name}" + (f" TEMPLATE {template}" if template else "")
    )
    try:
        yield database_url(cluster, name)
    finally:
        await admin_execute(cluster, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
async def db_url(pg_cluster: Database) -> AsyncIterator[str]:
    """A fresh, migrated, empty database for this test."""
    async with scratch_database(pg_cluster, f"test_{next(_counter)}") as url:
        yield url


ServiceFactory = Callable[..., Awaitable[RunningService]]


@pytest.fixture
async def make_service(db_url: str) -> AsyncIterator[ServiceFactory]:
    """Start a real gRPC server on a free loopback port over this test's database."""
    started: list[RunningService] = []

    async def make(**overrides: object) -> RunningService:
        settings = Settings(grpc_listen="127.0.0.1:0", **overrides)  # type: ignore[arg-type]
        running = await start_service(settings, db_url)
        started.append(running)
        return running

    yield make
    for running in started:
        await running.stop(0)


@pytest.fixture
async def service(make_service: ServiceFactory) -> RunningService:
    return await make_service()


@pytest.fixture
async def channel(service: RunningService) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as ch:
        yield ch


@pytest.fixture
def follow_stub(channel: grpc.aio.Channel) -> pb_grpc.FollowServiceAsyncStub:
    return pb_grpc.FollowServiceStub(channel)


@pytest.fixture
def account_stub(channel: grpc.aio.Channel) -> pb_grpc.AccountServiceAsyncStub:
    return pb_grpc.AccountServiceStub(channel)
