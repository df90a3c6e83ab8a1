"""Event retention (--event-retention, default 7 days): one runner per database
(server.leader) deletes outbox events older than the retention, oldest first in bounded
batches (server.outbox.delete_expired), and parked webhooks parked longer ago than it.

Never past what a configured callback URL's feeder still has to read: the deletion stops at
the lowest position among the configured URLs (server.webhook_queue), so an event not yet
queued for a URL (its receiver's feeder was stopped, or the service was down for longer
than the retention) is kept until it is. Once queued, a webhook carries its own body, so
deleting its event does not touch it. A URL no longer configured holds nothing back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import asyncpg

from server import outbox, webhook_queue
from server.leader import Leader
from server.outbox import MAX_ID, Position
from server.webhook_metrics import WebhookMetrics

log = logging.getLogger(__name__)

_RETENTION_LOCK = 0x666F6C6C6F7A  # one retention runner per database
BATCH = 1000
_END = Position(2**63 - 1, MAX_ID)


def interval_for(retention_seconds: float) -> float:
    """How often retention runs: a quarter of the retention, between 0.5 s and a minute."""
    return min(60.0, max(0.5, retention_seconds / 4))


class EventRetention:
    """Runs until stop(); each round deletes what has expired, then sleeps `interval`."""

    def __init__(
        self,
        database_url: str,
        retention_seconds: float,
        callback_urls: Sequence[str],
        metrics: WebhookMetrics,
        *,
        interval: float | None = None,
        batch: int = BATCH,
    ) -> None:
        self._leader = Leader(database_url, _RETENTION_LOCK, "follow-server retention")
        self._retention = retention_seconds
        self._urls = tuple(callback_urls)
        self._metrics = metrics
        self._interval = interval_for(retention_seconds) if interval is None else interval
        self._batch = batch
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._distributed: bool | None = None
        self.rounds = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="event-retention")

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=5)
        await self._leader.release()

    async def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                conn = await self._leader.connection()
                if conn is not None:
                    await self.run_once(conn)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database may be restarting: try again later
                log.warning("event retention paused: %s: %s", type(exc).__name__, exc)
                await self._leader.release()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval):
                    await self._stopping.wait()

    async def _through(self, conn: asyncpg.Connection) -> Position:
        """The last position retention may delete through: every configured URL's feeder
        has read past it (a URL without a position yet holds everything)."""
        if not self._urls:
            return _END
        where = await webhook_queue.positions(conn, self._urls)
        if len(where) < len(set(self._urls)):
            return outbox.START
        return min(where.values())

    async def run_once(self, conn: asyncpg.Connection) -> tuple[int, int]:
        """One round: (outbox events deleted, parked webhooks deleted)."""
        if self._distributed is None:
            self._distributed = await outbox.is_distributed(conn)
        cutoff = datetime.now(UTC) - timedelta(seconds=self._retention)
        events = 0
        while not self._stopping.is_set():
            through = await self._through(conn)
            below = await outbox.horizon(conn, self._distributed)
            deleted = await outbox.delete_expired(conn, cutoff, through, below, self._batch)
            if deleted == 0:
                break
            events += deleted
            self._metrics.outbox_deleted.inc(deleted)
            await asyncio.sleep(0)
        parked = 0
        while not self._stopping.is_set():
            deleted = await webhook_queue.delete_parked(conn, self._retention)
            if deleted == 0:
                break
            parked += deleted
        self.rounds += 1
        if events or parked:
            log.info(
                "event retention: deleted %d events and %d parked webhooks older than %gs",
                events,
                parked,
                self._retention,
            )
        return events, parked
