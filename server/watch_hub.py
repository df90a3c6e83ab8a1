"""The Watch streams of one server process: one tailer reads the outbox, every stream reads
from what it read.

- The tailer (one task per process, running while any stream is open) polls the outbox every
  `poll_seconds` (one statement on one pooled connection, whatever the number of streams:
  server.outbox.read_final, the horizon, the rows and the floor; three on Citus) and
  appends the new rows to a ring shared by every stream: the rows after `ring_from` up to
  `tail`, with no gap (server.outbox's horizon), at most `ring_capacity` of them; older
  rows drop off the front.
- A stream is a cursor (server.watch_token.Cursor), not a queue: it sends the ring's rows
  after its cursor, then waits for the tailer. A stream whose cursor is behind the ring (it
  starts from an old position, or its client reads slower than events come and the ring
  moved past it) reads the outbox itself from its cursor, in batches, until it reaches the
  ring again. So memory is the ring plus one batch per stream catching up, whatever the
  clients do; a slow client only makes its own stream read the database (at most
  `catch_up_readers` such reads at once per process, so streams cannot take the pool from
  the calls). gRPC flow control holds the stream's writes while the client does not read.
- Ordering is the outbox's: rows in (txid, id) order past a visibility horizon, one user's
  rows in commit order, and a row's per-edge events in the call's order.
- A stream yields Batches, one per gRPC message: the per-edge events of the rows it has to
  send, up to `max_events` per message (gRPC's per-message send was most of the server's
  time when every edge was a message of its own), or none for a heartbeat.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from server.errors import Reason, ServiceError
from server.metrics import WatchMetrics
from server.outbox import (
    ACCOUNT_DELETED,
    FOLLOWED,
    MAX_ID,
    OutboxRow,
    OutboxSource,
    Position,
)
from server.watch_token import COMPLETE, Cursor

log = logging.getLogger(__name__)

MAX_WATCH_USERS = 100
DEFAULT_MAX_WATCHERS = 1000
DEFAULT_HEARTBEAT_SECONDS = 15.0
# Events per message: an Event is at most ~170 bytes (ids of 32 bytes, a 50-character
# position), so a message stays under 100 KB, well inside the 256 KiB clients here accept.
MAX_BATCH_EVENTS = 500
# The mutual change of an event (follow.v1.MutualChange's numbers).
MUTUAL_NONE, BECAME_MUTUAL, STOPPED_BEING_MUTUAL = 0, 1, 2


class Slice(NamedTuple):
    """Events `start` to `end` (exclusive, counted from 0) of one outbox row (a NamedTuple:
    one is made per row sent, and a frozen dataclass costs ~6 times a tuple to make)."""

    row: OutboxRow
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class Batch:
    """One message of a stream: slices of rows' events in stream order, at most the hub's
    `max_events` events in all, or none (a heartbeat); `cursor` is the stream's place once
    they are delivered (after the last event, or further on: past rows a filter left out,
    past a horizon)."""

    slices: tuple[Slice, ...]
    cursor: Cursor


@dataclass(slots=True)
class _Stream:
    """One open stream's state."""

    cursor: Cursor
    users: frozenset[str]
    oldest: bool  # started from the oldest retained event and has read nothing yet
    last_sent: float = field(default_factory=time.monotonic)
    waited: bool = False  # the last step found nothing to send


def event_count(row: OutboxRow) -> int:
    """The row's per-edge events: one per other user of a follow or unfollow, one for an
    account deletion."""
    return 1 if row.kind == ACCOUNT_DELETED else len(row.others)


def edges(row: OutboxRow) -> list[tuple[str, int]]:
    """Each event's other user ("" for an account deletion) and mutual change
    (MUTUAL_NONE, BECAME_MUTUAL or STOPPED_BEING_MUTUAL), in the row's event order."""
    if row.kind == ACCOUNT_DELETED:
        return [("", MUTUAL_NONE)]
    change = BECAME_MUTUAL if row.kind == FOLLOWED else STOPPED_BEING_MUTUAL
    mutual = row.mutual
    return [(o, change if o in mutual else MUTUAL_NONE) for o in row.others]


def batches(rows: Iterable[tuple[OutboxRow, int]], limit: int, end: Cursor) -> Iterator[Batch]:
    """The events of `rows` (each after its first `skip`), in order, cut into batches of at
    most `limit` events (a row's events may straddle two). The last batch's cursor is `end`
    when that is further on than its last event."""
    slices: list[Slice] = []
    count = 0
    for row, skip in rows:
        n = event_count(row)
        while skip < n:
            take = min(n - skip, limit - count)
            slices.append(Slice(row, skip, skip + take))
            count += take
            skip += take
            if count == limit:  # more may follow: this batch ends at its last event
                yield Batch(tuple(slices), Cursor(row.position, COMPLETE if skip == n else skip))
                slices, count = [], 0
    if slices:
        yield Batch(tuple(slices), max(Cursor(slices[-1].row.position), end))


