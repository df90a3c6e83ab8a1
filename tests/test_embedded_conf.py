"""server.embedded_conf: the embedded PostgreSQL runs with settings sized to the machine
(a quarter of memory as buffer cache, checkpoints further apart), written into its data
folder at every start and included from postgresql.conf once."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import asyncpg
import pytest

from server.database import Database
from server.embedded_conf import (
    CONF_FILE,
    GiB,
    MiB,
    embedded_settings,
    machine_memory,
    write_embedded_conf,
)


def test_the_cache_is_a_quarter_of_memory_within_bounds() -> None:
    assert embedded_settings(16 * GiB)["shared_buffers"] == "4096MB"
    assert embedded_settings(256 * MiB)["shared_buffers"] == "128MB"  # never below the default
    assert embedded_settings(256 * GiB)["shared_buffers"] == "8192MB"  # capped
    assert embedded_settings(16 * GiB)["effective_cache_size"] == "8192MB"


def test_machine_memory_is_positive_and_at_most_the_machines() -> None:
    assert 0 < machine_memory() <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def test_the_file_is_written_and_included_once(tmp_path: Path) -> None:
    (tmp_path / "postgresql.conf").write_text("port = 5432")  # no final newline
    settings = {"shared_buffers": "256MB", "max_wal_size": "4GB"}
    assert write_embedded_conf(tmp_path, settings) is True
    assert write_embedded_conf(tmp_path, settings) is False  # unchanged: not rewritten
    main = (tmp_path / "postgresql.conf").read_text().splitlines()
    assert main == ["port = 5432", f"include_if_exists = '{CONF_FILE}'"]
    written = (tmp_path / CONF_FILE).read_text()
    assert "shared_buffers = '256MB'" in written
    assert "max_wal_size = '4GB'" in written
    assert write_embedded_conf(tmp_path, {**settings, "shared_buffers": "512MB"}) is True
    assert "shared_buffers = '512MB'" in (tmp_path / CONF_FILE).read_text()
    assert (tmp_path / "postgresql.conf").read_text().count("include_if_exists") == 1


def test_the_embedded_server_runs_with_them(pg_cluster: Database) -> None:
    if pg_cluster.embedded is None:
        pytest.skip("a Citus cluster, not the embedded server")
    expected = embedded_settings(machine_memory())

    async def show() -> dict[str, str]:
        conn = await asyncpg.connect(pg_cluster.url)
        try:
            return {
                name: await conn.fetchval(
                    "SELECT setting || coalesce(unit, '') FROM pg_settings WHERE name = $1", name
                )
                for name in ("shared_buffers", "max_wal_size", "deadlock_timeout")
            }
        finally:
            await conn.close()

    found = asyncio.run(show())
    pages = int(found["shared_buffers"].removesuffix("8kB"))
    assert f"{pages * 8 // 1024}MB" == expected["shared_buffers"]
    assert found["max_wal_size"] == "4096MB"
    assert found["deadlock_timeout"] == "50ms"
