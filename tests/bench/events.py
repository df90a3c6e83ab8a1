"""`make bench-events` (`python -m tests.bench --events`): what change events cost the writers,
and how late they arrive.

1. The bench's embedded PostgreSQL and seeded template (tests.bench.run: var/bench/pgdata),
   copied afresh for every run, so every run starts from the same data and makes the same
   calls (the write scenarios' plans are seeded).
2. Runs alternate between two servers (ABBA: off, on, then on, off, ...), each on its own copy:
   - "off": `follow-server` with no --callback-url and no watcher. The outbox rows
     (follow_events) are still written: they are part of every write's transaction and cannot
     be turned off, so "off" measures the service without delivery, not without the outbox.
   - "on": `follow-server --callback-url http://127.0.0.1:PORT/hook --callback-token T`, the URL
     a real HTTP receiver run by the bench (HookServer, a lean HTTP/1.1 server on asyncio's
     transports, in a process of its own: it checks each request's Sign, answers 200 and
     records when each webhook arrived), and, in a second process (as a
     separate system would be: its decoding of 20 events per Follow call does not delay the
     receiver's answers), one follow.v1.EventService/Watch stream read by a real gRPC client
     (every event, resuming from its last position if the stream breaks).
3. In each run the write scenarios of the bench (grpc:follow20, grpc:unfollow20 replaying its
   calls, grpc:follow1@celebrity; the bench has no v4 write scenario) run with the bench's load
   generators (tests.bench.load), warm-up and window. After each scenario's load the backlog
   (events committed, not yet received) is read, then the bench waits for it to drain before
   the next scenario, so each scenario's lag is its own.
4. Honest counts: the outbox rows each scenario wrote (one per call that changed something;
   checked against the change in the edge table over the run) are matched one by one with the
   webhooks received (command, user, targets, EventTime) and, per edge, with the Watch events
   (event id `<outbox id>.<n>`): delivered, missing, duplicated, badly signed.
5. Lag: webhooks from the body's EventTime to arrival at the receiver; Watch events from
   event_time to receipt. EventTime is stamped in the call's transaction after its lock
   (clock_timestamp()), so the lag includes the commit. Same host, same clock.
6. Per scenario: calls/s off and on (medians over the runs), on / off (target >= 0.8), lag
   p50 / p99 of both consumers, the backlog when the load stopped and how long it took to
   drain; a table and var/bench/bench-events[-quick].json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qsl

import asyncpg
import psutil

from server.database import Database, open_database
from server.runner import run as run_loop
from tests.bench.load import Target
from tests.bench.report import _num
from tests.bench.run import (
    FULL,
    QUICK,
    Monitor,
    Profile,
    ScenarioResult,
    Server,
    Workers,
    _nan_safe,
    _postmaster_pid,
    db_url,
    ensure_seed,
    git_revision,
    machine,
    prepare,
    run_scenario,
    start_server,
)

RUN_DB = "bench_events"
TOKEN = "bench-callback-token"
RATIO_TARGET = 0.8
DRAIN_SECONDS = 120.0
CONSUMERS = frozenset({"webhooks", "watch"})
FOLLOW_ADD = "Follow.CallbackAfterFollowAdd"
FOLLOW_DELETE = "Follow.CallbackAfterFollowDelete"

EVENT_SCENARIOS: list[tuple[str, str, int]] = [  # (name, description, plan seed)
    ("grpc:follow20", "Follow 20 new random targets", 20),
    ("grpc:unfollow20", "Unfollow the 20 targets of each Follow above", 20),
    ("grpc:follow1@celebrity", "everyone follows the celebrity (1 target)", 3),
]


# -- the consumers: webhook receiver and Watch client, each in a process of its own ----------


@dataclass(frozen=True, slots=True)
class Hook:
    """One webhook as it arrived."""

    at: float  # time.time() on arrival
    command: str
    user: str
    others: tuple[str, ...]
    event_ms: int
    signed: bool  # Sign matched sha256(token + RequestTime)

    @property
    def key(self) -> tuple[str, str, tuple[str, ...], int]:
        return self.command, self.user, self.others, self.event_ms


@dataclass(frozen=True, slots=True)
class Seen:
    """One Watch event as it was read (heartbeats are only counted)."""

    at: float  # time.time() on receipt
    id: str
    event_us: int


@dataclass
class Received:
    """Everything the consumer got, sent back to the parent at the end."""

    hooks: list[Hook] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    heartbeats: int = 0
    seen_count: int = 0  # Watch events read so far
    resumes: int = 0  # Watch streams that broke and were resumed
    errors: list[str] = field(default_factory=list)


def sign_ok(token: str, request_time: str, sign: str) -> bool:
    """The check a receiver makes: Sign = lower-case hex sha256(token + RequestTime)."""
    expected = hashlib.sha256((token + request_time).encode()).hexdigest()
    return hmac.compare_digest(expected, sign)


def hook_from(query: dict[str, str], body: dict[str, Any], at: float, token: str) -> Hook:
    command = str(body.get("CallbackCommand", query.get("CallbackCommand", "")))
    if command == FOLLOW_ADD:
        others = tuple(str(x["To_Account"]) for x in body.get("FollowList", []))
    else:
        others = tuple(str(x) for x in body.get("To_Account", []))
    signed = sign_ok(token, query.get("RequestTime", ""), query.get("Sign", ""))
    return Hook(
        at, command, str(body.get("From_Account", "")), others, int(body["EventTime"]), signed
    )


def consumer_main(pipe: Connection, token: str) -> None:
    """The consumer process: answers the parent's commands over `pipe` (see Consumer). On
    uvloop where installed, as the server runs (server.runner.run): the default loop's
    rounds were most of the receiver's CPU per webhook."""
    run_loop(_consume(pipe, token))


