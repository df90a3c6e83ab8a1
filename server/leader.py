"""One runner per database for a background job: a session-level advisory lock held on a
connection of the job's own.

Every server process (each --workers worker, each server on the database) runs the job's
loop, and only the one holding the lock does the work. When that process dies (kill -9
included) its session ends, the lock is free, and another takes it at its next poll. A
session lock, not a transaction's: the holder keeps no transaction open, so it holds back
no one's visibility horizon and no row anyone waits on.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import asyncpg


class Leader:
    """The lock `key` on a connection named `name` (application_name), taken when free."""

    def __init__(
        self,
        database_url: str,
        key: int,
        name: str,
        init: Callable[[asyncpg.Connection], Awaitable[None]] | None = None,
    ) -> None:
        self._url = database_url
        self._key = key
        self._name = name
        self._init = init
        self._conn: asyncpg.Connection | None = None

    async def connection(self) -> asyncpg.Connection | None:
        """The lock's connection while this process holds the lock (taking it if free),
        None while another process does."""
        if self._conn is not None and not self._conn.is_closed():
            return self._conn
        await self.release()
        conn = await asyncpg.connect(self._url, server_settings={"application_name": self._name})
        try:
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", self._key):
                await conn.close()
                return None
            if self._init is not None:
                await self._init(conn)
        except BaseException:
            conn.terminate()
            raise
        self._conn = conn
        return conn

    async def release(self) -> None:
        """Give the lock up (closing its connection ends the session, and so the lock)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), timeout=2)
            if not conn.is_closed():
                conn.terminate()
