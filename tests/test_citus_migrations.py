"""server.migrations on a real Citus cluster: the service distributes its own tables.

Citus placement is what makes every single-owner call a one-shard router query, and it is
easy to get subtly wrong (a table left local, a second co-location group, rows stranded on
the coordinator), none of which a single PostgreSQL would show. So these run against a real
coordinator and two workers (tests.support.citus), and are skipped, with the reason, on a
machine without Citus (run ../shared/citus/install.sh).
"""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Protocol

import asyncpg
import pytest

from server.migrations import DISTRIBUTION, MIGRATIONS, Distributed, migrate, migrate_schema
from tests.support.citus import CitusCluster, citus_missing_reason

_MISSING = citus_missing_reason()
if _MISSING is not None:
    pytest.skip(_MISSING, allow_module_level=True)

pytestmark = pytest.mark.citus

PER_USER = {
    "accounts",
    "follow_counts",
    "following",
    "followers",
    "follow_count_deltas",
    "follow_events",
    "webhook_deliveries",
}
REFERENCE = {"service_secrets", "account_tombstones", "follow_events_floor", "webhook_positions"}
ALL_VERSIONS = [v for v, _, _ in MIGRATIONS]


class ScratchFactory(Protocol):
    """make_database: a new database (name, coordinator URL), with Citus set up or not."""

    def __call__(self, *, citus: bool = True) -> tuple[str, str]: ...


@pytest.fixture(scope="module")
def cluster() -> Iterator[CitusCluster]:
    """One coordinator + two workers for the module (starting one takes seconds)."""
    with CitusCluster() as running:
        yield running


@pytest.fixture
def make_database(cluster: CitusCluster) -> Iterator[ScratchFactory]:
    """Scratch databases on every node (Citus metadata is per database, so each test has a
    cluster of its own), dropped afterwards."""
    made: list[str] = []

    def make(*, citus: bool = True) -> tuple[str, str]:
        name = f"citus_{uuid.uuid4().hex[:12]}"
        made.append(name)
        return name, cluster.create_database(name, citus=citus)

    yield make
    for name in made:
        cluster.drop_database(name)


@pytest.fixture
async def citus_db(make_database: ScratchFactory) -> AsyncIterator[asyncpg.Connection]:
    """A connection to a brand-new, empty Citus database (no schema yet)."""
    _, url = make_database()
    conn = await asyncpg.connect(url)
    try:
        yield conn
    finally:
        await conn.close()


async def _placements(conn: asyncpg.Connection) -> dict[str, tuple[str, str | None, int]]:
    """Every table in Citus' metadata: (kind, distribution column, co-location group)."""
    rows = await conn.fetch(
        """SELECT logicalrelid::regclass::text AS name,
                  CASE WHEN partmethod = 'h' THEN 'hash'
                       WHEN repmodel = 't' THEN 'reference' ELSE 'other' END AS kind,
                  CASE WHEN partmethod = 'h'
                       THEN column_to_column_name(logicalrelid, partkey) END AS column,
                  colocationid
           FROM pg_dist_partition"""
    )
    return {r["name"]: (r["kind"], r["column"], r["colocationid"]) for r in rows}


async def _shard_layout(conn: asyncpg.Connection) -> list[tuple[str, int, int]]:
    rows = await conn.fetch(
        """SELECT logicalrelid::regclass::text AS name, shardid, nodeport
           FROM pg_dist_shard JOIN pg_dist_placement USING (shardid)
           JOIN pg_dist_node USING (groupid) ORDER BY 1, 2, 3"""
    )
    return [(r["name"], r["shardid"], r["nodeport"]) for r in rows]


def _assert_placed_as_declared(placements: dict[str, tuple[str, str | None, int]]) -> None:
    assert set(placements) == PER_USER | REFERENCE  # schema_migrations stays local
    groups = {placements[t][2] for t in PER_USER}
    assert len(groups) == 1, f"per-user tables in several co-location groups: {placements}"
    for table in PER_USER:
        assert placements[table][:2] == ("hash", "user_id"), table
    for table in REFERENCE:
        assert placements[table][0] == "reference", table


def test_every_table_is_declared_once() -> None:
    """Each table appears under exactly one migration, placed one of the two known ways, and
    the anchor of the co-location group (the first per-user table) is follow_counts."""
    tables = [t for declared in DISTRIBUTION.values() for t in declared]
    assert len(tables) == len(set(tables))
    assert set(tables) == PER_USER | REFERENCE
    assert set(DISTRIBUTION) <= set(ALL_VERSIONS)
    first = next(t for d in DISTRIBUTION.values() for t, p in d.items() if p == "user_id")
    assert first == "follow_counts"