def _answer(status: str, body: bytes) -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


_OK = _answer("200 OK", b'{"ActionStatus":"OK","ErrorCode":0,"ErrorInfo":""}')
_FORBIDDEN = _answer(
    "403 Forbidden", b'{"ActionStatus":"FAIL","ErrorCode":1,"ErrorInfo":"bad Sign"}'
)
_NOT_FOUND = _answer("404 Not Found", b"{}")
_LENGTH_REQUIRED = _answer("411 Length Required", b"{}")


class HookServer(asyncio.Protocol):
    """The bench's webhook receiver: HTTP/1.1 with Content-Length bodies and kept-alive
    connections, enough for the service's sender (and aiohttp's client in the tests), on
    asyncio's transports. It shares the 2 cores with the server under test, where a real
    receiver would be a system of its own: aiohttp's server on the default loop took
    ~160 us of CPU per webhook, this on uvloop ~55 us, so the on runs measure the service
    more than its receiver. `handle(target, body)` records a POST to
    /hook and returns the whole answer."""

    def __init__(self, handle: Callable[[bytes, bytes], bytes]) -> None:
        self._handle = handle
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        transport = self._transport
        while transport is not None and not transport.is_closing():
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            raw = bytes(self._buffer[:end])
            head = raw.lower()
            at = head.find(b"\r\ncontent-length:")
            if at < 0:
                transport.write(_LENGTH_REQUIRED)
                transport.close()
                return
            line_end = head.find(b"\r\n", at + 2)
            length = int(head[at + 17 : line_end if line_end > 0 else len(head)])
            if len(self._buffer) < end + 4 + length:
                return
            body = bytes(self._buffer[end + 4 : end + 4 + length])
            del self._buffer[: end + 4 + length]
            method, target, _ = raw[: head.find(b"\r\n")].split(b" ", 2)
            if method != b"POST" or not target.startswith(b"/hook"):
                transport.write(_NOT_FOUND)
            else:
                transport.write(self._handle(target, body))
            if b"\r\nconnection: close" in head:
                transport.close()


