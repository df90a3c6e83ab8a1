"""`make bench` / `make bench-quick`: the service measured against ceilings from the same run.

1. An embedded PostgreSQL of its own (var/bench/pgdata) holds one seeded template database
   per (graph parameters, schema version, importer version); it is seeded once through the
   bulk importer and copied for each run, so runs start from the same state.
2. `follow-server` runs as a subprocess on free 127.0.0.1 ports (the v4 shim too, when
   this build has it).
3. Load-generator processes (tests.bench.load) drive each scenario closed-loop at a fixed
   concurrency for a fixed time. The ceilings come from the same generator: the health
   Check RPC on the same server (empty-RPC ceiling) and server.store's SQL issued directly
   with asyncpg at the same concurrency (database ceiling).
4. A table on the terminal, a JSON file of every figure with the machine and git revision,
   and a PNG chart, in var/bench/ (or --out).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import multiprocessing
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import asyncpg
import psutil

from server.cursor import CursorCodec, Position
from server.database import Database, open_database
from server.errors import FollowType
from server.importer import ImportOptions, import_graph
from server.migrations import MIGRATIONS, migrate
from server.store import to_micros
from tests.bench import graph as graphs
from tests.bench.load import Job, Outcome, Target, worker_main
from tests.bench.report import RATIO_TARGETS, render_chart, render_table

# Bump when the importer's output changes, so cached seeds are rebuilt.
SEED_VERSION = 1
V4_APP = 1400000001
V4_KEY = "bench-secret-key-not-for-production"
V4_ADMIN = "administrator"


@dataclass(frozen=True, slots=True)
class Profile:
    """A bench size (quick or full): graph, timings and concurrency."""

    graph: graphs.GraphParams
    warmup: float
    duration: float
    concurrency: int
    processes: int


QUICK = Profile(graphs.QUICK, warmup=0.5, duration=3.0, concurrency=16, processes=2)
FULL = Profile(graphs.FULL, warmup=2.0, duration=10.0, concurrency=16, processes=2)


@dataclass
class ScenarioResult:
    """One row of the bench table."""

    name: str
    description: str
    calls_per_s: float
    items_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    calls: int
    errors: int
    error_sample: str
    server_cpu_pct: float
    db_cpu_pct: float
    server_peak_rss_mb: float
    issued_per_worker: list[int] = field(default_factory=list)
    # Seconds of the measured window each load process still had calls to make: the whole
    # duration, unless a limited job (grpc:unfollow20 replays grpc:follow20's calls;
    # follow1@celebrity's actors) ran out first. calls_per_s counts over these.
    active_s_per_worker: list[float] = field(default_factory=list)


SCENARIOS: list[tuple[str, str]] = [
    ("grpc:empty", "empty-RPC ceiling: grpc.health.v1 Health/Check"),
    ("grpc:check100", "Check, 100 random targets"),
    ("db:check100", "database ceiling: Check's SQL via asyncpg"),
    ("grpc:getinfo20", "GetInfo, 20 random targets"),
    ("db:getinfo20", "database ceiling: GetInfo's SQL via asyncpg"),
    ("grpc:getinfo1@celebrity", "GetInfo of the celebrity"),
    ("grpc:getinfo1@small", "GetInfo of a user with 10 followers"),
    ("grpc:list@first", "List celebrity's fans, first page of 100"),
    ("grpc:list@deep", "List celebrity's fans, a deep page of 100"),
    ("db:list@first", "database ceiling: List's SQL via asyncpg"),
    ("grpc:follow20", "Follow 20 new random targets"),
    ("db:follow20", "database ceiling: Follow's SQL via asyncpg"),
    ("grpc:unfollow20", "Unfollow the 20 targets of each Follow above"),
    ("grpc:follow1@celebrity", "everyone follows the celebrity (1 target)"),
    ("grpc:follow1", "Follow 1 random distinct target"),
    ("v4:check100", "v4 follow_check, 100 targets (REST shim)"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def db_url(base: Database, name: str) -> str:
    head, _, query = base.url.partition("?")
    return f"{head.rsplit('/', 1)[0]}/{name}" + (f"?{query}" if query else "")


def seed_key(params: graphs.GraphParams, schema: int | None = None) -> str:
    if schema is None:
        schema = max(v for v, _, _ in MIGRATIONS)
    text = f"{params.key()}|schema={schema}|seed={SEED_VERSION}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


async def upgrade_seed(
    database: Database, params: graphs.GraphParams, prefix: str = "seed_"
) -> bool:
    """Bring a template seeded under an older schema up to this one with the service's own
    migrations (what every deployment's data goes through at start), instead of importing
    the graph again: a new migration made every bench reseed, which through the importer
    takes minutes per million edges (bench-scale's 10M template: most of an hour)."""
    current = max(v for v, _, _ in MIGRATIONS)
    admin = await asyncpg.connect(database.url)
    try:
        wanted = f"{prefix}{seed_key(params)}"
        if await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", wanted):
            return False
        for schema in range(current - 1, 0, -1):
            old = f"{prefix}{seed_key(params, schema)}"
            if await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", old):
                break
        else:
            return False
        conn = await asyncpg.connect(db_url(database, old))
        try:
            await migrate(conn)
        finally:
            await conn.close()
        await admin.execute(f"ALTER DATABASE {old} RENAME TO {wanted}")
        print(f"{old}: migrated from schema {schema} to {current}", file=sys.stderr)
        return True
    finally:
        await admin.close()


# -- seeding --------------------------------------------------------------------------------


# What seeds a template: (database URL, accounts CSV, edges CSV) -> the import's figures.
SeedImporter = Callable[[str, Path, Path], Awaitable[dict[str, Any]]]


async def ensure_seed(
    database: Database,
    params: graphs.GraphParams,
    out: Path,
    prefix: str = "seed_",
    importer: SeedImporter | None = None,
) -> tuple[str, dict[str, Any]]:
    """The template database `prefix` + seed_key(params) (seeded now unless cached) and its
    metadata. Seeded through `importer` when given (e.g. another checkout's importer), else
    the bulk importer of this checkout in this process (import_csv); the CSV files are kept
    in out/cache/<key>."""
    key = seed_key(params)
    name = f"{prefix}{key}"
    staging = f"{name}_seeding"
    await upgrade_seed(database, params, prefix=prefix)
    admin = await asyncpg.connect(database.url)
    try:
        exists = await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            await admin.execute(f"DROP DATABASE IF EXISTS {staging} WITH (FORCE)")
            await admin.execute(f"CREATE DATABASE {staging}")
    finally:
        await admin.close()
    if not exists:
        url = db_url(database, staging)
        await _seed(url, params, out / "cache" / key, importer or import_csv)
        admin = await asyncpg.connect(database.url)
        try:
            await admin.execute(f"ALTER DATABASE {staging} RENAME TO {name}")
        finally:
            await admin.close()
    conn = await asyncpg.connect(db_url(database, name))
    try:
        meta = json.loads(await conn.fetchval("SELECT doc FROM bench_meta"))
    finally:
        await conn.close()
    meta["cached"] = bool(exists)
    return name, meta


async def _seed(url: str, params: graphs.GraphParams, folder: Path, importer: SeedImporter) -> None:
    print(f"seeding {folder.name}: generating the graph ...", file=sys.stderr)
    generating = time.monotonic()
    graph = graphs.generate(params)
    accounts, edges = graphs.write_csv(graph, folder)
    generated = time.monotonic() - generating
    conn = await asyncpg.connect(url)
    try:
        await migrate(conn)
    finally:
        await conn.close()
    print("seeding: importing (follow-server import) ...", file=sys.stderr)
    imported = await importer(url, accounts, edges)
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("VACUUM ANALYZE")
        meta = graph.meta() | {
            "import": imported,
            "seed_version": SEED_VERSION,
            # When and under what machine load the seed was made (cached seeds keep them).
            "seeded_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "load_average_at_import": [round(x, 2) for x in os.getloadavg()],
            "generate_seconds": round(generated, 1),
        }
        await conn.execute("CREATE TABLE bench_meta (doc text NOT NULL)")
        await conn.execute("INSERT INTO bench_meta VALUES ($1)", json.dumps(meta))
    finally:
        await conn.close()


def _file_size(path: Path) -> int:
    return path.stat().st_size


async def import_csv(url: str, accounts: Path, edges: Path) -> dict[str, Any]:
    """Import the two CSV files with the bulk importer; its figures for the bench's JSON."""
    with accounts.open(newline="") as a, edges.open(newline="") as e:
        report = await import_graph(
            url,
            a,
            e,
            ImportOptions(progress=True),
            accounts_size=_file_size(accounts),
            edges_size=_file_size(edges),
        )
    return {
        "edges": report.edges_read,
        "accounts": report.accounts_read,
        "seconds": round(report.seconds, 3),
        "edges_per_s": round(report.edges_per_second),
        "phases": {k: round(v, 3) for k, v in report.phases.items()},
        "command": f"follow-server import --accounts {accounts} --edges {edges}",
    }


# -- the server under test ------------------------------------------------------------------


def follow_server_flags() -> str:
    exe = Path(sys.executable).with_name("follow-server")
    return subprocess.run(
        [str(exe), "--help"], capture_output=True, text=True, check=False, timeout=60
    ).stdout


@dataclass
class Server:
    """The follow-server process under test and its addresses."""

    process: subprocess.Popen[bytes]
    grpc_address: str
    http_address: str | None
    workers: int

    def tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.process.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_server(
    url: str, profile: Profile, log: Path, workers: int, extra: Sequence[str] = ()
) -> Server:
    """`extra`: more follow-server flags (tests.bench.events: --callback-url ...)."""
    flags = follow_server_flags()
    exe = Path(sys.executable).with_name("follow-server")
    grpc_address = f"127.0.0.1:{free_port()}"
    args = [
        str(exe),
        "--grpc-listen",
        grpc_address,
        "--database-url",
        url,
        "--log-level",
        "WARNING",
        "--db-pool-size",
        str(profile.concurrency),
    ]
    http_address = None
    if "--http-listen" in flags and "--sdkappid" in flags and "--secret-key" in flags:
        http_address = f"127.0.0.1:{free_port()}"
        args += ["--http-listen", http_address, "--sdkappid", str(V4_APP)]
        args += ["--secret-key", V4_KEY]
        if "--admin" in flags:
            args += ["--admin", V4_ADMIN]
    if workers > 1:
        if "--workers" not in flags:
            raise SystemExit("this follow-server has no --workers flag")
        args += ["--workers", str(workers)]
    args += list(extra)
    env = os.environ | {"FOLLOW_LOG_LEVEL": "WARNING"}
    with log.open("wb") as sink:
        process = subprocess.Popen(args, stdout=sink, stderr=subprocess.STDOUT, env=env)
    server = Server(process, grpc_address, http_address, workers)
    _wait_serving(server, log)
    return server


def _wait_serving(server: Server, log: Path) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + 90
    with grpc.insecure_channel(server.grpc_address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                raise SystemExit(f"follow-server exited; see {log}:\n{log.read_text()[-2000:]}")
            with contextlib.suppress(grpc.RpcError):
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            time.sleep(0.2)
    server.stop()
    raise SystemExit(f"follow-server did not become SERVING; see {log}")


class Monitor:
    """CPU of the server tree and of PostgreSQL over a window; the server's peak RSS."""

    def __init__(self, server: Server, postmaster_pids: Sequence[int]) -> None:
        self._server = server
        self._pg = list(postmaster_pids)  # several for a Citus cluster: its CPU is the sum
        self._stop = threading.Event()
        self._peak = 0
        self._thread: threading.Thread | None = None

    def _pg_tree(self) -> list[psutil.Process]:
        tree: list[psutil.Process] = []
        for pid in self._pg:
            with contextlib.suppress(psutil.NoSuchProcess):
                root = psutil.Process(pid)
                tree += [root, *root.children(recursive=True)]
        return tree

    @staticmethod
    def _cpu(processes: list[psutil.Process]) -> dict[int, float]:
        """CPU seconds by pid (a delta per pid: backends come and go)."""
        seconds: dict[int, float] = {}
        for p in processes:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                seconds[p.pid] = t.user + t.system
        return seconds

    @staticmethod
    def _delta(before: dict[int, float], after: dict[int, float]) -> float:
        return sum(max(0.0, v - before.get(pid, 0.0)) for pid, v in after.items())

    def _rss(self) -> int:
        total = 0
        for p in self._server.tree():
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        return total

    def start_window(self) -> None:
        self._peak = self._rss()
        self._t0 = time.monotonic()
        self._server_cpu0 = self._cpu(self._server.tree())
        self._pg_cpu0 = self._cpu(self._pg_tree())
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.1):
            self._peak = max(self._peak, self._rss())

    def end_window(self) -> tuple[float, float, float]:
        """(server CPU %, database CPU %, server peak RSS in MB); 100% is one core."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        wall = max(time.monotonic() - self._t0, 1e-9)
        server = self._delta(self._server_cpu0, self._cpu(self._server.tree())) / wall * 100
        pg = self._delta(self._pg_cpu0, self._cpu(self._pg_tree())) / wall * 100
        return server, pg, self._peak / 2**20


# -- scenarios ------------------------------------------------------------------------------


@dataclass
class Fixtures:
    """Inputs some scenarios need, read from the run database."""

    deep_tokens: list[str]
    non_fans: list[str]


async def prepare(url: str, meta: dict[str, Any]) -> Fixtures:
    celebrity = meta["celebrity"]
    conn = await asyncpg.connect(url)
    try:
        key = await conn.fetchval("SELECT value FROM service_secrets WHERE name = 'cursor'")
        codec = CursorCodec(key)
        fans = await conn.fetchval(
            "SELECT followers FROM follow_counts WHERE user_id = $1", celebrity
        )
        tokens = []
        for i in range(20):
            offset = int(fans * (0.5 + 0.45 * i / 19))
            row = await conn.fetchrow(
                """SELECT followed_at, follower_id FROM followers WHERE user_id = $1
                   ORDER BY followed_at DESC, follower_id DESC OFFSET $2 LIMIT 1""",
                celebrity,
                offset,
            )
            assert row is not None, "the celebrity has fewer followers than counted"
            position = Position(to_micros(row["followed_at"]), row["follower_id"])
            tokens.append(codec.encode(celebrity, FollowType.FAN, position))
        non_fans = [
            r[0]
            for r in await conn.fetch(
                """SELECT a.user_id FROM accounts a WHERE a.user_id <> $1 AND NOT EXISTS (
                       SELECT 1 FROM following f WHERE f.user_id = a.user_id AND f.target_id = $1)
                   ORDER BY a.user_id""",
                celebrity,
            )
        ]
    finally:
        await conn.close()
    random.Random(7).shuffle(non_fans)
    return Fixtures(tokens, non_fans)


class Workers:
    """The load-generator processes, each fed jobs over a pipe."""

    def __init__(self, count: int, target: Target) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._pipes: list[Connection] = []
        self._procs = []
        for i in range(count):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker_main, args=(i, target, child), daemon=True)
            proc.start()
            self._pipes.append(parent)
            self._procs.append(proc)

    def send(self, jobs: list[Job]) -> None:
        for pipe, job in zip(self._pipes, jobs, strict=True):
            pipe.send(job)

    def collect(self, budget: float) -> list[Outcome]:
        outcomes = []
        for pipe in self._pipes:
            if not pipe.poll(budget):
                raise SystemExit("a load generator did not answer in time")
            outcomes.append(pipe.recv())
        return outcomes

    def close(self) -> None:
        for pipe in self._pipes:
            with contextlib.suppress(OSError):
                pipe.send(None)
        for proc in self._procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()


def run_scenario(
    workers: Workers,
    monitor: Monitor,
    profile: Profile,
    name: str,
    description: str,
    meta: dict[str, Any],
    fixtures: Fixtures,
    limits: list[int] | None = None,
    seed: int = 1,
) -> ScenarioResult:
    n = profile.processes
    per = profile.concurrency // n
    start = time.monotonic() + 0.5
    jobs = []
    for i in range(n):
        actors = fixtures.non_fans[i::n] if name == "grpc:follow1@celebrity" else []
        jobs.append(
            Job(
                scenario=name,
                start=start,
                warmup=profile.warmup,
                duration=profile.duration,
                concurrency=per,
                seed=seed,
                users=meta["params"]["users"],
                celebrity=meta["celebrity"],
                small_user=meta["ten_follower_user"],
                deep_tokens=fixtures.deep_tokens,
                actors=actors,
                limit=limits[i] if limits else None,
            )
        )
    workers.send(jobs)
    time.sleep(max(0.0, start + profile.warmup - time.monotonic()))
    monitor.start_window()
    time.sleep(max(0.0, start + profile.warmup + profile.duration - time.monotonic()))
    server_cpu, db_cpu, rss = monitor.end_window()
    outcomes = workers.collect(budget=120)
    latencies = sorted(x for o in outcomes for x in o.latencies)
    errors = sum(o.errors for o in outcomes)
    sample = next((o.error_sample for o in outcomes if o.error_sample), "")

    def pct(q: float) -> float:
        if not latencies:
            return float("nan")
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000

    begin = start + profile.warmup
    active = [
        profile.duration
        if o.ran_out_at is None
        else min(profile.duration, max(0.0, o.ran_out_at - begin))
        for o in outcomes
    ]
    return ScenarioResult(
        name=name,
        description=description,
        # Each process' calls over the time it had calls to make (see active_s_per_worker).
        calls_per_s=sum(len(o.latencies) / a for o, a in zip(outcomes, active, strict=True) if a),
        items_per_s=sum(o.items / a for o, a in zip(outcomes, active, strict=True) if a),
        p50_ms=pct(0.50),
        p90_ms=pct(0.90),
        p99_ms=pct(0.99),
        calls=len(latencies),
        errors=errors,
        error_sample=sample,
        server_cpu_pct=server_cpu,
        db_cpu_pct=db_cpu,
        server_peak_rss_mb=rss,
        issued_per_worker=[o.issued + o.errors for o in outcomes],
        active_s_per_worker=[round(a, 3) for a in active],
    )


def run_scenarios(
    workers: Workers,
    monitor: Monitor,
    profile: Profile,
    meta: dict[str, Any],
    fixtures: Fixtures,
    scenarios: list[tuple[str, str]],
    only: set[str] | None,
    http_address: str | None,
    results: dict[str, ScenarioResult],
    probe: Callable[[str], None] | None = None,
    label: str = "",
) -> None:
    """Run `scenarios` in order into `results` (filled as they finish), one line each on
    stderr (after `label`). `probe(name)`, if given, is called just before and just after
    each scenario."""
    for name, description in scenarios:
        if only is not None and name not in only:
            continue
        if name.startswith("v4:") and http_address is None:
            print(f"{name}: not available (this follow-server has no v4 shim)", file=sys.stderr)
            continue
        limits = None
        if name == "grpc:unfollow20":
            follow = results.get("grpc:follow20")
            if follow is None:
                continue
            limits = follow.issued_per_worker
        seed = 20 if name in ("grpc:follow20", "grpc:unfollow20") else 1 + len(results)
        if probe is not None:
            probe(name)
        result = run_scenario(
            workers, monitor, profile, name, description, meta, fixtures, limits, seed
        )
        if probe is not None:
            probe(name)
        results[name] = result
        print(
            f"  {label}{name:<26} {result.calls_per_s:>9.0f}/s  p50 {result.p50_ms:7.2f} ms"
            f"  p99 {result.p99_ms:7.2f} ms  errors {result.errors}"
            + (f"  ({result.error_sample})" if result.error_sample else ""),
            file=sys.stderr,
        )


# -- the run --------------------------------------------------------------------------------


def machine(pg_version: str) -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": model or platform.processor(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "os": platform.platform(),
        "python": platform.python_version(),
        "postgres": pg_version,
    }


def git_revision() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, check=False, timeout=30
        ).stdout.strip()

    return {"revision": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}


def _postmaster_pid(database: Database) -> int | None:
    pgdata = getattr(database.embedded, "pgdata", None)
    if pgdata is None:
        return None
    with contextlib.suppress(OSError, ValueError):
        return int((Path(pgdata) / "postmaster.pid").read_text().split()[0])
    return None


def ratios(results: dict[str, ScenarioResult], meta: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's target table, from this run's figures."""

    def get(name: str) -> ScenarioResult | None:
        r = results.get(name)
        return r if r is not None and r.calls > 0 else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    def tput(name: str) -> float | None:
        r = get(name)
        return r.calls_per_s if r else None

    def items(name: str) -> float | None:
        r = get(name)
        return r.items_per_s if r else None

    def p50(name: str) -> float | None:
        r = get(name)
        return r.p50_ms if r else None

    rss = [r.server_peak_rss_mb for r in results.values()]
    values: dict[str, float | None] = {
        "check_vs_empty": ratio(tput("grpc:check100"), tput("grpc:empty")),
        "getinfo_vs_empty": ratio(tput("grpc:getinfo20"), tput("grpc:empty")),
        "list_first_vs_empty": ratio(tput("grpc:list@first"), tput("grpc:empty")),
        "deep_vs_first_latency": ratio(p50("grpc:list@deep"), p50("grpc:list@first")),
        "getinfo_celebrity_vs_small_latency": ratio(
            p50("grpc:getinfo1@celebrity"), p50("grpc:getinfo1@small")
        ),
        "follow_vs_db": ratio(items("grpc:follow20"), items("db:follow20")),
        "celebrity_vs_distinct_follow": ratio(tput("grpc:follow1@celebrity"), tput("grpc:follow1")),
        "v4_vs_grpc_check": ratio(tput("v4:check100"), tput("grpc:check100")),
        "import_edges_per_s": float(meta["import"]["edges_per_s"]),
        "server_peak_rss_mb": max(rss) if rss else None,
    }
    rows = []
    for key, label, op, target in RATIO_TARGETS:
        value = values[key]
        met = None if value is None else (value >= target if op == ">=" else value <= target)
        rows.append(
            {"figure": label, "key": key, "value": value, "op": op, "target": target, "met": met}
        )
    return rows


async def _setup(out: Path, profile: Profile) -> tuple[Database, str, str, dict[str, Any]]:
    database = await open_database(None, out / "pgdata")
    try:
        seed, meta = await ensure_seed(database, profile.graph, out)
        run_url = db_url(database, "bench_run")
        admin = await asyncpg.connect(database.url)
        try:
            await admin.execute("DROP DATABASE IF EXISTS bench_run WITH (FORCE)")
            await admin.execute(f"CREATE DATABASE bench_run TEMPLATE {seed} STRATEGY FILE_COPY")
            pg_version = await admin.fetchval("SHOW server_version")
        finally:
            await admin.close()
    except BaseException:
        database.close()
        raise
    return database, run_url, pg_version, meta


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small graph, short scenarios")
    parser.add_argument("--out", type=Path, default=Path("var/bench"), help="output folder")
    parser.add_argument("--duration", type=float, help="measured seconds per scenario")
    parser.add_argument("--warmup", type=float, help="warm-up seconds per scenario")
    parser.add_argument("--concurrency", type=int, help="calls in flight, all processes")
    parser.add_argument("--processes", type=int, help="load-generator processes")
    parser.add_argument("--workers", type=int, default=1, help="follow-server --workers N")
    parser.add_argument("--only", help="comma-separated scenario names to run")
    citus = parser.add_argument_group(
        "Citus",
        "--citus: the gRPC scenarios on a 3-node Citus cluster and on one plain"
        " PostgreSQL 15, same data (see tests.bench.citus)",
    )
    citus.add_argument("--citus", action="store_true", help="cluster vs single node")
    citus.add_argument(
        "--full", action="store_true", help="with --citus: the full graph and durations"
    )
    citus.add_argument(
        "--citus-seed",
        choices=("auto", "import", "copy"),
        default="auto",
        help="seed the cluster with the bulk importer, by COPY from the seeded single node,"
        " or (auto) the importer and COPY if the importer fails there",
    )
    citus.add_argument(
        "--citus-setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a postgresql.conf setting for every cluster node (repeatable)",
    )
    scale = parser.add_argument_group(
        "scale",
        "--scale (make bench-scale): the gRPC scenarios on generated graphs of several sizes,"
        " throughput at the largest / the smallest (see tests.bench.scale)",
    )
    scale.add_argument("--scale", action="store_true", help="cost as the graph grows")
    scale.add_argument(
        "--scale-sizes",
        default="1,5,10",
        metavar="M,M,...",
        help="graph sizes in millions of edges (default 1,5,10; e.g. 0.2,1 for a quick check)",
    )
    scale.add_argument(
        "--rounds",
        type=int,
        help=(
            "with --scale: rounds of every scenario at every size (default 5, 2 with --quick);"
            " with --citus: rounds of cluster and single node, the median ratio (default 1)"
        ),
    )
    scale.add_argument(
        "--reseed", action="store_true", help="with --scale: import the graphs again"
    )
    scale.add_argument(
        "--sequential",
        action="store_true",
        help="with --scale: one size at a time (least disk) instead of all sizes interleaved",
    )
    events = parser.add_argument_group(
        "events",
        "--events (make bench-events): the write scenarios with webhooks and one Watch stream"
        " on, against the same without them, runs alternating (see tests.bench.events)",
    )
    events.add_argument("--events", action="store_true", help="change events on vs off")
    events.add_argument(
        "--events-rounds",
        type=int,
        metavar="N",
        help="with --events: N pairs of runs, one off and one on (default 2, 1 with --quick)",
    )
    events.add_argument(
        "--events-on",
        type=lambda text: frozenset(text.split(",")),
        metavar="webhooks,watch",
        help="with --events: what the on runs turn on (default both; one of them to see its cost)",
    )
    ops = parser.add_argument_group(
        "ops",
        "--ops (make bench-ops): deleting a 400,000-fan account and importing 300,000 edges"
        " while other users' calls run, their latency before and during (see tests.bench.ops)",
    )
    ops.add_argument("--ops", action="store_true", help="big deletions and imports, live")
    ops.add_argument(
        "--ops-only", metavar="OP,OP", help="with --ops: only these operations (delete, import)"
    )
    ops.add_argument(
        "--ops-door",
        choices=("grpc", "v4"),
        default="grpc",
        help="with --ops: delete through gRPC DeleteAccounts or the v4 account_delete",
    )
    ops.add_argument(
        "--ops-import-checkout",
        type=Path,
        metavar="DIR",
        help="with --ops: run the importer of this checkout (python -m server import)",
    )
    ops.add_argument(
        "--ops-seed-checkout",
        type=Path,
        metavar="DIR",
        help="with --ops: seed the template with the importer of this checkout",
    )
    ops.add_argument("--ops-name", metavar="STEM", help="with --ops: output file stem")
    ops.add_argument(
        "--repeat", type=int, default=1, help="with --ops: repetitions of each operation"
    )
    args = parser.parse_args(argv)
    if args.events:
        from tests.bench.events import run_events

        run_events(args)
        return
    if args.ops:
        from tests.bench.ops import run_ops

        run_ops(args)
        return
    if args.scale:
        from tests.bench.scale import run_scale

        run_scale(args)
        return
    if args.quick and args.full:
        parser.error("--quick and --full exclude each other")
    if args.citus and not args.full:
        args.quick = True  # the Citus bench is quick unless --full
    base = QUICK if args.quick else FULL
    profile = Profile(
        base.graph,
        warmup=args.warmup if args.warmup is not None else base.warmup,
        duration=args.duration or base.duration,
        concurrency=args.concurrency or base.concurrency,
        processes=args.processes or base.processes,
    )
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.citus:
        from tests.bench.citus import run_citus

        run_citus(args, profile, out)
        return
    started = time.monotonic()
    database, run_url, pg_version, meta = asyncio.run(_setup(out, profile))
    server: Server | None = None
    workers: Workers | None = None
    results: dict[str, ScenarioResult] = {}
    try:
        server = start_server(run_url, profile, out / "server.log", args.workers)
        fixtures = asyncio.run(prepare(run_url, meta))
        v4_query = (
            f"sdkappid={V4_APP}&identifier={V4_ADMIN}&usersig={_usersig()}&contenttype=json"
            if server.http_address
            else ""
        )
        target = Target(server.grpc_address, run_url, server.http_address, v4_query)
        workers = Workers(profile.processes, target)
        pid = _postmaster_pid(database)
        monitor = Monitor(server, [pid] if pid is not None else [])
        only = set(args.only.split(",")) if args.only else None
        run_scenarios(
            workers, monitor, profile, meta, fixtures, SCENARIOS, only, server.http_address, results
        )
    finally:
        if workers is not None:
            workers.close()
        if server is not None:
            server.stop()
        database.close()
    doc = {
        "profile": "quick" if args.quick else "full",
        "config": asdict(profile) | {"server_workers": args.workers},
        "machine": machine(pg_version),
        "git": git_revision(),
        "graph": meta,
        "scenarios": [asdict(r) for r in results.values()],
        "ratios": ratios(results, meta),
        "seconds": round(time.monotonic() - started, 1),
    }
    stem = "bench-quick" if args.quick else "bench"
    json_path = out / f"{stem}.json"
    json_path.write_text(json.dumps(doc, indent=2, default=_nan_safe) + "\n")
    png_path = out / f"{stem}.png"
    render_chart(doc, png_path)
    print(render_table(doc))
    print(f"\nwrote {json_path} and {png_path} in {doc['seconds']:.0f}s")


def _nan_safe(value: object) -> object:
    return str(value)


def _usersig() -> str:
    from TLSSigAPIv2 import TLSSigAPIv2

    sig: str = TLSSigAPIv2(V4_APP, V4_KEY).gen_sig(V4_ADMIN, 86400)
    return sig
