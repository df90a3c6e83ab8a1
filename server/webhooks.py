"""Webhooks as the hosted service sends them (Follow.CallbackAfterFollowAdd and
Follow.CallbackAfterFollowDelete), from the outbox, at least once, in commit order per user.

Two parts, started with the service (server.app) when --callback-url is given:

- The feeder, one per database (server.leader: every process runs it, the one holding the
  advisory lock works): for each URL it reads the outbox past the URL's position
  (server.outbox.read_final, under the visibility horizon, so no event is skipped) and, in
  one short transaction, queues a delivery row per event (the request body made now) and
  moves the position past them (server.webhook_queue.queue). Exactly once per (URL, event),
  across crashes: the position and the rows commit together. Off Citus that is one
  statement (server.webhook_queue.queue_claiming), which also claims for this process's
  sender the heads it has room for and hands them over: under load most webhooks go out
  without a claim statement of their own.
- Senders, in every process, one loop per URL: each round it records the outcomes of the
  requests that finished (the 2xx ones deleted in one statement), claims a batch of due
  heads (each user's oldest queued delivery, oldest first, at most one per user) with a
  lease (server.webhook_queue.claim), and starts a POST per claimed delivery; a user's next
  delivery becomes its head once the last one is recorded. At most --callback-concurrency
  requests per URL per process are on the wire. No transaction is open during a request.

A 2xx deletes the row. Anything else (another status, a timeout, no connection) retries
after an exponential backoff with jitter (between --callback-backoff-min and -max), until
the retry budget (--callback-retry-budget, counted from when the event was queued) is spent:
then the row is parked (kept with parked_at set, logged, counted) and the user's next event
goes. A crash (kill -9) mid-request leaves a lease (LEASE_MARGIN_SECONDS + PREFETCH + 1 request
timeouts) that runs out, and the webhook is sent again: the one duplicate window.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import asyncpg

from server import outbox, webhook_queue
from server.config import Settings
from server.database import use_int_timestamps
from server.leader import Leader
from server.outbox import ACCOUNT_DELETED, FOLLOWED, UNFOLLOWED, OutboxRow, Position
from server.webhook_http import HttpClient, HttpError, encode_query
from server.webhook_metrics import WebhookMetrics, url_label
from server.webhook_queue import Delivery, Queued
from server.webhook_request import command_and_body, query

log = logging.getLogger(__name__)

_FEEDER_LOCK = 0x666F6C6C6F79  # one webhook feeder per database
POLL_SECONDS = 0.25
FEED_BATCH = 500
# The feeder's poll: a read of the outbox (one statement, nothing else when it finds no
# event); its half is most of a webhook's lag, and under load a poll's batch fits in the
# sender's room (handed over at once) more often than a quarter second's does.
FEED_POLL_SECONDS = 0.1
LEASE_MARGIN_SECONDS = 10.0
# A sender claims up to PREFETCH times --callback-concurrency deliveries at once, so one
# round's statements serve several requests' worth; at most --callback-concurrency of them
# are on the wire, the rest wait their turn (the lease covers the wait). It also bounds what
# the feeder hands over: 8 (64 at the default concurrency) rather than 4, so a poll's batch
# at 400-550 webhooks/s (one-edge follows of a celebrity: 40-55 per FEED_POLL_SECONDS) is
# handed over whole instead of leaving the rest to a claim statement of its own
# (tests.bench.webhook_drain --rate 600 --targets 1, ~430 webhooks/s: 0.30 -> 0.24
# transactions and 0.09-0.11 -> 0.058-0.063 ms of PostgreSQL CPU per webhook, writes
# included). The price: a lease of LEASE_MARGIN_SECONDS + 9 request timeouts (28 s at the
# defaults, was 20), how long a crashed process's claimed webhooks wait to be sent again.
PREFETCH = 8
# A round that finds fewer than --callback-concurrency outcomes to mark while requests are
# still on the wire waits this long for more first, so one DELETE marks several (a round per
# answer was a DELETE and a claim per webhook under load); it delays only the release of
# those users' next webhooks, by at most this.
GATHER_SECONDS = 0.02
# Outcomes whose marking frees nothing (a delivery the feeder handed over, with nothing of
# its user queued behind it) wait up to this long to be marked with others: a DELETE per
# ~MARK_SECONDS instead of one per few answers. Only their leases wait meanwhile (and a
# crash before the mark sends them again, as it would in the request). 0.5 s rather than
# 0.2: fewer statements (each planned for its run) for the same rows, about a tenth of
# PostgreSQL's CPU per webhook in tests.bench.webhook_drain.
MARK_SECONDS = 0.5
# A claim that found nothing due is followed by the next one only after this long, unless
# something makes a head due sooner (the feeder queued rows it had no room to hand over, a
# marked delivery frees its user's next one): with the feeder handing over what it queues,
# a claim every POLL_SECONDS found nothing most of the time. What it leaves to the poll
# (retries coming due, after a backoff of at least --callback-backoff-min; other processes'
# rows; leases run out) waits at most this long.
IDLE_CLAIM_SECONDS = 1.0
BACKLOG_EVERY_SECONDS = 5.0
_KINDS = {FOLLOWED: "follow", UNFOLLOWED: "unfollow", ACCOUNT_DELETED: "account_deleted"}
_WARN_EVERY_SECONDS = 30.0


@dataclass(frozen=True, slots=True)
class WebhookConfig:
    """The webhook settings (server.config checks them when the flags are read)."""

    urls: tuple[str, ...]
    sdkappid: int
    token: str | None = None
    retry_budget: float = 86400.0
    timeout: float = 2.0
    concurrency: int = 8
    backoff_min: float = 1.0
    backoff_max: float = 600.0

    @property
    def lease(self) -> float:
        """How long a claim lasts: the wait behind the rest of its batch (at most PREFETCH - 1
        requests per slot), the request and marking its outcome fit in it with room to
        spare, so only a sender that died lets it run out."""
        return LEASE_MARGIN_SECONDS + (PREFETCH + 1) * self.timeout

    @classmethod
    def from_settings(cls, settings: Settings) -> WebhookConfig | None:
        if not settings.callback_urls:
            return None
        return cls(
            urls=settings.callback_urls,
            sdkappid=settings.sdkappid or 0,
            token=settings.callback_token,
            retry_budget=settings.callback_retry_budget,
            timeout=settings.callback_timeout,
            concurrency=settings.callback_concurrency,
            backoff_min=settings.callback_backoff_min,
            backoff_max=settings.callback_backoff_max,
        )


def backoff(config: WebhookConfig, failures: int) -> float:
    """The wait before try number `failures` + 1: doubling from backoff_min up to
    backoff_max, times a random factor in [0.5, 1) so a receiver coming back is not hit by
    every sender at once."""
    base = min(config.backoff_max, config.backoff_min * 2.0 ** min(failures - 1, 60))
    return base * random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not a secret


def queued_item(row: OutboxRow) -> Queued | None:
    """The delivery to queue for an outbox event (None: it sends no webhook)."""
    made = command_and_body(row)
    if made is None:
        return None
    return Queued(
        row.user_id, row.txid, row.id, made[0], made[1], row.client_ip, row.platform, row.at_us
    )


class _Wakeable:
    """A loop that sleeps POLL_SECONDS between rounds unless woken."""

    def __init__(self) -> None:
        self._wake = asyncio.Event()
        self.stopping = False

    def wake(self) -> None:
        self._wake.set()

    async def pause(self, seconds: float = POLL_SECONDS) -> None:
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wake.wait()


class Feeder(_Wakeable):
    """Copies new outbox events into each URL's deliveries; works only in the process that
    holds the feeder lock."""

    def __init__(
        self,
        database_url: str,
        urls: Sequence[str],
        metrics: WebhookMetrics,
        senders: Sequence[_Wakeable] = (),
    ) -> None:
        super().__init__()
        self._leader = Leader(
            database_url, _FEEDER_LOCK, "follow-server webhooks", use_int_timestamps
        )
        self._urls = tuple(urls)
        self._metrics = metrics
        self._senders = tuple(senders)
        self._local = {s.url: s for s in senders if isinstance(s, Sender)}
        self._distributed: bool | None = None
        self._conn: asyncpg.Connection | None = None  # the lock's connection last fed on
        self._where: dict[str, Position] = {}  # each URL's position, as this feeder left it

    async def run(self) -> None:
        while not self.stopping:
            conn = None
            try:
                conn = await self._leader.connection()
                if conn is not None:
                    await self._feed(conn)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database may be restarting: try again later
                log.warning("webhook feeder paused: %s: %s", type(exc).__name__, exc)
                await self._leader.release()
                await self.pause(1.0)
            # a process without the lock asks for it (a connection each time) less often
            await self.pause(POLL_SECONDS if conn is None else FEED_POLL_SECONDS)

    async def stop(self) -> None:
        self.stopping = True
        await self._leader.release()

    async def _feed(self, conn: asyncpg.Connection) -> None:
        if self._distributed is None:
            self._distributed = await outbox.is_distributed(conn)
        if conn is not self._conn:  # (again) the leader: positions may have moved meanwhile
            self._conn, self._where = conn, {}
        missing = [url for url in self._urls if url not in self._where]
        if missing:
            self._where.update(await webhook_queue.positions(conn, missing))
        for url in self._urls:
            after = self._where.get(url)
            if after is None:  # configured by a process that started after this one
                start = await outbox.now_position(conn, self._distributed)
                await webhook_queue.ensure_positions(conn, [url], start)
                continue
            while not self.stopping:
                rows, _, _ = await outbox.read_final(conn, after, FEED_BATCH, self._distributed)
                if not rows:
                    break
                through = rows[-1].position
                if not await self._queue(conn, url, after, through, rows):
                    log.warning("webhook feeder: %s's position moved under it", url_label(url))
                    del self._where[url]
                    break
                after = self._where[url] = through
                label = url_label(url)
                for kind, n in collections.Counter(r.kind for r in rows).items():
                    self._metrics.events.labels(label, _KINDS.get(kind, "other")).inc(n)
                if len(rows) < FEED_BATCH:
                    break

    async def _queue(
        self,
        conn: asyncpg.Connection,
        url: str,
        after: Position,
        through: Position,
        rows: Sequence[OutboxRow],
    ) -> bool:
        """Queue the rows' deliveries and move the URL's position past them; False when it
        had moved. Off Citus, with this process's sender for the URL running, in one
        statement that also claims for it the heads it has room for and hands them over
        (no claim statement per round for them); else queued for a claim."""
        items = [q for q in map(queued_item, rows) if q is not None]
        sender = self._local.get(url)
        if self._distributed or sender is None or sender.stopping:
            distributed = bool(self._distributed)
            if not await webhook_queue.queue(conn, url, after, through, items, distributed):
                return False
            for other in self._senders:
                other.wake()
            return True
        claimed = await webhook_queue.queue_claiming(
            conn,
            url,
            after,
            through,
            items,
            sender.room(),
            sender.lease,
            secrets.randbits(63),
        )
        if claimed is None:
            return False
        sender.take(claimed, items)
        return True


class Sender(_Wakeable):
    """Delivers one URL's queued webhooks from this process: up to config.concurrency
    requests at once, one per user, each user's in order.

    One loop per URL does all the database work, a few statements per round however many
    webhooks the round covers: it marks the outcomes of the requests that finished since the
    last round (the 2xx ones deleted in one statement), then claims due heads until
    PREFETCH * concurrency are claimed and unfinished (one statement; two on Citus). Claimed
    deliveries go on the wire in claim order, config.concurrency at a time: a request that
    ends hands its outcome to the loop and starts the next one waiting. The loop sleeps until
    an outcome comes back, the feeder queues more, or POLL_SECONDS pass.

    In the process whose feeder works, the feeder claims the heads it queues for this
    sender in the statement that queues them and hands them over (take()): then a round
    claims only when something may be due that was not handed over (a marked delivery that
    came from a claim, or whose user has more queued behind it; rows the feeder had no room
    for), and at least every POLL_SECONDS (retries coming due, other processes' rows,
    leases run out), or IDLE_CLAIM_SECONDS once a claim found nothing."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        http: HttpClient,
        url: str,
        config: WebhookConfig,
        metrics: WebhookMetrics,
        distributed: bool = False,
    ) -> None:
        super().__init__()
        self._pool = pool
        self._distributed = distributed
        self._http = http
        self._url = url
        self._label = url_label(url)
        self._config = config
        self._metrics = metrics
        self._flying: dict[int, Delivery] = {}  # on the wire, by event id
        self._workers: set[asyncio.Task[None]] = set()  # each sends one request at a time
        self._waiting: collections.deque[Delivery] = collections.deque()  # claimed, not sent
        # outcomes not marked yet: ('' = a 2xx, else what failed; when, time.time())
        self._done: list[tuple[Delivery, str, float]] = []
        self._done_since = 0.0  # time.monotonic() when the first of them came back
        self._done_failed = False  # a failure among them: mark at once
        self._done_frees = False  # marking one of them frees its user's next delivery
        self._look = True  # there may be due heads: claim at the next round
        self._last_claim = 0.0  # time.monotonic() of the last claim
        self._claim_every = POLL_SECONDS  # IDLE_CLAIM_SECONDS after a claim found nothing
        self._handed: set[int] = set()  # event ids the feeder claimed and handed over
        self._behind: set[str] = set()  # users with deliveries queued after a handed one
        self._query_time = 0  # the RequestTime of the query strings made
        self._queries: dict[tuple[str, str, str], str] = {}  # by command, client IP, platform
        self._last_backlog = 0.0
        self._last_warning = 0.0
        self._failures_unsaid = 0

    @property
    def url(self) -> str:
        return self._url

    @property
    def lease(self) -> float:
        return self._config.lease

    def wake(self) -> None:
        """More may be due (the feeder queued some): claim at the next round."""
        self._look = True
        super().wake()

    def room(self) -> int:
        """How many more deliveries this sender may be handed now (0 once stopping)."""
        return 0 if self.stopping else max(0, self._room())

    def take(self, claimed: Sequence[Delivery], queued: Sequence[Queued]) -> None:
        """Deliveries the feeder claimed for this sender as it queued `queued`: on the wire
        at once. The users of the rest are remembered (marking a delivery of theirs makes
        their next one due: a claim then); a user of theirs with none handed over may have
        one due now (the feeder had no room for it): a claim at the next round."""
        handed = {d.event_id for d in claimed}
        left = {q.user_id for q in queued if q.event_id not in handed}
        self._handed.update(handed)
        self._behind.update(left)
        if left and self._done and not self._done_frees:
            self._done_frees = any(d.user_id in left for d, _, _ in self._done)
        self._waiting.extend(claimed)
        self._start()
        if left - {d.user_id for d in claimed}:
            self.wake()

    async def run(self) -> None:
        while not self.stopping:
            try:
                await self._round()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning(
                    "webhook sender for %s paused: %s: %s", self._label, type(exc).__name__, exc
                )
                with contextlib.suppress(Exception):
                    await self._pool.expire_connections()
                await self.pause(1.0)
                self._look = True
                continue
            wait = self._wait()
            if wait > 0:
                await self.pause(wait)

    async def stop(self) -> None:
        """Stop claiming; let requests on the wire finish (within the request timeout) and
        mark them, so a clean stop sends nothing twice."""
        self.stopping = True
        unsent = list(self._waiting)
        self._waiting.clear()
        if unsent:
            with contextlib.suppress(Exception):  # else their leases run out
                async with asyncio.timeout(5.0):
                    await webhook_queue.release(self._pool, self._url, unsent)
        workers = set(self._workers)  # they end after their request on the wire
        if workers:
            _, late = await asyncio.wait(workers, timeout=self._config.timeout + 2.0)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=2.0)
        if self._done:
            try:
                async with asyncio.timeout(5.0):
                    await self._mark()
            except Exception as exc:  # their leases run out and they are sent again
                log.warning(
                    "webhook sender for %s: outcomes not recorded at stop: %s: %s",
                    self._label,
                    type(exc).__name__,
                    exc,
                )

    async def _round(self) -> None:
        now = time.monotonic()
        if now - self._last_backlog >= BACKLOG_EVERY_SECONDS:
            self._last_backlog = now
            pending, parked = await webhook_queue.backlog(self._pool, self._url)
            self._metrics.backlog.labels(self._label).set(pending)
            self._metrics.parked_now.labels(self._label).set(parked)
        if self._done and now >= self._mark_at() and await self._mark():
            self._look = True  # those users' next webhooks may be due now
        if now - self._last_claim >= self._claim_every:
            self._look = True
        free = self._room()
        if not self._wants_claim() or not self._look or self.stopping:
            return
        token = secrets.randbits(63)
        self._last_claim = now
        batch = await webhook_queue.claim(
            self._pool, self._url, free, self._config.lease, token, self._distributed
        )
        self._look = len(batch) == free  # a full batch: more may be due
        self._claim_every = POLL_SECONDS if batch else IDLE_CLAIM_SECONDS
        self._waiting.extend(batch)
        self._start()

    def _room(self) -> int:
        """How many more deliveries this sender may claim now."""
        outstanding = len(self._flying) + len(self._waiting)
        return PREFETCH * self._config.concurrency - outstanding

    def _wants_claim(self) -> bool:
        """Whether to claim now: only once fewer than --callback-concurrency claimed
        deliveries wait their turn, so a claim fetches a batch (at least that many) instead
        of the one or two that the last answers made room for, and the wire still has a
        full round of requests queued while the claim runs."""
        return self._room() > 0 and len(self._waiting) < self._config.concurrency

    def _wait(self) -> float:
        """How long the loop may sleep before its next round (an outcome coming back or the
        feeder wakes it sooner): until outcomes are due to be marked (_mark_at), or a claim
        is due (woken by the feeder, a full batch last time, POLL_SECONDS since the last, or
        IDLE_CLAIM_SECONDS when the last found nothing)."""
        now = time.monotonic()
        wait = POLL_SECONDS
        if self._wants_claim():
            wait = 0.0 if self._look else self._last_claim + self._claim_every - now
        if self._done:
            wait = min(wait, self._mark_at() - now)
        elif not self._flying and not self._waiting:
            self._behind.clear()  # none of theirs is here: marking cannot free one
        return max(wait, 0.0)

    def _mark_at(self) -> float:
        """When the outcomes handed back are to be marked (time.monotonic()). Each marking
        is a statement, so outcomes gather: GATHER_SECONDS when marking one frees a user's
        next delivery (it came from a claim, or its user has more queued behind it), else
        MARK_SECONDS (only its lease waits: a handed-over delivery with nothing behind it);
        at once with a failure among them, PREFETCH * --callback-concurrency of them, or
        nothing more on the wire."""
        if self._done_failed or self._mark_now():
            return self._done_since
        return self._done_since + (GATHER_SECONDS if self._done_frees else MARK_SECONDS)

    def _mark_now(self) -> bool:
        return (
            self.stopping
            or len(self._done) >= PREFETCH * self._config.concurrency
            or not (self._flying or self._waiting)
        )

    def _frees(self, d: Delivery) -> bool:
        """Marking `d` may make its user's next delivery due: it came from a claim, or its
        user has more queued behind it."""
        return d.event_id not in self._handed or d.user_id in self._behind

    def _start(self) -> None:
        """Start workers for the claimed deliveries waiting, up to config.concurrency
        workers. A worker not on the wire has just been started and takes one of them."""
        while (
            not self.stopping
            and len(self._workers) < self._config.concurrency
            and len(self._waiting) > len(self._workers) - len(self._flying)
        ):
            worker = asyncio.create_task(self._work())
            self._workers.add(worker)
            worker.add_done_callback(self._workers.discard)

    async def _work(self) -> None:
        """Send claimed deliveries in claim order, one at a time, until none waits; each
        outcome goes to the loop, which marks it. A few workers going from one request to
        the next instead of a task per request (its creation was a twentieth of the
        senders' CPU); at most config.concurrency of them, so as many requests at once."""
        try:
            while self._waiting and not self.stopping:
                d = self._waiting.popleft()
                self._flying[d.event_id] = d
                try:
                    error = await self._post(d)
                except Exception as exc:  # not the receiver's answer: retried like one
                    error = f"{type(exc).__name__}: {exc}"
                finally:
                    self._flying.pop(d.event_id, None)
                first = not self._done
                if first:
                    self._done_since = time.monotonic()
                self._done.append((d, error, time.time()))
                frees = self._frees(d)
                # The loop's sleep already ends at the marking time of what came back before
                # (_mark_at): woken only when this outcome moves it (the first one, a
                # failure, one that frees a user's next delivery: GATHER_SECONDS) or marks
                # now (_mark_now), not once per answer.
                if first or error or (frees and not self._done_frees) or self._mark_now():
                    super().wake()
                self._done_failed = self._done_failed or bool(error)
                self._done_frees = self._done_frees or frees
        finally:
            # at once, not in the done callback (a loop step later): a _start in between
            # would count this worker as about to take a waiting delivery
            self._workers.discard(cast("asyncio.Task[None]", asyncio.current_task()))

    def _query(self, d: Delivery) -> str:
        """The webhook's query string, encoded: the same for every webhook of one command,
        client IP and platform within a second (RequestTime and its Sign), so made once
        for them (a Sign and the encoding were a tenth of a request's CPU)."""
        c = self._config
        now = int(time.time())
        if now != self._query_time:
            self._query_time, self._queries = now, {}
        key = (d.command, d.client_ip, d.platform)
        made = self._queries.get(key)
        if made is None:
            params = query(c.sdkappid, d.command, d.client_ip, d.platform, c.token, now)
            made = self._queries[key] = encode_query(params)
        return made

    async def _post(self, d: Delivery) -> str:
        """Send one webhook; '' on a 2xx, else what went wrong."""
        c = self._config
        try:
            status = await self._http.post(self._url, self._query(d), d.body.encode(), c.timeout)
        except TimeoutError:
            return f"no answer within {c.timeout:g}s"
        except HttpError as exc:
            return str(exc) or type(exc).__name__
        return "" if 200 <= status < 300 else f"HTTP {status}"

    async def _mark(self) -> bool:
        """Record the outcomes handed back so far: the 2xx ones in one statement per claim,
        each failure in its own (rare). An outcome leaves the list once recorded, so a
        database error leaves the rest for the next round (their leases still hold).
        Whether a user's next delivery may be due now: a delivery marked came from a claim,
        or its user has more queued behind it."""
        freed = any(self._frees(d) for d, _, _ in self._done)
        ok = [(d, at) for d, error, at in self._done if not error]
        if ok:
            gone = await webhook_queue.delivered(
                self._pool, self._url, [d for d, _ in ok], self._distributed
            )
            delivered = self._metrics.delivered.labels(self._label)
            lag = self._metrics.lag.labels(self._label)
            marked = {id(d) for d, _ in ok}  # more may have come back meanwhile
            self._done = [x for x in self._done if id(x[0]) not in marked]
            for d, at in ok:
                self._handed.discard(d.event_id)
                self._behind.discard(d.user_id)
                if d.event_id in gone:
                    delivered.inc()
                    lag.observe(max(0.0, at - d.event_at_us / 1e6))
                else:
                    log.warning("webhook to %s: a claim ran out during its request", self._label)
        for item in [x for x in self._done if x[1]]:
            d, error, _ = item
            await self._failed(d, error)
            self._done.remove(item)
            self._handed.discard(d.event_id)
        self._done_since = time.monotonic()
        # what came back while the statements ran stays for the next marking
        self._done_failed = any(error for _, error, _ in self._done)
        self._done_frees = any(self._frees(d) for d, _, _ in self._done)
        return freed

    async def _failed(self, d: Delivery, error: str) -> None:
        wait = backoff(self._config, d.attempts + 1)
        outcome = await webhook_queue.failed(self._pool, d, error, wait, self._config.retry_budget)
        if outcome is None:
            return
        parked, attempts = outcome
        if parked:
            self._metrics.parked.labels(self._label).inc()
            log.error(
                "webhook %s to %s for user %s (event %d) parked after %d attempts over the"
                " retry budget of %gs; last: %s",
                d.command,
                self._label,
                d.user_id,
                d.event_id,
                attempts,
                self._config.retry_budget,
                error,
            )
            return
        self._metrics.retried.labels(self._label).inc()
        self._failures_unsaid += 1
        now = time.monotonic()
        if now - self._last_warning >= _WARN_EVERY_SECONDS:
            log.warning(
                "webhook to %s failed: %s (%d failures since the last report; retrying with"
                " backoff)",
                self._label,
                error,
                self._failures_unsaid,
            )
            self._last_warning, self._failures_unsaid = now, 0


