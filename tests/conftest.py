"""Fixtures: one real PostgreSQL per test session, a fresh migrated database per test
(cloned from a template), and a real gRPC server on a free loopback port.

The PostgreSQL is the embedded one the service uses, or, with FOLLOW_TEST_CITUS=1 (`make
test-citus`), a throwaway Citus cluster (tests.support.citus: a coordinator and two workers
on 127.0.0.1). Then every scratch database is a Citus database of its own with the tables
distributed (by the service's own migrations), copied on every node from a template set up
once per session, and the same tests run against it unchanged; the few that cannot run on
Citus are skipped with `skip_on_citus`."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import grpc
import pytest

from follow.v1 import follow_pb2_grpc as pb_grpc
from server.app import RunningService, start_service
from server.config import Settings
from server.database import Database, open_database
from server.migrations import migrate
from tests.support.citus import CitusCluster, citus_missing_reason
from tests.webhook_receiver import Receiver

TEMPLATE = "follow_template"
_counter = itertools.count()

# Citus mode: the storage-touching suites against a real Citus cluster (make test-citus).
CITUS = os.environ.get("FOLLOW_TEST_CITUS") == "1"


def skip_on_citus(reason: str) -> pytest.MarkDecorator:
    """Skip a test in Citus mode, saying why it only makes sense on one PostgreSQL."""
    return pytest.mark.skipif(CITUS, reason=f"single-node only: {reason}")


def pytest_configure(config: pytest.Config) -> None:
    """In Citus mode, stop before collecting anything if no cluster can start here."""
    if CITUS:
        reason = citus_missing_reason()
        if reason is not None:
            raise pytest.UsageError(
                f"FOLLOW_TEST_CITUS=1, but no Citus cluster can start: {reason}"
            )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `citus` need a Citus cluster: they run in Citus mode (make test-citus,
    which CI runs after make test) and are skipped in a plain run."""
    if CITUS:
        return
    skip = pytest.mark.skip(reason="a Citus test: runs in make test-citus (FOLLOW_TEST_CITUS=1)")
    for item in items:
        if item.get_closest_marker("citus") is not None:
            item.add_marker(skip)


@dataclass
class CitusDatabase(Database):
    """`pg_cluster` in Citus mode: the coordinator's maintenance database (url), and the
    cluster, whose every node each scratch database is made on."""

    cluster: CitusCluster | None = None

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()
            self.cluster = None


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Database]:
    """A real PostgreSQL (the embedded one the service uses, or a Citus cluster in Citus
    mode), migrated into a template db."""
    if CITUS:
        yield from _citus_cluster()
        return
    folder = Path(tempfile.mkdtemp(prefix="follow-test-pg-"))
    database = asyncio.run(open_database(None, folder / "data"))

    async def make_template() -> None:
        conn = await asyncpg.connect(database.url)
        try:
            await conn.execute(f"DROP DATABASE IF EXISTS {TEMPLATE}")
            await conn.execute(f"CREATE DATABASE {TEMPLATE}")
        finally:
            await conn.close()
        await _migrate(database_url(database, TEMPLATE))

    asyncio.run(make_template())
    try:
        yield database
    finally:
        database.close()
        shutil.rmtree(folder, ignore_errors=True)


# Every test copies a database on each node: bound the WAL that leaves behind (the folder is
# in memory when it can be), checkpoints are cheap with fsync off. Tables get 8 shards, not
# Citus' default 32: what runs on every shard (the invariant scans after each stateful step,
# TRUNCATE, the importer's and checker's distributed work tables) costs per shard, while
# routing, pruning and two-phase commit work the same with 4 shards on each worker. The
# plan test (tests/test_citus_plans.py) migrates its own database with the default 32.
CITUS_TEST_SHARDS = 8
_CITUS_SETTINGS = {
    "max_wal_size": "256MB",
    "min_wal_size": "32MB",
    "citus.shard_count": str(CITUS_TEST_SHARDS),
}


def _memory_folder() -> Path | None:
    """Where the test cluster's folder goes: FOLLOW_TEST_CITUS_DIR if set, else /dev/shm
    when it exists with room to spare (each test copies a database on every node, which
    takes seconds on a disk that other work keeps busy, hundredths of one in memory), else
    the system's temporary folder."""
    chosen = os.environ.get("FOLLOW_TEST_CITUS_DIR")
    if chosen:
        return Path(chosen)
    shm = Path("/dev/shm")
    with contextlib.suppress(OSError):
        if os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 2 * 1024**3:
            return shm
    return None


def _citus_cluster() -> Iterator[Database]:
    """Citus mode: start the cluster, and set the template up once: Citus in it on every
    node, the service's migrations (which distribute the tables), then sealed, so each test
    copies it on every node in a fraction of a second instead of seconds of setup."""
    cluster = CitusCluster(settings=_CITUS_SETTINGS, parent=_memory_folder())
    database = CitusDatabase(url="", cluster=cluster)
    try:
        cluster.start()
        database.url = cluster.url_for("postgres")
        asyncio.run(_migrate(cluster.create_database(TEMPLATE)))
        cluster.seal_template(TEMPLATE)
        yield database
    finally:
        database.close()


async def _migrate(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await migrate(conn)
    finally:
        await conn.close()


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


async def create_database(cluster: Database, name: str, template: str | None = TEMPLATE) -> str:
    """Make database `name`: a copy of the migrated template, or empty with template=None
    (in Citus mode: on every node, the copy a Citus database, the empty one plain); its URL."""
    if isinstance(cluster, CitusDatabase) and cluster.cluster is not None:
        citus = cluster.cluster
        if template is None:
            await asyncio.to_thread(citus.create_database, name, citus=False)
        else:
            await asyncio.to_thread(citus.copy_database, name, template)
    else:
        await admin_execute(
            cluster, f"CREATE DATABASE {name}" + (f" TEMPLATE {template}" if template else "")
        )
    return database_url(cluster, name)


async def drop_database(cluster: Database, name: str) -> None:
    """Drop database `name` (on every node in Citus mode), ending the sessions still in it."""
    if isinstance(cluster, CitusDatabase) and cluster.cluster is not None:
        await asyncio.to_thread(cluster.cluster.drop_database, name)
    else:
        await admin_execute(cluster, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@contextlib.asynccontextmanager
async def scratch_database(
    cluster: Database, name: str, template: str | None = TEMPLATE
) -> AsyncIterator[str]:
    """A database made for one test or module (a copy of the migrated template, or empty
    with template=None), dropped afterwards; yields its URL."""
    url = await create_database(cluster, name, template)
    try:
        yield url
    finally:
        await drop_database(cluster, name)


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


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """A webhook receiver (aiohttp) on 127.0.0.1, stopped after the test."""
    r = Receiver()
    await r.start()
    yield r
    await r.stop()
