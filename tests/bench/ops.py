"""`make bench-ops` (`python -m tests.bench --ops`): operations whose cost grows with the
graph, measured from the other users' side (issue 10, "Must show").

1. An embedded PostgreSQL of its own (var/bench/ops-pgdata) holds a template graph in which
   one account (the generator's celebrity, u0000000) has 400,000 fans, seeded once with the
   bulk importer (tests.bench.run.ensure_seed, cached by graph parameters).
2. Per operation and repetition: a fresh copy of the template, `follow-server` on it (gRPC,
   and the v4 shim when this build has one), and background clients in separate processes:
   other users following, unfollowing what they followed, checking and reading counts
   (Check and GetInfo of 20 targets), closed-loop, every call timed with its start instant.
3. A baseline window first (no operation running), then the operation:
   - `delete`: DeleteAccounts of the 400,000-fan account through the real API (gRPC
     AccountService, or the v4 `account_delete` with --ops-door v4): the call's own
     latency, then the time until its tombstone (account_tombstones) is gone, i.e. until
     the background cleanup (server.cleanup.DeletionCleaner) has removed every edge;
   - `import`: `follow-server import` (a subprocess, whatever the importer does today) of
     300,000 new edges (100,000 new accounts, each edge with a new user at one end) into
     the live database: its wall time and edges/s.
   The window "during" runs from the operation's start until it is over (the cleanup
   finished / the importer exited). Then a short tail, and the clients stop.
4. For each window: the other users' calls in flight during it (p50, p99, max latency),
   calls completed per second, errors, and the longest stretch in which no call completed
   at all (a stall); ratios during / baseline. The issue's target: worst latency under
   0.5 s and calls keep completing (reported as met or not; nothing asserts on time).
5. A table on the terminal and var/bench/bench-ops.json with every figure, per repetition
   and as medians, the load average at each run's start and end, and the git revision.

For the import it also says what the slowest calls met (tests.bench.opslocks): each call's
users are recorded, the importer writes its batch log (`--batch-log`), and each of the
slowest calls is marked with the batches overlapping it and whether it needed a lock one
of them held; `result.slow_calls` in the JSON. Importer flags to compare, interleaved
across the repetitions: FOLLOW_BENCH_OPS_IMPORT_FLAGS="--pause-ratio 0|--pause-ratio 1".

`--ops-import-checkout DIR` runs the importer of another checkout (`python -m server import`
with DIR first on PYTHONPATH), e.g. `git archive <rev> server gen | tar -x -C DIR`, for a
before/after comparison against the same service.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import asyncpg

from server import runner
from server.database import Database, open_database
from tests.bench import graph as graphs
from tests.bench import opslocks
from tests.bench.load import USERS_FORMAT
from tests.bench.report import render_ops_table
from tests.bench.run import (
    V4_ADMIN,
    V4_APP,
    Profile,
    SeedImporter,
    Server,
    _nan_safe,
    _usersig,
    db_url,
    ensure_seed,
    git_revision,
    machine,
    seed_key,
    start_server,
)

# The issue's target for other users' calls while an operation runs.
WORST_LATENCY_TARGET_S = 0.5
OPS = ("delete", "import")
RUN_DB = "ops_run"
CALL_TIMEOUT_S = 120.0


@dataclass(frozen=True, slots=True)
class OpsSize:
    """The template graph and the import file."""

    graph: graphs.GraphParams
    import_accounts: int
    import_edges: int


# 500,000 users, 1,000,000 edges of which 400,000 are the celebrity's fans.
FULL = OpsSize(
    graphs.GraphParams(users=500_000, edges=1_000_000, celebrity_followers=400_000),
    import_accounts=100_000,
    import_edges=300_000,
)
QUICK = OpsSize(
    graphs.GraphParams(users=50_000, edges=100_000, celebrity_followers=40_000),
    import_accounts=10_000,
    import_edges=30_000,
)


# -- the background clients -----------------------------------------------------------------

FOLLOW, UNFOLLOW, CHECK, GETINFO = range(4)
OP_NAMES = ("follow", "unfollow", "check20", "getinfo20")
# Weights of the mix: writes and reads about evenly.
MIX = (3, 2, 2, 3)


@dataclass(frozen=True, slots=True)
class ClientJob:
    """What one background client process does, and when."""

    grpc_address: str
    users: int  # ids u0000001 .. users-1: everyone but the celebrity (u0000000)
    concurrency: int
    seed: int
    start: float  # time.monotonic() instant the calls start
    hard_stop: float  # the latest instant a call starts, whatever happens


@dataclass(slots=True)
class ClientRecords:
    """Every call one process made: parallel lists (cheap to pickle)."""

    starts: list[float] = field(default_factory=list)  # time.monotonic(), shared by processes
    latencies: list[float] = field(default_factory=list)  # seconds
    kinds: list[int] = field(default_factory=list)
    failed: list[bool] = field(default_factory=list)
    actors: list[int] = field(default_factory=list)  # the acting user's number
    targets: list[int] = field(default_factory=list)  # Follow/Unfollow's target, else -1
    error_sample: str = ""


def client_main(index: int, job: ClientJob, stop: Event, pipe: Connection) -> None:
    """A load process: calls until `stop` is set (or hard_stop), then sends its records."""
    try:
        records = runner.run(_clients(index, job, stop))
    except Exception as exc:  # reported, not raised: the parent owns the run
        records = ClientRecords(error_sample=f"{type(exc).__name__}: {exc}")
    pipe.send(records)


async def _clients(index: int, job: ClientJob, stop: Event) -> ClientRecords:
    import grpc

    from follow.v1 import follow_pb2 as pb
    from follow.v1 import follow_pb2_grpc as pb_grpc

    records = ClientRecords()
    channel = grpc.aio.insecure_channel(job.grpc_address)
    await channel.channel_ready()
    stub = pb_grpc.FollowServiceStub(channel)

    def uid(rng: random.Random) -> str:
        return USERS_FORMAT.format(rng.randrange(1, job.users))

    async def loop(lane: int) -> None:
        rng = random.Random(job.seed * 10_000 + index * 100 + lane)
        followed: list[tuple[str, str]] = []
        while True:
            now = time.monotonic()
            if now >= job.hard_stop or stop.is_set():
                return
            kind = rng.choices(range(4), MIX)[0]
            if kind == UNFOLLOW and not followed:
                kind = FOLLOW
            call: Any
            if kind == FOLLOW:
                actor, target = uid(rng), uid(rng)
                if actor == target:
                    continue
                followed.append((actor, target))
                call = stub.Follow(
                    pb.FollowRequest(user_id=actor, target_ids=[target]), timeout=CALL_TIMEOUT_S
                )
            elif kind == UNFOLLOW:
                actor, target = followed.pop(rng.randrange(len(followed)))
                call = stub.Unfollow(
                    pb.UnfollowRequest(user_id=actor, target_ids=[target]), timeout=CALL_TIMEOUT_S
                )
            elif kind == CHECK:
                actor, target = uid(rng), ""
                request = pb.CheckRequest(user_id=actor, target_ids=[uid(rng) for _ in range(20)])
                call = stub.Check(request, timeout=CALL_TIMEOUT_S)
            else:
                actor, target = uid(rng), ""
                info = pb.GetInfoRequest(user_id=actor, target_ids=[uid(rng) for _ in range(20)])
                call = stub.GetInfo(info, timeout=CALL_TIMEOUT_S)
            started = time.monotonic()
            failed = False
            try:
                await call
            except grpc.aio.AioRpcError as exc:
                failed = True
                if not records.error_sample:
                    records.error_sample = f"{OP_NAMES[kind]}: {exc.code().name}: {exc.details()}"
            records.starts.append(started)
            records.latencies.append(time.monotonic() - started)
            records.kinds.append(kind)
            records.failed.append(failed)
            records.actors.append(int(actor[1:]))
            records.targets.append(int(target[1:]) if target else -1)

    delay = job.start - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)
    try:
        await asyncio.gather(*(loop(i) for i in range(job.concurrency)))
    finally:
        await channel.close(None)
    return records


class Clients:
    """The background client processes of one run."""

    def __init__(self, processes: int, concurrency: int, job: ClientJob) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._stop = ctx.Event()
        self._pipes: list[Connection] = []
        self._procs: list[Any] = []
        per = [concurrency // processes + (i < concurrency % processes) for i in range(processes)]
        for i, n in enumerate(per):
            parent, child = ctx.Pipe()
            mine = ClientJob(job.grpc_address, job.users, n, job.seed, job.start, job.hard_stop)
            proc = ctx.Process(target=client_main, args=(i, mine, self._stop, child), daemon=True)
            proc.start()
            self._pipes.append(parent)
            self._procs.append(proc)

    def stop(self, budget: float) -> ClientRecords:
        self._stop.set()
        merged = ClientRecords()
        for pipe in self._pipes:
            if not pipe.poll(budget):
                raise SystemExit("a background client did not answer in time")
            part: ClientRecords = pipe.recv()
            merged.starts += part.starts
            merged.latencies += part.latencies
            merged.kinds += part.kinds
            merged.failed += part.failed
            merged.actors += part.actors
            merged.targets += part.targets
            merged.error_sample = merged.error_sample or part.error_sample
        for proc in self._procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
        return merged


# -- windows --------------------------------------------------------------------------------


def _pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def window_stats(records: ClientRecords, begin: float, end: float) -> dict[str, Any]:
    """The other users' calls against [begin, end): latency of every call in flight during it
    (started before its end, answered after its start, so a call held up across the whole
    window counts with its full latency), calls answered inside it per second, errors, and
    the longest stretch inside it without any answer."""
    in_flight: list[float] = []
    answers: list[float] = []
    by_kind: dict[str, list[float]] = {n: [] for n in OP_NAMES}
    errors = 0
    for s, lat, kind, failed in zip(
        records.starts, records.latencies, records.kinds, records.failed, strict=True
    ):
        done = s + lat
        if s < end and done >= begin:
            in_flight.append(lat)
            by_kind[OP_NAMES[kind]].append(lat)
            errors += failed
        if begin <= done < end and not failed:
            answers.append(done)
    answers.sort()
    gap = 0.0
    last = begin
    for t in answers:
        gap = max(gap, t - last)
        last = t
    gap = max(gap, end - last)
    seconds = end - begin
    return {
        "seconds": round(seconds, 3),
        "calls": len(in_flight),
        "answered": len(answers),
        "calls_per_s": round(len(answers) / seconds, 1) if seconds > 0 else float("nan"),
        "p50_ms": round(_pct(in_flight, 0.5) * 1000, 2),
        "p99_ms": round(_pct(in_flight, 0.99) * 1000, 2),
        "max_ms": round(max(in_flight, default=float("nan")) * 1000, 2),
        "longest_gap_ms": round(gap * 1000, 1),
        "errors": errors,
        "max_ms_by_call": {k: round(max(v) * 1000, 2) if v else None for k, v in by_kind.items()},
    }


def compare(baseline: dict[str, Any], during: dict[str, Any]) -> dict[str, Any]:
    def ratio(key: str) -> float | None:
        a, b = float(baseline[key]), float(during[key])
        if not a or a != a or b != b:
            return None
        return round(b / a, 2)

    met = (
        during["max_ms"] == during["max_ms"]
        and during["max_ms"] < WORST_LATENCY_TARGET_S * 1000
        and during["longest_gap_ms"] < WORST_LATENCY_TARGET_S * 1000
        and during["errors"] == 0
    )
    return {
        "calls_per_s": ratio("calls_per_s"),
        "p50": ratio("p50_ms"),
        "p99": ratio("p99_ms"),
        "max": ratio("max_ms"),
        "target_met": met,
    }


# -- the operations -------------------------------------------------------------------------


def _v4_delete(server: Server, user: str) -> dict[str, Any]:
    import urllib.request

    query = (
        f"sdkappid={V4_APP}&identifier={V4_ADMIN}&usersig={_usersig()}"
        f"&random={random.randrange(2**32)}&contenttype=json"
    )
    url = f"http://{server.http_address}/v4/im_open_login_svc/account_delete?{query}"
    body = json.dumps({"DeleteItem": [{"UserID": user}]}).encode()
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:  # noqa: S310 (http://127.0.0.1 only)
        doc: dict[str, Any] = json.loads(response.read())
    if doc.get("ErrorCode") != 0 or doc["ResultItem"][0]["ResultCode"] != 0:
        raise SystemExit(f"v4 account_delete failed: {doc}")
    return doc


def _grpc_delete(server: Server, user: str) -> None:
    import grpc

    from follow.v1 import follow_pb2 as pb
    from follow.v1 import follow_pb2_grpc as pb_grpc

    with grpc.insecure_channel(server.grpc_address) as channel:
        stub = pb_grpc.AccountServiceStub(channel)
        response = stub.DeleteAccounts(pb.DeleteAccountsRequest(user_ids=[user]), timeout=600)
    if response.results[0].code != pb.RESULT_CODE_OK:
        raise SystemExit(f"DeleteAccounts failed: {response}")


async def _tombstone_gone(url: str, user: str, poll: float = 0.05) -> tuple[float, bool]:
    """Wait until the account's tombstone is gone: (the instant, whether it was seen)."""
    conn = await asyncpg.connect(url)
    seen = False
    try:
        while await conn.fetchval("SELECT 1 FROM account_tombstones WHERE user_id = $1", user):
            seen = True
            await asyncio.sleep(poll)
        return time.monotonic(), seen
    finally:
        await conn.close()