async def _no_reset(conn: asyncpg.Connection) -> None:
    """The pool's reset between uses: nothing (the senders set no session state), instead of
    asyncpg's default statement per release."""


async def sender_pool(database_url: str, size: int) -> asyncpg.Pool:
    """The senders' connections: timestamps as int microseconds, and synchronous_commit off.
    A claim, a delete on a 2xx or a backoff then returns without waiting for its WAL flush
    (PostgreSQL writes it within wal_writer_delay); a PostgreSQL crash can lose the last of
    them, and always a suffix (a later synchronous commit flushes every earlier one). A lost
    claim or delete means a webhook sent again: the crash window at-least-once allows, never
    a loss, and never a reordering (a lost delete keeps its user's later webhooks behind it).
    The feeder's queueing stays synchronous on its own connection. Every statement is planned
    for its run (plan_cache_mode): the queue starts empty and a generic plan made then (a
    nested loop over sequential scans) kept each claim at 1-2.6 s once it held ~1,000 rows,
    in the bench's first scenario (webhook lag p50 9 s), until autovacuum replanned it."""
    pool = await asyncpg.create_pool(
        database_url,
        min_size=1,
        max_size=size,
        command_timeout=30,
        server_settings={
            "application_name": "follow-server webhooks",
            "synchronous_commit": "off",
            "plan_cache_mode": "force_custom_plan",
        },
        init=use_int_timestamps,
        reset=_no_reset,
    )
    if pool is None:  # asyncpg types it optional; it is only None when not awaited
        raise RuntimeError("asyncpg returned no pool")
    return pool