def past_horizon(below: int) -> Position:
    """The position after every row whose transaction id is below `below`."""
    return Position(below - 1, MAX_ID)


class WatchHub:
    """The tailer, the ring and the open streams of one server process."""

    def __init__(
        self,
        source: OutboxSource,
        *,
        max_watchers: int = DEFAULT_MAX_WATCHERS,
        heartbeat_seconds: float = DEFAULT_HEARTBEAT_SECONDS,
        poll_seconds: float = 0.1,
        ring_capacity: int = 10_000,
        batch: int = 500,
        max_events: int = MAX_BATCH_EVENTS,
        catch_up_readers: int = 2,
        idle_seconds: float = 10.0,
        metrics: WatchMetrics | None = None,
    ) -> None:
        self.source = source
        self.metrics = metrics if metrics is not None else WatchMetrics()
        self.max_watchers = max_watchers
        self.heartbeat_seconds = heartbeat_seconds
        self.poll_seconds = poll_seconds
        self.ring_capacity = ring_capacity
        self.batch = batch
        self.max_events = max_events
        self.idle_seconds = idle_seconds
        self._readers = asyncio.Semaphore(catch_up_readers)
        self.watchers = 0
        self.catch_up_reads = 0  # outbox reads by streams behind the ring (tests, metrics)
        self.tailer_reads = 0
        self.ring_peak = 0  # the most rows the ring ever held
        # The ring: every final row after ring_from up to tail, in reading order. None
        # until the tailer's first read (streams catch up by themselves meanwhile).
        self._ring: list[OutboxRow] = []
        self._keys: list[Position] = []
        self.ring_from: Position | None = None
        self.tail: Position | None = None
        self._changed = asyncio.Event()
        self._stopping = asyncio.Event()
        self._tailer: asyncio.Task[None] | None = None
        self._streams: set[asyncio.Task[Any]] = set()

    # -- the tailer ----------------------------------------------------------------------

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _ensure_tailer(self) -> None:
        if self._tailer is None or self._tailer.done():
            self._tailer = asyncio.create_task(self._tail(), name="watch tailer")

    def _reset_ring(self) -> None:
        self._ring, self._keys = [], []
        self.ring_from = self.tail = None

    async def _tail(self) -> None:
        """Poll the outbox while streams are open (and `idle_seconds` after the last one
        closed, so a client that reconnects finds the ring warm)."""
        idle_since: float | None = None
        failures = 0
        try:
            while not self._stopping.is_set():
                if self.watchers == 0:
                    idle_since = idle_since or time.monotonic()
                    if time.monotonic() - idle_since > self.idle_seconds:
                        return
                else:
                    idle_since = None
                full = False
                try:
                    if self.tail is None:
                        start = await self.source.now()
                        self.ring_from = self.tail = start
                        self._notify()
                    rows, below, _ = await self.source.read(self.tail, self.batch)
                    self.tailer_reads += 1
                    failures = 0
                    self._append(rows, below)
                    full = len(rows) == self.batch
                except Exception as exc:  # the database away: streams wait, then it resumes
                    failures += 1
                    if failures == 1 or failures % 100 == 0:
                        log.warning("watch tailer: reading the outbox failed (%s)", exc)
                if not full:
                    delay = self.poll_seconds * min(failures + 1, 20)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(delay):
                            await self._stopping.wait()
        finally:
            self._reset_ring()
            self._notify()

    def _append(self, rows: list[OutboxRow], below: int) -> None:
        if self.tail is None:
            return
        if rows:
            self._ring.extend(rows)
            self._keys.extend(r.position for r in rows)
            self.tail = rows[-1].position
        if len(rows) < self.batch:
            self.tail = max(self.tail, past_horizon(below))
        excess = len(self._ring) - self.ring_capacity
        if excess > 0:
            self.ring_from = self._keys[excess - 1]
            del self._ring[:excess]
            del self._keys[:excess]
        self.ring_peak = max(self.ring_peak, len(self._ring))
        if rows:
            self._notify()

    @property
    def ring_size(self) -> int:
        return len(self._ring)

    # -- the streams ---------------------------------------------------------------------

    def _in_ring(self, cursor: Cursor) -> bool:
        return cursor.complete and self.ring_from is not None and cursor.position >= self.ring_from

    async def watch(
        self, start: Cursor | None, only_new: bool, users: Collection[str] = ()
    ) -> AsyncGenerator[Batch, None]:
        """The events after `start` (None: from the oldest retained; `only_new`: from now),
        then every new one, of `users` only when given, in Batches, with a heartbeat (an
        empty Batch) after each `heartbeat_seconds` without an event. Ends by raising
        ServiceError: TOO_MANY_WATCHERS at once when the process serves `max_watchers`
        streams, POSITION_EXPIRED when retention deleted events the stream needs,
        SHUTTING_DOWN on stop()."""
        if self._stopping.is_set():
            raise _shutting_down()
        if self.watchers >= self.max_watchers:
            raise ServiceError(
                Reason.TOO_MANY_WATCHERS,
                f"this server process serves its maximum of {self.max_watchers} Watch streams;"
                " retry with backoff",
            )
        self.watchers += 1
        self.metrics.watchers.inc()
        task = asyncio.current_task()
        if task is not None:
            self._streams.add(task)
        try:
            self._ensure_tailer()
            async for batch in self._stream(start, only_new, frozenset(users)):
                yield batch
        finally:
            self.watchers -= 1
            self.metrics.watchers.dec()
            if task is not None:
                self._streams.discard(task)

    async def _stream(
        self, start: Cursor | None, only_new: bool, users: frozenset[str]
    ) -> AsyncGenerator[Batch, None]:
        if only_new:
            stream = _Stream(Cursor(await self.source.now()), users, oldest=False)
        elif start is None:
            stream = _Stream(Cursor(await self.source.floor()), users, oldest=True)
        else:
            stream = _Stream(start, users, oldest=False)
        while True:
            if self._stopping.is_set():
                raise _shutting_down()
            if self._in_ring(stream.cursor):
                async for batch in self._from_ring(stream):
                    yield batch
            else:
                async for batch in self._catch_up(stream):
                    yield batch
            if stream.waited and time.monotonic() - stream.last_sent >= self.heartbeat_seconds:
                yield Batch((), stream.cursor)
                stream.last_sent = time.monotonic()

    async def _catch_up(self, stream: _Stream) -> AsyncGenerator[Batch, None]:
        """One batch read from the outbox by a stream behind the ring."""
        stream.waited = False
        async with self._readers:
            after = stream.cursor.read_from
            rows, below, floor = await self.source.read(
                after, self.batch, sorted(stream.users) or None
            )
        self.catch_up_reads += 1
        self.metrics.catch_up_reads.inc()
        if floor > after:
            if stream.oldest:  # nothing needed was lost yet: start at the new oldest
                stream.cursor = Cursor(floor)
                return
            raise ServiceError(
                Reason.POSITION_EXPIRED,
                "the events after this position have been deleted (retention); start again"
                " from the oldest retained events (empty start_after) and reconcile, or from"
                " now (only_new)",
            )
        stream.oldest = False
        start = stream.cursor
        end = Cursor(rows[-1].position) if rows else start
        if len(rows) < self.batch:
            end = max(end, Cursor(past_horizon(below)))
        todo = ((r, start.done if r.position == start.position else 0) for r in rows)
        for batch in batches(todo, self.max_events, end):
            yield batch
            stream.cursor = batch.cursor
            stream.last_sent = time.monotonic()
        stream.cursor = max(stream.cursor, end)
        if len(rows) < self.batch and not self._in_ring(stream.cursor):
            # Behind a held horizon, or no tailer read yet: wait, no busy loop.
            stream.waited = True
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_seconds):
                    await self._stopping.wait()

    def _ring_after(self, cursor: Cursor) -> tuple[list[OutboxRow], Position]:
        """At most a batch of the ring's rows after `cursor`, and the position they reach."""
        at = bisect.bisect_right(self._keys, cursor.position)
        rows = self._ring[at : at + self.batch]  # references, not copies
        if at + self.batch < len(self._ring):
            return rows, rows[-1].position
        return rows, self.tail or cursor.position

    async def _from_ring(self, stream: _Stream) -> AsyncGenerator[Batch, None]:
        """Send the ring's rows after the stream's cursor, or wait for new ones."""
        changed = self._changed
        rows, reach = self._ring_after(stream.cursor)
        stream.waited = not rows
        users = stream.users
        todo = ((r, 0) for r in rows if not users or r.user_id in users)
        end = max(stream.cursor, Cursor(reach))
        for batch in batches(todo, self.max_events, end):
            yield batch
            stream.cursor = batch.cursor
            stream.last_sent = time.monotonic()
        stream.cursor = max(stream.cursor, end)
        if rows:
            return
        left = self.heartbeat_seconds - (time.monotonic() - stream.last_sent)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(left, 0)):
                await changed.wait()
        if self._in_ring(stream.cursor):
            rows, reach = self._ring_after(stream.cursor)
            if not rows:  # the tailer moved on with nothing for anyone: so does the stream
                stream.cursor = max(stream.cursor, Cursor(reach))

    async def stop(self, wait_seconds: float = 5.0) -> None:
        """End every stream (SHUTTING_DOWN: the client resumes elsewhere or after the
        restart) and the tailer; new streams are refused."""
        self._stopping.set()
        self._notify()
        waiting: set[asyncio.Task[Any]] = set(self._streams)
        if self._tailer is not None:
            waiting.add(self._tailer)
        if waiting:
            await asyncio.wait(waiting, timeout=wait_seconds)


def _shutting_down() -> ServiceError:
    return ServiceError(
        Reason.SHUTTING_DOWN,
        "the server is shutting down; resume from your last position (start_after)",
    )