async def _consume(pipe: Connection, token: str) -> None:
    import grpc
    import orjson

    from follow.v1 import events_pb2 as ev
    from follow.v1 import events_pb2_grpc as ev_rpc

    got = Received()
    # What arrived, kept as it came and turned into Hooks and Seens only at stop, after the
    # load: the consumers share the 2 cores with the server under test, so they do no more
    # per item while it is measured than a receiver has to (the Sign check, the answer).
    bodies: list[tuple[float, bytes, bytes, bool]] = []  # (when, query, body, signed)
    messages: list[tuple[float, Any]] = []

    def hook(target: bytes, body: bytes) -> bytes:
        at = time.time()
        raw = target.partition(b"?")[2]
        # RequestTime and Sign (digits, hex) need no unquoting; the rest is decoded at stop
        params = dict(part.partition(b"=")[::2] for part in raw.split(b"&"))
        signed = sign_ok(
            token, params.get(b"RequestTime", b"").decode(), params.get(b"Sign", b"").decode()
        )
        bodies.append((at, raw, body, signed))
        return _OK if signed else _FORBIDDEN

    def settle() -> None:
        """Turn what arrived into Hooks and Seens (at stop)."""
        for at, raw, body, _ in bodies:
            query = dict(parse_qsl(raw.decode()))
            got.hooks.append(hook_from(query, orjson.loads(body), at, token))
        bodies.clear()
        for at, message in messages:
            for event in message.events:
                t = event.event_time
                got.seen.append(Seen(at, event.id, t.seconds * 1_000_000 + t.nanos // 1000))
        messages.clear()

    server = await asyncio.get_running_loop().create_server(
        lambda: HookServer(hook), "127.0.0.1", 0
    )
    pipe.send(server.sockets[0].getsockname()[1])

    async def watch(address: str) -> None:
        position = ""
        while True:
            try:
                async with grpc.aio.insecure_channel(address) as channel:
                    stream = ev_rpc.EventServiceStub(channel).Watch(
                        ev.WatchRequest(start_after=position)
                    )
                    async for message in stream:
                        n = len(message.events)
                        if n:
                            messages.append((time.time(), message))
                            got.seen_count += n
                        else:
                            got.heartbeats += 1
                        position = message.position
            except grpc.aio.AioRpcError as error:
                if error.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE):
                    got.errors.append(f"Watch: {error.code().name} {error.details()}")
                    return
                got.resumes += 1
                await asyncio.sleep(0.2)

    watcher: asyncio.Task[None] | None = None
    try:
        while True:
            command = await asyncio.to_thread(pipe.recv)
            if command[0] == "watch":
                watcher = asyncio.create_task(watch(command[1]))
                pipe.send("watching")
            elif command[0] == "counts":
                pipe.send((len(bodies), got.seen_count))
            elif command[0] == "stop":
                if watcher is not None:
                    watcher.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await watcher
                settle()
                pipe.send(got)
                return
    finally:
        server.close()


class Consumer:
    """The parent's handle on the consumer process."""

    def __init__(self, token: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._pipe, child = ctx.Pipe()
        self._proc = ctx.Process(target=consumer_main, args=(child, token), daemon=True)
        self._proc.start()
        self.port: int = self._ask(None)

    def _ask(self, command: tuple[Any, ...] | None, budget: float = 60.0) -> Any:
        if command is not None:
            self._pipe.send(command)
        if not self._pipe.poll(budget):
            raise SystemExit("the webhook receiver / watcher did not answer in time")
        return self._pipe.recv()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def watch(self, grpc_address: str) -> None:
        self._ask(("watch", grpc_address))

    def cpu_seconds(self) -> float:
        """The process's CPU time so far (user + system)."""
        try:
            t = psutil.Process(self._proc.pid).cpu_times()
        except psutil.Error:
            return 0.0
        return float(t.user + t.system)

    def counts(self) -> tuple[int, int]:
        hooks, seen = self._ask(("counts",))
        return int(hooks), int(seen)

    def stop(self) -> Received:
        got: Received = self._ask(("stop",), budget=120.0)
        self._proc.join(timeout=10)
        return got

    def kill(self) -> None:
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(timeout=10)


class Consumers:
    """The webhook receiver and the Watch client in two consumer processes, as two
    independent systems would be: a Watch stream busy decoding 20 events per Follow call
    does not hold back the receiver's answers, so each lag is its own consumer's."""

    def __init__(self, token: str) -> None:
        self._hooks = Consumer(token)
        try:
            self._watcher = Consumer(token)  # its receiver stays idle
        except BaseException:
            self._hooks.kill()
            raise

    @property
    def url(self) -> str:
        return self._hooks.url

    def watch(self, grpc_address: str) -> None:
        self._watcher.watch(grpc_address)

    def counts(self) -> tuple[int, int]:
        return self._hooks.counts()[0], self._watcher.counts()[1]

    def cpu_seconds(self) -> tuple[float, float]:
        """CPU time so far of the webhook receiver's process and of the Watch client's."""
        return self._hooks.cpu_seconds(), self._watcher.cpu_seconds()

    def stop(self) -> Received:
        hooks, watched = self._hooks.stop(), self._watcher.stop()
        return Received(
            hooks.hooks,
            watched.seen,
            watched.heartbeats,
            watched.seen_count,
            watched.resumes,
            hooks.errors + watched.errors,
        )

    def kill(self) -> None:
        self._hooks.kill()
        self._watcher.kill()


# -- what the outbox says should arrive -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Written:
    """One outbox row (one call that changed something)."""

    id: int
    kind: int  # 1 follow, 2 unfollow
    user: str
    others: tuple[str, ...]
    at_us: int

    @property
    def hook_key(self) -> tuple[str, str, tuple[str, ...], int]:
        command = FOLLOW_ADD if self.kind == 1 else FOLLOW_DELETE
        return command, self.user, self.others, self.at_us // 1000

    @property
    def event_ids(self) -> list[str]:
        return [f"{self.id}.{n}" for n in range(len(self.others))]


_MAX_ID = "SELECT coalesce(max(id), 0) FROM follow_events"
_ROWS = """
SELECT id, kind, user_id, others,
       (extract(epoch FROM at) * 1000000)::bigint AS at_us
FROM follow_events WHERE id > $1 AND id <= $2 AND kind IN (1, 2) ORDER BY id
"""
_EDGES = "SELECT count(*) FROM following"


async def _fetchval(url: str, sql: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval(sql))
    finally:
        await conn.close()


async def _rows(url: str, after: int, upto: int) -> list[Written]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(_ROWS, after, upto)
    finally:
        await conn.close()
    return [Written(r[0], r[1], r[2], tuple(r[3]), r[4]) for r in rows]


def percentile(values: list[float], q: float) -> float | None:
    """The q-quantile (nearest rank) of `values`, None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def match(written: list[Written], got: Received) -> dict[str, Any]:
    """Every written event against what arrived: counts, and lags in ms (first arrival)."""
    want_hooks = Counter(w.hook_key for w in written)
    first_hook: dict[tuple[str, str, tuple[str, ...], int], float] = {}
    hook_arrivals: Counter[tuple[str, str, tuple[str, ...], int]] = Counter()
    for h in got.hooks:
        if h.key in want_hooks and h.signed:
            hook_arrivals[h.key] += 1
            first_hook.setdefault(h.key, h.at)
    hook_lags = [(at - key[3] / 1000) * 1000 for key, at in first_hook.items()]
    want_ids = {i: w.at_us for w in written for i in w.event_ids}
    first_seen: dict[str, float] = {}
    seen_count: Counter[str] = Counter()
    for s in got.seen:
        if s.id in want_ids:
            seen_count[s.id] += 1
            first_seen.setdefault(s.id, s.at)
    watch_lags = [(at - want_ids[i] / 1e6) * 1000 for i, at in first_seen.items()]
    return {
        "calls_changed": len(written),
        "edges_changed": len(want_ids),
        "webhooks_expected": sum(want_hooks.values()),
        "webhooks_delivered": sum(min(n, want_hooks[k]) for k, n in hook_arrivals.items()),
        "webhooks_duplicated": sum(max(0, n - want_hooks[k]) for k, n in hook_arrivals.items()),
        "watch_expected": len(want_ids),
        "watch_delivered": len(first_seen),
        "watch_duplicated": sum(n - 1 for n in seen_count.values()),
        "webhook_lag_p50_ms": percentile(hook_lags, 0.50),
        "webhook_lag_p99_ms": percentile(hook_lags, 0.99),
        "webhook_lag_max_ms": max(hook_lags, default=None),
        "watch_lag_p50_ms": percentile(watch_lags, 0.50),
        "watch_lag_p99_ms": percentile(watch_lags, 0.99),
        "watch_lag_max_ms": max(watch_lags, default=None),
    }


# -- the runs ---------------------------------------------------------------------------------


async def _copy(database: Database, seed: str) -> str:
    admin = await asyncpg.connect(database.url)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {RUN_DB} WITH (FORCE)")
        await admin.execute(f"CREATE DATABASE {RUN_DB} TEMPLATE {seed} STRATEGY FILE_COPY")
    finally:
        await admin.close()
    return db_url(database, RUN_DB)


async def _drop(database: Database) -> None:
    admin = await asyncpg.connect(database.url)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {RUN_DB} WITH (FORCE)")
    finally:
        await admin.close()


def _drain(consumer: Consumers, hooks_want: int, seen_want: int) -> tuple[float, bool]:
    """Wait until the consumer has at least this many webhooks and Watch events."""
    t0 = time.monotonic()
    while True:
        hooks, seen = consumer.counts()
        if hooks >= hooks_want and seen >= seen_want:
            return time.monotonic() - t0, True
        if time.monotonic() - t0 > DRAIN_SECONDS:
            return time.monotonic() - t0, False
        time.sleep(0.05)


def one_run(
    database: Database,
    seed: str,
    meta: dict[str, Any],
    profile: Profile,
    events_on: bool,
    out: Path,
    workers_n: int,
    label: str,
    consumers: frozenset[str] = CONSUMERS,
) -> dict[str, Any]:
    """A fresh copy, a server (events on or off), the write scenarios; its figures."""
    url = asyncio.run(_copy(database, seed))
    consumer: Consumers | None = None
    server: Server | None = None
    workers: Workers | None = None
    load_start = [round(x, 2) for x in os.getloadavg()]
    scenarios: dict[str, Any] = {}
    try:
        extra: list[str] = []
        if events_on:
            consumer = Consumers(TOKEN)
            if "webhooks" in consumers:
                extra = ["--callback-url", consumer.url, "--callback-token", TOKEN]
        log = out / f"bench-events-server-{'on' if events_on else 'off'}.log"
        server = start_server(url, profile, log, workers_n, extra)
        if consumer is not None and "watch" in consumers:
            consumer.watch(server.grpc_address)
        fixtures = asyncio.run(prepare(url, meta))
        workers = Workers(profile.processes, Target(server.grpc_address, url))
        pid = _postmaster_pid(database)
        monitor = Monitor(server, [pid] if pid is not None else [])
        edges_before = asyncio.run(_fetchval(url, _EDGES))
        results: dict[str, ScenarioResult] = {}
        ranges: dict[str, tuple[int, int]] = {}
        hooks_total = seen_total = 0
        for name, description, plan_seed in EVENT_SCENARIOS:
            limits = results["grpc:follow20"].issued_per_worker if "unfollow" in name else None
            first = asyncio.run(_fetchval(url, _MAX_ID))
            cpu_before = consumer.cpu_seconds() if consumer is not None else (0.0, 0.0)
            t0 = time.monotonic()
            result = run_scenario(
                workers, monitor, profile, name, description, meta, fixtures, limits, plan_seed
            )
            wall = time.monotonic() - t0
            cpu_after = consumer.cpu_seconds() if consumer is not None else (0.0, 0.0)
            last = asyncio.run(_fetchval(url, _MAX_ID))
            results[name] = result
            ranges[name] = (first, last)
            written = asyncio.run(_rows(url, first, last))
            row: dict[str, Any] = {"result": asdict(result), "calls_changed": len(written)}
            if consumer is not None:
                # CPU the consumers took from the 2 cores the server shares with them, over
                # the scenario's whole load (warm-up included): % of one core
                row["receiver_cpu_pct"] = round(100 * (cpu_after[0] - cpu_before[0]) / wall, 1)
                row["watch_client_cpu_pct"] = round(100 * (cpu_after[1] - cpu_before[1]) / wall, 1)
            line = f"  {label} {name:<24} {result.calls_per_s:>8.0f}/s  errors {result.errors}"
            if consumer is not None:
                hooks_total += len(written) if "webhooks" in consumers else 0
                seen_total += sum(len(w.others) for w in written) if "watch" in consumers else 0
                hooks, seen = consumer.counts()
                row["backlog_at_end"] = {
                    "webhooks": hooks_total - hooks,
                    "watch": seen_total - seen,
                }
                drain_s, drained = _drain(consumer, hooks_total, seen_total)
                row["drain_s"] = round(drain_s, 3)
                row["drained"] = drained
                line += (
                    f"  backlog {hooks_total - hooks} webhooks / {seen_total - seen} Watch events,"
                    f" drained in {drain_s:.1f}s"
                )
            print(line, file=sys.stderr)
            scenarios[name] = row
        edges_after = asyncio.run(_fetchval(url, _EDGES))
        everything = asyncio.run(_rows(url, 0, 2**62))
        net = sum(len(w.others) * (1 if w.kind == 1 else -1) for w in everything)
        outbox_vs_edges = {"edges_net_change": edges_after - edges_before, "outbox_net": net}
        if consumer is not None:
            got = consumer.stop()
            consumer = None
            for name, (first, last) in ranges.items():
                written = [w for w in everything if first < w.id <= last]
                matched = match(written, got)
                for off in CONSUMERS - consumers:  # not measured in this run
                    prefix = "webhook" if off == "webhooks" else off
                    matched = {k: v for k, v in matched.items() if not k.startswith(prefix)}
                scenarios[name] |= matched
            extra_hooks = len(got.hooks) - sum(
                scenarios[n].get("webhooks_delivered", 0)
                + scenarios[n].get("webhooks_duplicated", 0)
                for n in ranges
            )
            consumer_doc = {
                "webhooks_received": len(got.hooks),
                "webhooks_badly_signed": sum(1 for h in got.hooks if not h.signed),
                "webhooks_unmatched": extra_hooks,
                "watch_events_received": len(got.seen),
                "watch_heartbeats": got.heartbeats,
                "watch_resumes": got.resumes,
                "errors": got.errors,
            }
        else:
            consumer_doc = {}
    finally:
        if workers is not None:
            workers.close()
        if server is not None:
            server.stop()
        if consumer is not None:
            consumer.kill()
        with contextlib.suppress(Exception):
            asyncio.run(_drop(database))
    return {
        "events": "on" if events_on else "off",
        "label": label,
        "load_average_start": load_start,
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "outbox_vs_edges": outbox_vs_edges,
        "consumer": consumer_doc,
        "scenarios": scenarios,
    }


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(present) if present else None


def _cpu_ms(scenario: dict[str, Any], who: str) -> float | None:
    """CPU ms per call of the server ("server") or PostgreSQL ("db") in one run's scenario."""
    r = scenario["result"]
    calls = r["calls_per_s"]
    return r[f"{who}_cpu_pct"] * 10 / calls if calls else None


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per scenario: medians of calls/s off and on, their ratio, the lags, the counts."""
    rows = []
    for name, _, _ in EVENT_SCENARIOS:
        off = [
            r["scenarios"][name] for r in runs if r["events"] == "off" and name in r["scenarios"]
        ]
        on = [r["scenarios"][name] for r in runs if r["events"] == "on" and name in r["scenarios"]]
        # A run whose load generators completed no call in the window (seen at load average
        # 10-15 on the 2 cores: the generators starved, not the server slowed) measured
        # nothing: it is counted apart, not as 0 calls/s in the medians.
        off_tput = _median([s["result"]["calls_per_s"] or None for s in off])
        on_tput = _median([s["result"]["calls_per_s"] or None for s in on])
        ratio = on_tput / off_tput if on_tput is not None and off_tput else None
        row: dict[str, Any] = {
            "scenario": name,
            "calls_per_s_off": off_tput,
            "calls_per_s_on": on_tput,
            "calls_per_s_off_runs": [s["result"]["calls_per_s"] for s in off],
            "calls_per_s_on_runs": [s["result"]["calls_per_s"] for s in on],
            "ratio": ratio,
            "stalled_runs": sum(1 for s in off + on if not s["result"]["calls_per_s"]),
            "target": RATIO_TARGET,
            "met": None if ratio is None else ratio >= RATIO_TARGET,
            "p99_ms_off": _median([s["result"]["p99_ms"] for s in off]),
            "server_cpu_ms_per_call_off": _median([_cpu_ms(s, "server") for s in off]),
            "server_cpu_ms_per_call_on": _median([_cpu_ms(s, "server") for s in on]),
            "db_cpu_ms_per_call_off": _median([_cpu_ms(s, "db") for s in off]),
            "db_cpu_ms_per_call_on": _median([_cpu_ms(s, "db") for s in on]),
            "p99_ms_on": _median([s["result"]["p99_ms"] for s in on]),
            "errors": sum(s["result"]["errors"] for s in off + on),
        }
        for key in (
            "webhook_lag_p50_ms",
            "webhook_lag_p99_ms",
            "watch_lag_p50_ms",
            "watch_lag_p99_ms",
            "drain_s",
            "receiver_cpu_pct",
            "watch_client_cpu_pct",
        ):
            row[key] = _median([s.get(key) for s in on])
        for key in ("webhooks_expected", "webhooks_delivered", "webhooks_duplicated"):
            row[key] = sum(s.get(key, 0) for s in on)
        for key in ("watch_expected", "watch_delivered", "watch_duplicated"):
            row[key] = sum(s.get(key, 0) for s in on)
        row["backlog_at_end_webhooks"] = max(
            (s["backlog_at_end"]["webhooks"] for s in on), default=None
        )
        row["backlog_at_end_watch"] = max((s["backlog_at_end"]["watch"] for s in on), default=None)
        rows.append(row)
    return rows


def render_events_table(doc: dict[str, Any]) -> str:
    m, cfg, g = doc["machine"], doc["config"], doc["graph"]
    lines = [
        f"events run, git {doc['git']['revision'][:10]}"
        f"{' (dirty)' if doc['git']['dirty'] else ''}: {m['cpu_count']} x {m['cpu_model']},"
        f" {m['memory_gb']} GB, Python {m['python']}, PostgreSQL {m['postgres']};"
        f" load average at start {m['load_average_at_start']}, at end {m['load_average_at_end']}",
        f"graph: {g['params']['users']:,} users, {g['edges']:,} edges; load: {cfg['concurrency']}"
        f" calls in flight from {cfg['processes']} processes, {cfg['warmup']}s warm-up +"
        f" {cfg['duration']}s measured per scenario; {cfg['runs']} runs alternating"
        f" ({', '.join(r['events'] for r in doc['runs'])}), a fresh copy of the data each",
        "off: no --callback-url, no watcher (the outbox rows are still written: part of every"
        f" write); on ({' + '.join(cfg.get('on', sorted(CONSUMERS)))}): --callback-url to an"
        " HTTP receiver checking Sign, one Watch stream reading every event."
        " Medians over the runs; lag from the event's time to arrival;"
        " backlog when the load stopped (worst run); delivered/expected summed over the on runs",
        "",
        "| scenario | calls/s off | calls/s on | on / off | target | webhook lag p50 / p99 ms"
        " | Watch lag p50 / p99 ms | backlog at end (webhooks / Watch) | drained in s"
        " | webhooks delivered / expected (dup) | Watch events delivered / expected (dup)"
        " | server / PostgreSQL CPU ms per call, off → on | consumers' CPU % of a core"
        " (receiver / Watch client) |",
        "|---|---:|---:|---:|:---:|---|---|---|---:|---|---|---|---|",
    ]
    for r in doc["summary"]:
        met = "n/a" if r["met"] is None else ("yes" if r["met"] else "**no**")
        lines.append(
            f"| {r['scenario']} | {_num(r['calls_per_s_off'], 0)} | {_num(r['calls_per_s_on'], 0)}"
            f" | {_num(r['ratio'])} | >= {r['target']} ({met}) |"
            f" {_num(r['webhook_lag_p50_ms'], 1)} / {_num(r['webhook_lag_p99_ms'], 1)} |"
            f" {_num(r['watch_lag_p50_ms'], 1)} / {_num(r['watch_lag_p99_ms'], 1)} |"
            f" {r['backlog_at_end_webhooks']} / {r['backlog_at_end_watch']} |"
            f" {_num(r['drain_s'], 1)} |"
            f" {r['webhooks_delivered']:,} / {r['webhooks_expected']:,}"
            f" ({r['webhooks_duplicated']}) |"
            f" {r['watch_delivered']:,} / {r['watch_expected']:,} ({r['watch_duplicated']}) |"
            f" {_num(r['server_cpu_ms_per_call_off'])} / {_num(r['db_cpu_ms_per_call_off'])} →"
            f" {_num(r['server_cpu_ms_per_call_on'])} / {_num(r['db_cpu_ms_per_call_on'])} |"
            f" {_num(r['receiver_cpu_pct'], 0)} / {_num(r['watch_client_cpu_pct'], 0)} |"
        )
    stalled = [f"{r['scenario']}: {r['stalled_runs']}" for r in doc["summary"] if r["stalled_runs"]]
    if stalled:
        lines += [
            "",
            "runs that completed no call in the window (the load generators starved by the"
            f" machine's other load), left out of the medians: {', '.join(stalled)}",
        ]
    lines += [
        "",
        "each run's calls/s (and the 1-minute load average when it started): the machine's"
        " other load moves them more than events do; the medians above are over these",
        "",
        "| run | events | load | " + " | ".join(name for name, _, _ in EVENT_SCENARIOS) + " |",
        "|---|---|---:|" + "---:|" * len(EVENT_SCENARIOS),
    ]
    for run in doc["runs"]:
        tputs = [
            _num(run["scenarios"][name]["result"]["calls_per_s"], 0)
            if name in run["scenarios"]
            else "n/a"
            for name, _, _ in EVENT_SCENARIOS
        ]
        lines.append(
            f"| {run['label']} | {run['events']} | {run['load_average_start'][0]} |"
            f" {' | '.join(tputs)} |"
        )
    checks = []
    for run in doc["runs"]:
        ove = run["outbox_vs_edges"]
        c = run["consumer"]
        checks.append(
            f"{run['label']} ({run['events']}): outbox net edges {ove['outbox_net']:+,} vs table"
            f" {ove['edges_net_change']:+,}"
            + (
                f"; received {c['webhooks_received']:,} webhooks ({c['webhooks_badly_signed']}"
                f" badly signed, {c['webhooks_unmatched']} unmatched),"
                f" {c['watch_events_received']:,} Watch events, {c['watch_resumes']} resumes"
                + (f", errors {c['errors']}" if c["errors"] else "")
                if c
                else ""
            )
        )
    return "\n".join([*lines, "", *checks])


def run_events(args: argparse.Namespace) -> None:
    """`python -m tests.bench --events`: see the module docstring."""
    started = time.monotonic()
    base = QUICK if args.quick else FULL
    profile = Profile(
        base.graph,
        warmup=args.warmup if args.warmup is not None else base.warmup,
        duration=args.duration or base.duration,
        concurrency=args.concurrency or base.concurrency,
        processes=args.processes or base.processes,
    )
    pairs = args.events_rounds or (1 if args.quick else 2)
    consumers = frozenset(args.events_on or CONSUMERS)
    if not consumers <= CONSUMERS:
        raise SystemExit(f"--events-on: one or both of {','.join(sorted(CONSUMERS))}")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    load_start = [round(x, 2) for x in os.getloadavg()]
    database = asyncio.run(open_database(None, out / "pgdata"))
    runs: list[dict[str, Any]] = []
    try:
        seed, meta = asyncio.run(ensure_seed(database, profile.graph, out))
        pg_version = asyncio.run(_fetch_version(database))
        for p in range(pairs):
            # ABBA: off, on, then on, off, ... so drift in the machine's load evens out.
            for events_on in (False, True) if p % 2 == 0 else (True, False):
                label = f"run {len(runs) + 1}/{2 * pairs}"
                print(f"{label}: events {'on' if events_on else 'off'}", file=sys.stderr)
                runs.append(
                    one_run(
                        database,
                        seed,
                        meta,
                        profile,
                        events_on,
                        out,
                        args.workers,
                        label,
                        consumers,
                    )
                )
    finally:
        database.close()
    doc = {
        "profile": "events-quick" if args.quick else "events",
        "config": asdict(profile)
        | {"server_workers": args.workers, "runs": len(runs), "on": sorted(consumers)},
        "machine": machine(pg_version)
        | {
            "load_average_at_start": load_start,
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        },
        "git": git_revision(),
        "graph": meta,
        "runs": runs,
        "summary": summarise(runs),
        "seconds": round(time.monotonic() - started, 1),
    }
    stem = "bench-events-quick" if args.quick else "bench-events"
    json_path = out / f"{stem}.json"
    json_path.write_text(json.dumps(doc, indent=2, default=_nan_safe) + "\n")
    print(render_events_table(doc))
    print(f"\nwrote {json_path} in {doc['seconds']:.0f}s")


async def _fetch_version(database: Database) -> str:
    conn = await asyncpg.connect(database.url)
    try:
        version: str = await conn.fetchval("SHOW server_version")
        return version
    finally:
        await conn.close()