async def _edges_left(url: str, user: str) -> dict[str, int]:
    conn = await asyncpg.connect(url)
    try:
        fans = await conn.fetchval("SELECT count(*) FROM followers WHERE user_id = $1", user)
        account = await conn.fetchval("SELECT count(*) FROM accounts WHERE user_id = $1", user)
        return {"fan_rows_left": fans, "account_rows_left": account}
    finally:
        await conn.close()


def run_delete(server: Server, url: str, user: str, door: str) -> dict[str, Any]:
    began = time.monotonic()
    if door == "v4":
        _v4_delete(server, user)
    else:
        _grpc_delete(server, user)
    answered = time.monotonic()
    finished, pending = asyncio.run(_tombstone_gone(url, user))
    left = asyncio.run(_edges_left(url, user))
    return {
        "op": "delete",
        "door": door,
        "began": began,
        "ended": finished,
        "call_s": round(answered - began, 3),
        "cleanup_s": round(finished - began, 3),
        "cleanup_after_answer_s": round(finished - answered, 3),
        "cleanup_pending_after_answer": pending,
        **left,
    }


def write_import_files(size: OpsSize, folder: Path) -> tuple[Path, Path]:
    """100,000 new accounts and 300,000 new edges, each with a new user at one end (so none
    is in the graph yet), half of them touching an existing user's counters."""
    folder.mkdir(parents=True, exist_ok=True)
    accounts, edges = folder / "import-accounts.csv", folder / "import-edges.csv"
    users, new = size.graph.users, size.import_accounts
    if accounts.exists() and edges.exists():
        return accounts, edges
    rng = random.Random(10)
    pairs: set[tuple[int, int]] = set()
    while len(pairs) < size.import_edges:
        fresh = users + rng.randrange(new)
        other = rng.randrange(1, users + new)
        if fresh == other:
            continue
        pairs.add((fresh, other) if rng.random() < 0.5 else (other, fresh))
    base = int(time.time()) - 86_400
    with accounts.open("w") as f:
        f.write("user_id,nick,face_url\n")
        f.writelines(f"{USERS_FORMAT.format(i)},new {i},\n" for i in range(users, users + new))
    with edges.open("w") as f:
        f.write("follower_id,target_id,followed_at\n")
        f.writelines(
            f"{USERS_FORMAT.format(a)},{USERS_FORMAT.format(b)},{base + i % 80_000}\n"
            for i, (a, b) in enumerate(sorted(pairs))
        )
    return accounts, edges