async def test_new_cluster_distributes_every_table(
    citus_db: asyncpg.Connection, cluster: CitusCluster
) -> None:
    """A brand-new Citus database: after migrate, every per-user table is hash-distributed on
    user_id in one co-location group, service_secrets is a reference table, and
    schema_migrations is a plain coordinator table; the migrations made no table that is
    not declared; shards sit on both workers."""
    report = await migrate_schema(citus_db)
    assert report.applied == ALL_VERSIONS
    assert [d.table for d in report.distributed] == [
        t for declared in DISTRIBUTION.values() for t in declared
    ]
    assert report.distributed[0] == Distributed("follow_counts", "user_id", None)
    assert all(
        d.colocated_with == "follow_counts" for d in report.distributed[1:] if d.table in PER_USER
    )
    placements = await _placements(citus_db)
    _assert_placed_as_declared(placements)
    public = {
        r["tablename"]
        for r in await citus_db.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    }
    assert public == PER_USER | REFERENCE | {"schema_migrations"}
    worker_ports = {int(u.rsplit(":", 1)[1].split("/")[0]) for u in cluster.worker_urls}
    shard_ports = {port for table, _, port in await _shard_layout(citus_db) if table in PER_USER}
    assert shard_ports == worker_ports
    # The view over two distributed tables answers, and a one-owner write is accepted.
    await citus_db.execute("INSERT INTO follow_counts (user_id, following) VALUES ('a', 2)")
    await citus_db.execute(
        "INSERT INTO follow_count_deltas (user_id, shard, followers) VALUES ('a', 3, 5)"
    )
    row = await citus_db.fetchrow("SELECT * FROM follow_totals WHERE user_id = 'a'")
    assert row is not None
    assert (row["following"], row["followers"]) == (2, 5)


async def test_second_run_changes_nothing(citus_db: asyncpg.Connection) -> None:
    """migrate on every start: the second run applies nothing, distributes nothing, and
    leaves Citus' metadata (tables, shards, placements) exactly as it was."""
    await migrate(citus_db)
    placements, shards = await _placements(citus_db), await _shard_layout(citus_db)
    report = await migrate_schema(citus_db)
    assert report.applied == []
    assert report.distributed == []
    assert await _placements(citus_db) == placements
    assert await _shard_layout(citus_db) == shards


async def test_concurrent_starts_distribute_once(make_database: ScratchFactory) -> None:
    """Two server processes starting at once on a new Citus database: the advisory lock
    makes one of them apply and distribute everything, and the other do nothing."""
    _, url = make_database()
    conns = [await asyncpg.connect(url) for _ in range(2)]
    try:
        reports = await asyncio.gather(*(migrate_schema(c) for c in conns))
        assert sorted(len(r.distributed) for r in reports) == [0, len(PER_USER | REFERENCE)]
        assert sorted(r.applied for r in reports) == [[], ALL_VERSIONS]
        _assert_placed_as_declared(await _placements(conns[0]))
    finally:
        for c in conns:
            await c.close()


async def test_a_later_migration_on_a_distributed_database(
    citus_db: asyncpg.Connection,
) -> None:
    """A database distributed at migration 1 that then gets migrations 2 and 3: migration
    2's DDL on the distributed follow_counts runs inside the migration's transaction, and
    the tables they add are placed (co-located with the rest, or as a reference table) in
    the same run."""
    first = await migrate_schema(citus_db, MIGRATIONS[:1])
    assert first.applied == [1]
    assert {d.table for d in first.distributed} == set(DISTRIBUTION[1])
    await citus_db.execute("INSERT INTO follow_counts (user_id, followers) VALUES ('a', 1)")
    second = await migrate_schema(citus_db)
    assert second.applied == ALL_VERSIONS[1:]
    assert second.distributed == [
        Distributed("follow_count_deltas", "user_id", "follow_counts"),
        Distributed("account_tombstones", "reference", None),
        Distributed("follow_events", "user_id", "follow_counts"),
        Distributed("follow_events_floor", "reference", None),
        Distributed("webhook_deliveries", "user_id", "follow_counts"),
        Distributed("webhook_positions", "reference", None),
    ]
    _assert_placed_as_declared(await _placements(citus_db))
    # Migration 2 dropped the counters' check constraints on every shard, not only on the
    # coordinator's empty shell: a negative counter part is now accepted.
    await citus_db.execute("UPDATE follow_counts SET followers = -1 WHERE user_id = 'a'")
    assert await citus_db.fetchval("SELECT followers FROM follow_totals WHERE user_id = 'a'") == -1


