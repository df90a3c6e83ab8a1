"""The background work of account deletion: one runner per database removes deleted
accounts' edges in bounded batches (server.store.clean_up_deletion).

Every server process (each --workers worker, each server on the database) runs a
DeletionCleaner, but only the one holding a session-level advisory lock does the work: when
that process dies (kill -9 included) its session ends, the lock is free, and another picks it
up at its next poll. The job itself is the tombstone row the deletion wrote, so nothing is
lost across restarts of the server or of the database; each batch reads what is left, so a
batch cut short (or lost in a crash: batches commit without waiting for the WAL flush) is
simply done again.

What other users' calls may wait for: a batch holds the locks of the users in it from its
first lock to its commit, sized to about DELETION_BATCH_SECONDS, and it never waits for a
busy user while holding others (server.store's _hold): a busy one is left for a later batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import asyncpg

from server.store import Store

log = logging.getLogger(__name__)

_RUNNER_LOCK = 0x666F6C6C6F78  # one cleanup runner per database
POLL_SECONDS = 1.0


class DeletionCleaner:
    """Runs until stop(); wake() after a deletion starts the work without waiting a poll."""

    def __init__(self, store: Store, database_url: str, batch: int | None = None) -> None:
        """`batch`: edges per batch; None: as many as fit the store's time budget."""
        self._store = store
        self._url = database_url
        self._batch = batch
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._lock_conn: asyncpg.Connection | None = None
        self.batches_done = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="deletion-cleaner")

    def wake(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=5)
        await self._release()

    async def _release(self) -> None:
        conn, self._lock_conn = self._lock_conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), timeout=2)

    async def _holds_lock(self) -> bool:
        """Whether this process is the database's runner (taking the lock if it is free)."""
        if self._lock_conn is not None and not self._lock_conn.is_closed():
            return True
        await self._release()
        conn = await asyncpg.connect(
            self._url, server_settings={"application_name": "follow-server cleanup"}
        )
        if await conn.fetchval("SELECT pg_try_advisory_lock($1)", _RUNNER_LOCK):
            self._lock_conn = conn
            return True
        await conn.close()
        return False

    async def _run(self) -> None:
        while not self._stopping:
            try:
                if await self._holds_lock():
                    await self._drain()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database may be restarting: try again later
                log.warning("deletion cleanup paused: %s: %s", type(exc).__name__, exc)
                await self._release()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(POLL_SECONDS):
                    await self._wake.wait()

    async def _drain(self) -> None:
        while not self._stopping:
            pending = await self._store.pending_deletions(conn=self._lock_conn)
            if not pending:
                return
            for user_id in pending:
                batches = 0
                while not self._stopping:
                    done = await self._store.clean_up_deletion(user_id, self._batch)
                    batches += 1
                    self.batches_done += 1
                    if done:
                        log.info(
                            "deleted account %s: its edges are gone (%d batches)",
                            user_id,
                            batches,
                        )
                        break
                    await asyncio.sleep(0)  # let calls in between batches