def run_import(
    url: str,
    files: tuple[Path, Path],
    checkout: Path | None,
    batch_log: Path | None = None,
    extra: tuple[str, ...] = (),
) -> dict[str, Any]:
    accounts, edges = files
    command, env, cwd = importer_command(checkout)
    command += ["--database-url", url]
    command += ["--accounts", str(accounts.resolve()), "--edges", str(edges.resolve())]
    command += ["--no-progress", "--log-level", "INFO", *extra]
    if batch_log is not None:
        command += ["--batch-log", str(batch_log)]
    began = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, check=False)
    ended = time.monotonic()
    if done.returncode != 0:
        raise SystemExit(f"the import failed ({done.returncode}): {done.stderr[-2000:]}")
    lines = sum(1 for _ in edges.open()) - 1
    return {
        "op": "import",
        "importer": str(checkout) if checkout else "this checkout",
        "began": began,
        "ended": ended,
        "import_s": round(ended - began, 3),
        "edges": lines,
        "edges_per_s": round(lines / (ended - began)),
        "output_tail": done.stdout[-600:],
        "phases": importer_phases(done.stderr),
    }


_PHASE = re.compile(r"([^,]+?) (\d+(?:\.\d+)?)s(?:, |$)")


def importer_phases(log: str) -> list[tuple[str, float]]:
    """The importer's steps and their seconds, in order, from its `phases:` log line (INFO):
    with the import's start they place each slow call in the step it met."""
    for line in log.splitlines():
        _, sep, tail = line.partition("phases: ")
        if sep:
            return [(m[1].strip(), float(m[2])) for m in _PHASE.finditer(tail.strip())]
    return []