class Webhooks:
    """The feeder and this process's senders, started and stopped with the service."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        http: HttpClient,
        feeder: Feeder,
        senders: list[Sender],
    ) -> None:
        self._pool = pool
        self._http = http
        self.feeder = feeder
        self.senders = senders
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    async def start(
        cls, config: WebhookConfig, database_url: str, metrics: WebhookMetrics
    ) -> Webhooks:
        """Give every URL a position (a new one starts at the events committing from now on)
        before the service takes calls, so none of its first events is missed; then run."""
        pool = await sender_pool(database_url, 4)
        try:
            async with pool.acquire() as conn:
                distributed = await outbox.is_distributed(conn)
                start = await outbox.now_position(conn, distributed)
                await webhook_queue.ensure_positions(conn, config.urls, start)
        except BaseException:
            await pool.close()
            raise
        http = HttpClient(config.concurrency * len(config.urls))
        senders = [Sender(pool, http, url, config, metrics, distributed) for url in config.urls]
        feeder = Feeder(database_url, config.urls, metrics, senders)
        running = cls(pool, http, feeder, senders)
        running._tasks = [
            asyncio.create_task(feeder.run(), name="webhook-feeder"),
            *(asyncio.create_task(s.run(), name="webhook-sender") for s in senders),
        ]
        return running

    async def stop(self) -> None:
        for sender in self.senders:
            sender.stopping = True
        self.feeder.stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.wait(self._tasks, timeout=5)
        await asyncio.gather(*(s.stop() for s in self.senders), self.feeder.stop())
        await self._http.close()
        try:
            async with asyncio.timeout(5):
                await self._pool.close()
        except TimeoutError:
            self._pool.terminate()