_SEED = [
    "INSERT INTO accounts (user_id, nick) SELECT 'u' || g, 'nick ' || g"
    " FROM generate_series(1, 60) g",
    "INSERT INTO follow_counts (user_id, following) SELECT 'u' || g, 2"
    " FROM generate_series(1, 60) g",
    # u<g> follows u<g+1> and u<g+2> (wrapping), stored under both owners.
    "INSERT INTO following (user_id, target_id, followed_at)"
    " SELECT 'u' || g, 'u' || (1 + (g + k - 1) % 60), now()"
    " FROM generate_series(1, 60) g, generate_series(1, 2) k",
    "INSERT INTO followers (user_id, follower_id, followed_at)"
    " SELECT target_id, user_id, followed_at FROM following",
    "INSERT INTO follow_count_deltas (user_id, shard, followers)"
    " SELECT 'u' || g, g % 16, 2 FROM generate_series(1, 60) g",
    "INSERT INTO service_secrets (name, value) VALUES ('cursor', '\\x0102')",
]


async def _row_counts(conn: asyncpg.Connection) -> dict[str, int]:
    return {t: await conn.fetchval(f"SELECT count(*) FROM {t}") for t in PER_USER | REFERENCE}


async def test_a_single_node_database_that_gains_citus_is_distributed_with_its_rows(
    make_database: ScratchFactory, cluster: CitusCluster
) -> None:
    """A database migrated and used without Citus, then given the extension and the nodes:
    the next migrate distributes every table with every row, and leaves no stale copy on
    the coordinator (the rows now live in the workers' shards)."""
    name, url = make_database(citus=False)
    conn = await asyncpg.connect(url)
    try:
        plain = await migrate_schema(conn)
        assert plain.applied == ALL_VERSIONS
        assert plain.distributed == []
        for statement in _SEED:
            await conn.execute(statement)
        before = await _row_counts(conn)
        totals_before = await conn.fetch("SELECT * FROM follow_totals ORDER BY user_id")
        assert before["following"] == 120
    finally:
        await conn.close()

    cluster.enable_citus(name)
    conn = await asyncpg.connect(url)
    try:
        report = await migrate_schema(conn)
        assert report.applied == []
        assert {d.table for d in report.distributed} == PER_USER | REFERENCE
        _assert_placed_as_declared(await _placements(conn))
        assert await _row_counts(conn) == before
        assert await conn.fetch("SELECT * FROM follow_totals ORDER BY user_id") == totals_before
        for table in PER_USER | REFERENCE:
            # The coordinator's own table (the shell the shards hang off) holds no stale
            # copy of the rows (Citus leaves it on disk unless told to drop it) ...
            assert await conn.fetchval("SELECT pg_relation_size($1)", table) == 0, table
        for table in PER_USER:
            # ... and the rows are in shards on the workers, spread over both of them.
            per_worker = await conn.fetch(
                """SELECT nodeport, sum(result::bigint) AS n
                   FROM run_command_on_shards($1, 'SELECT count(*) FROM %s')
                   JOIN pg_dist_placement USING (shardid)
                   JOIN pg_dist_node USING (groupid) GROUP BY nodeport""",
                table,
            )
            assert sum(r["n"] for r in per_worker) == before[table], table
            if before[table] >= 60:
                assert len([r for r in per_worker if r["n"] > 0]) == 2, table
        # One owner's rows of every table are on one shard: a router query.
        plan = "\n".join(
            r[0]
            for r in await conn.fetch(
                "EXPLAIN SELECT * FROM following f JOIN follow_counts c USING (user_id)"
                " WHERE f.user_id = 'u7'"
            )
        )
        assert "Task Count: 1" in plan
    finally:
        await conn.close()


def test_stop_cleans_up_after_a_start_that_fails_halfway() -> None:
    """A start that fails after the servers are up (here: setting up Citus) stops every
    node and removes the folder, so a failed fixture leaves no servers behind."""

    class Failing(CitusCluster):
        def enable_citus(self, name: str) -> None:
            raise RuntimeError("injected failure")

    cluster = Failing(workers=1)
    seen: dict[str, object] = {}
    original_stop = cluster.stop

    def spy_stop() -> None:
        if cluster.root is not None and "root" not in seen:
            seen["root"] = cluster.root
            seen["ports"] = [n.port for n in (cluster.coordinator, *cluster.workers) if n]
        original_stop()

    cluster.stop = spy_stop  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="injected failure"):
        cluster.start()
    root = seen["root"]
    assert isinstance(root, Path)
    assert not root.exists()
    ports = seen["ports"]
    assert isinstance(ports, list)
    assert len(ports) == 2
    for port in ports:
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"a server still listens on {port}"