# -- the template ---------------------------------------------------------------------------


def importer_command(checkout: Path | None) -> tuple[list[str], dict[str, str], Path | None]:
    """`follow-server import` of this checkout, or `python -m server import` of another
    (run in that folder: `-m` puts the working directory first on sys.path)."""
    env = dict(os.environ)
    if checkout is None:
        return [str(Path(sys.executable).with_name("follow-server")), "import"], env, None
    folder = checkout.resolve()
    path = [str(folder), str(folder / "gen"), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in path if p)
    return [sys.executable, "-m", "server", "import"], env, folder


def checkout_importer(checkout: Path) -> SeedImporter:
    """Seeds a template with the importer of `checkout` (the seed is only the starting
    graph: any importer that works makes the same one)."""

    async def seed(url: str, accounts: Path, edges: Path) -> dict[str, Any]:
        done = run_import(url, (accounts, edges), checkout)
        return {k: v for k, v in done.items() if k not in ("began", "ended")}

    return seed


async def ensure_ops_seed(
    database: Database, params: graphs.GraphParams, out: Path, checkout: Path | None
) -> tuple[str, dict[str, Any]]:
    """The template database (tests.bench.run.ensure_seed, its own name prefix) and its
    metadata; seeded by the importer of `checkout` when given. The CSV files are only the
    importer's input: dropped (the generator makes them again if needed)."""
    importer = checkout_importer(checkout) if checkout else None
    seeded = await ensure_seed(database, params, out, prefix="ops_seed_", importer=importer)
    shutil.rmtree(out / "cache" / seed_key(params), ignore_errors=True)
    return seeded


