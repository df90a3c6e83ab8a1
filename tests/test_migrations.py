"""server.migrations: versioned, applied once, safe to run twice and from two connections."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from server.database import Database
from server.migrations import MIGRATIONS, migrate
from tests.conftest import scratch_database

TABLES = {
    "accounts",
    "follow_counts",
    "follow_count_deltas",
    "following",
    "followers",
    "service_secrets",
}


@pytest.fixture
async def empty_db_url(pg_cluster: Database) -> AsyncIterator[str]:
    """A brand-new database with no schema at all (not cloned from the migrated template)."""
    async with scratch_database(pg_cluster, f"empty_{uuid.uuid4().hex[:12]}", None) as url:
        yield url


async def _tables(conn: asyncpg.Connection) -> set[str]:
    rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    return {r["tablename"] for r in rows}


async def _recorded(conn: asyncpg.Connection) -> list[tuple[int, str]]:
    rows = await conn.fetch("SELECT version, name FROM schema_migrations ORDER BY version")
    return [(r["version"], r["name"]) for r in rows]


def test_versions_are_increasing_and_unique() -> None:
    """Migration versions are strictly increasing from 1, so order of application is fixed."""
    versions = [v for v, _, _ in MIGRATIONS]
    assert versions == list(range(1, len(MIGRATIONS) + 1))
    assert all(name for _, name, _ in MIGRATIONS)


async def test_apply_once_then_nothing(empty_db_url: str) -> None:
    """The first run applies every migration and records it; a second run applies none
    and leaves the data alone."""
    conn = await asyncpg.connect(empty_db_url)
    try:
        assert await migrate(conn) == [v for v, _, _ in MIGRATIONS]
        assert await _tables(conn) >= TABLES
        assert await _recorded(conn) == [(v, n) for v, n, _ in MIGRATIONS]
        await conn.execute("INSERT INTO accounts (user_id) VALUES ('kept')")
        assert await migrate(conn) == []
        assert await conn.fetchval("SELECT count(*) FROM accounts") == 1
        assert await _recorded(conn) == [(v, n) for v, n, _ in MIGRATIONS]
        applied_at = await conn.fetchval("SELECT applied_at FROM schema_migrations")
        assert applied_at is not None
    finally:
        await conn.close()


async def test_concurrent_runs_apply_once(empty_db_url: str) -> None:
    """Two server processes starting at once: the advisory lock makes exactly one of them
    apply each migration, and neither fails."""
    conns = [await asyncpg.connect(empty_db_url) for _ in range(2)]
    try:
        results = await asyncio.gather(*(migrate(c) for c in conns))
        applied = sorted(v for result in results for v in result)
        assert applied == [v for v, _, _ in MIGRATIONS]
        assert [] in results
        assert await _recorded(conns[0]) == [(v, n) for v, n, _ in MIGRATIONS]
        # the lock is released again: a third run does not hang
        assert await asyncio.wait_for(migrate(conns[1]), timeout=10) == []
    finally:
        for c in conns:
            await c.close()


async def test_lock_released_after_a_failed_migration(empty_db_url: str) -> None:
    """A migration that fails leaves no partial schema and does not keep the advisory lock,
    so the next start can try again."""
    conn = await asyncpg.connect(empty_db_url)
    other = await asyncpg.connect(empty_db_url)
    try:
        await conn.execute("CREATE TABLE accounts (x int)")  # clashes with migration 1
        with pytest.raises(asyncpg.DuplicateTableError):
            await migrate(conn)
        assert "follow_counts" not in await _tables(conn)
        assert await _recorded(conn) == []
        locked = await other.fetchval("SELECT pg_try_advisory_lock($1)", 0x666F6C6C6F77)
        assert locked is True
    finally:
        await conn.close()
        await other.close()


async def test_template_database_is_fully_migrated(db_url: str) -> None:
    """The per-test databases the other tests use carry the complete, recorded schema."""
    conn = await asyncpg.connect(db_url)
    try:
        assert await _tables(conn) >= TABLES
        assert await migrate(conn) == []
        indexes = {
            r["indexname"]
            for r in await conn.fetch(
                "SELECT indexname FROM pg_indexes WHERE schemaname = 'public'"
            )
        }
        assert {"following_by_time", "following_mutual_by_time", "followers_by_time"} <= indexes
    finally:
        await conn.close()