# -- a run ----------------------------------------------------------------------------------


# Interleaved A/B of the importer's flags: "FLAGS|FLAGS|..." (e.g. "|--batch-seconds 0.05"),
# repetition i running variant i modulo their number.
IMPORT_VARIANTS_ENV = "FOLLOW_BENCH_OPS_IMPORT_FLAGS"


def import_variants(text: str) -> tuple[tuple[str, ...], ...]:
    """The importer flag variants of IMPORT_VARIANTS_ENV; one empty variant by default."""
    return tuple(tuple(v.split()) for v in text.split("|")) if text.strip() else ((),)


@dataclass(frozen=True, slots=True)
class OpsConfig:
    """One bench-ops run's sizes, load and options."""

    size: OpsSize
    concurrency: int
    processes: int
    warmup: float
    baseline: float
    tail: float
    door: str
    import_checkout: Path | None
    # More `follow-server import` flags per repetition, in turn (IMPORT_VARIANTS_ENV).
    import_variants: tuple[tuple[str, ...], ...] = ((),)


async def _copy(database: Database, seed: str) -> None:
    admin = await asyncpg.connect(database.url)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {RUN_DB} WITH (FORCE)")
        await admin.execute(f"CREATE DATABASE {RUN_DB} TEMPLATE {seed} STRATEGY FILE_COPY")
    finally:
        await admin.close()


async def _drop(database: Database) -> None:
    admin = await asyncpg.connect(database.url)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {RUN_DB} WITH (FORCE)")
    finally:
        await admin.close()


def run_once(
    op: str,
    rep: int,
    database: Database,
    seed: str,
    meta: dict[str, Any],
    cfg: OpsConfig,
    out: Path,
    files: tuple[Path, Path],
) -> dict[str, Any]:
    load_start = [round(x, 2) for x in os.getloadavg()]
    asyncio.run(_copy(database, seed))
    url = db_url(database, RUN_DB)
    profile = Profile(cfg.size.graph, 0, 0, concurrency=10, processes=cfg.processes)
    server = start_server(url, profile, out / f"bench-ops-server-{op}.log", 1)
    try:
        t0 = time.monotonic() + 1.5  # the processes start and connect first
        job = ClientJob(
            server.grpc_address, cfg.size.graph.users, cfg.concurrency, rep + 1, t0, t0 + 3600
        )
        clients = Clients(cfg.processes, cfg.concurrency, job)
        base_begin = t0 + cfg.warmup
        base_end = base_begin + cfg.baseline
        time.sleep(max(0.0, base_end - time.monotonic()))
        batch_log = out / f"bench-ops-batches-{rep + 1}.csv"
        batch_log.unlink(missing_ok=True)
        if op == "delete":
            result = run_delete(server, url, meta["celebrity"], cfg.door)
        else:
            # another checkout's importer may not know --batch-log
            log_to = None if cfg.import_checkout else batch_log
            variant = cfg.import_variants[rep % len(cfg.import_variants)]
            result = run_import(url, files, cfg.import_checkout, log_to, variant)
            result["import_flags"] = " ".join(variant)
        time.sleep(cfg.tail)
        tail_end = time.monotonic()
        records = clients.stop(budget=60)
    finally:
        server.stop()
    asyncio.run(_drop(database))
    baseline = window_stats(records, base_begin, base_end)
    during = window_stats(records, result["began"], result["ended"])
    after = window_stats(records, result["ended"], tail_end)
    if op == "import" and batch_log.exists():
        result["slow_calls"] = _slow_calls(records, result, batch_log, files[1])
        print(f"  slowest calls: {json.dumps(result['slow_calls'])}", file=sys.stderr)
    line = (
        f"  {op} #{rep + 1}: during {during['seconds']:.1f}s: max {during['max_ms']:.0f} ms"
        f" (baseline {baseline['max_ms']:.0f}), p99 {during['p99_ms']:.0f} ms"
        f" (baseline {baseline['p99_ms']:.0f}), {during['calls_per_s']:.0f} calls/s"
        f" (baseline {baseline['calls_per_s']:.0f}), longest gap {during['longest_gap_ms']:.0f}"
        f" ms, errors {during['errors']}; load {os.getloadavg()[0]:.1f}"
    )
    print(line, file=sys.stderr)
    return {
        "op": op,
        "repetition": rep + 1,
        "result": {k: v for k, v in result.items() if k not in ("began", "ended")},
        "baseline": baseline,
        "during": during,
        "after": after,
        "ratios": compare(baseline, during),
        "error_sample": records.error_sample,
        "load_average_start": load_start,
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
    }


def _slow_calls(
    records: ClientRecords, result: dict[str, Any], batch_log: Path, edges: Path
) -> dict[str, Any]:
    """What the slowest calls in flight during the import met (tests.bench.opslocks)."""
    began, ended = result["began"], result["ended"]
    calls = [
        c
        for c in zip(
            records.starts,
            records.latencies,
            records.kinds,
            records.actors,
            records.targets,
            strict=True,
        )
        if c[0] < ended and c[0] + c[1] >= began
    ]
    tries = opslocks.read_batches(batch_log, opslocks.read_edges(edges))
    return opslocks.slow_calls(
        calls,
        OP_NAMES,
        frozenset((FOLLOW, UNFOLLOW)),
        tries,
        began,
        ended,
        result.get("phases", []),
    )


def _median(values: list[Any]) -> float | None:
    nums = [v for v in values if isinstance(v, int | float) and v == v]
    return round(statistics.median(nums), 3) if nums else None


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the repetitions of one operation."""
    keys = ("p50_ms", "p99_ms", "max_ms", "calls_per_s", "longest_gap_ms", "errors")
    out: dict[str, Any] = {"repetitions": len(runs)}
    for window in ("baseline", "during"):
        out[window] = {k: _median([r[window][k] for r in runs]) for k in keys}
        out[window]["worst_max_ms"] = max(r[window]["max_ms"] for r in runs)
    out["ratios"] = {k: _median([r["ratios"][k] for r in runs]) for k in runs[0]["ratios"]}
    out["ratios"]["target_met"] = all(r["ratios"]["target_met"] for r in runs)
    numeric = [k for k, v in runs[0]["result"].items() if isinstance(v, int | float)]
    out["result"] = {k: _median([r["result"][k] for r in runs]) for k in numeric}
    out["load_average"] = [
        min(r["load_average_start"][0] for r in runs),
        max(r["load_average_end"][0] for r in runs),
    ]
    return out


async def _pg_version(database: Database) -> str:
    conn = await asyncpg.connect(database.url)
    try:
        version: str = await conn.fetchval("SHOW server_version")
        return version
    finally:
        await conn.close()


def run_ops(args: argparse.Namespace) -> None:
    size = QUICK if args.quick else FULL
    cfg = OpsConfig(
        size=size,
        concurrency=args.concurrency or 8,
        processes=args.processes or 2,
        warmup=args.warmup if args.warmup is not None else 2.0,
        baseline=args.duration or (4.0 if args.quick else 10.0),
        tail=2.0,
        door=args.ops_door,
        import_checkout=args.ops_import_checkout,
        import_variants=import_variants(os.environ.get(IMPORT_VARIANTS_ENV, "")),
    )
    ops = [o for o in args.ops_only.split(",") if o] if args.ops_only else list(OPS)
    if unknown := set(ops) - set(OPS):
        raise SystemExit(f"--ops-only: unknown operation(s) {sorted(unknown)}; choose from {OPS}")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    database = asyncio.run(open_database(None, out / "ops-pgdata"))
    runs: list[dict[str, Any]] = []
    try:
        seed, meta = asyncio.run(ensure_ops_seed(database, size.graph, out, args.ops_seed_checkout))
        pg_version = asyncio.run(_pg_version(database))
        files = write_import_files(size, out / "cache" / f"ops-import-{size.import_edges}")
        print(
            f"bench-ops: {size.graph.users:,} users, {size.graph.edges:,} edges, celebrity"
            f" {meta['celebrity']} with {size.graph.celebrity_followers:,} fans"
            f" ({'cached' if meta['cached'] else 'seeded now'}); {cfg.concurrency} background"
            f" calls in flight from {cfg.processes} processes; {args.repeat} repetition(s)",
            file=sys.stderr,
        )
        for rep in range(args.repeat):
            for op in ops:
                runs.append(run_once(op, rep, database, seed, meta, cfg, out, files))
    finally:
        database.close()
    doc = {
        "config": asdict(cfg) | {"import_checkout": str(cfg.import_checkout or "")},
        "target_worst_latency_ms": WORST_LATENCY_TARGET_S * 1000,
        "import_edges": size.import_edges,
        "machine": machine(pg_version) | {"load_average_at_start": load_at_start},
        "git": git_revision(),
        "graph": meta,
        "runs": runs,
        "summary": {op: summarise([r for r in runs if r["op"] == op]) for op in ops},
        "seconds": round(time.monotonic() - started, 1),
    }
    stem = args.ops_name or ("bench-ops-quick" if args.quick else "bench-ops")
    json_path = out / f"{stem}.json"
    json_path.write_text(json.dumps(doc, indent=2, default=_nan_safe) + "\n")
    table = render_ops_table(doc)
    (out / f"{stem}.txt").write_text(table + "\n")
    print(table)
    print(f"\nwrote {json_path} in {doc['seconds']:.0f}s")
