"""`make bench-citus`: the gRPC scenarios on a Citus cluster and on one plain PostgreSQL.

1. Two throwaway systems from the same Debian PostgreSQL 15 binaries and settings (see
   tests.support.citus and tests.support.pg15): a Citus cluster (coordinator + 2 workers)
   and one plain server, all on this machine and 127.0.0.1.
2. The same generated graph in both: the single node is migrated and seeded by the bulk
   importer; the cluster is migrated (the tables distributed on user_id) and seeded by the
   importer too when it works on Citus, else by COPY of each table out of the seeded single
   node into the distributed tables (`--citus-seed`; the JSON says which was used). Row
   counts and counter sums are compared before anything is measured.
3. The statements behind the read calls, timed on both idle systems, with the number of
   tasks Citus runs for each (EXPLAIN ANALYZE on the coordinator).
4. A `follow-server` against each system, both up at once, and the gRPC scenarios of
   `make bench` from the same load generators, interleaved: each scenario on one system
   then on the other (alternating which goes first), so that each pair of figures is taken
   close together in time on a machine whose other load drifts. Measured besides: the CPU
   of every PostgreSQL process; on the cluster, per scenario, the Citus statement and
   connection counters and what the nodes' backends wait for (sampled pg_stat_activity),
   and over the whole run the deadlocks (pg_stat_database on every node before and after,
   and the node and server logs).
   The CPU time of the coordinator and of the workers (their postmasters and backends) per
   scenario, per call in the comparison: steadier than calls/s on a shared machine.
5. Each system's usual table, the cluster / single-node throughput ratio per scenario with
   its target, the deadlocks, a JSON file of every figure and a PNG chart in var/bench/.

Rounds: `--rounds N` (of `python -m tests.bench --citus`, or of `python -m tests.bench.citus`,
default 3 there) runs every scenario N times on each system, the order rotating; the ratio
is the median of the rounds' ratios (each round's pair taken close together), and the
calls/s shown are each system's median round. Variants (`python -m tests.bench.citus
--citus-variant NAME:SETTING=VALUE,...`): more follow-servers on the same cluster, their
connections with those session settings (`checkout=DIR`: the server package of another
checkout, for an A/B of store code), interleaved and compared with the single node too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import asyncpg

from server.errors import FollowType
from server.migrations import migrate
from server.store import _CHECK, _COUNTS, _PAGES, _PROFILES
from tests.bench import graph as graphs
from tests.bench.cpu import tree_cpu_seconds
from tests.bench.load import USERS_FORMAT, Target
from tests.bench.report import CLUSTER_TARGETS, render_citus_chart, render_citus_table
from tests.bench.run import (
    SCENARIOS,
    Monitor,
    Profile,
    ScenarioResult,
    Workers,
    git_revision,
    import_csv,
    machine,
    prepare,
    ratios,
    run_scenarios,
    seed_key,
    start_server,
)
from tests.support.citus import CitusCluster, Node
from tests.support.pg15 import SinglePostgres

DATABASE = "bench"
# The per-user tables, in an order whose COPY needs nothing before it (no foreign keys).
TABLES = ("accounts", "follow_counts", "follow_count_deltas", "following", "followers")
# The gRPC scenarios are what is compared; the database ceilings (db:*) and the v4 shim
# measure the server, not where its tables live.
CITUS_SCENARIOS = [(name, text) for name, text in SCENARIOS if name.startswith("grpc:")]
# Cluster settings for the bench on top of the harness' own: the statement counters.
BENCH_CLUSTER_SETTINGS = {"citus.enable_stat_counters": "on"}
DEADLOCK_WORDS = ("distributed deadlock", "deadlock detected")


@dataclass
class System:
    """One system under test: its harness, the bench database's URL and its nodes."""

    key: str  # "single", "cluster" or "cluster:<variant>"
    harness: CitusCluster
    url: str
    nodes: list[Node]
    # Per scenario, the round whose calls/s is the median of its rounds.
    results: dict[str, ScenarioResult] = field(default_factory=dict)
    # Every round's results (--rounds N: N of them).
    rounds: list[dict[str, ScenarioResult]] = field(default_factory=list)
    # Summed over the rounds; the CPU figures are milliseconds of CPU per node group.
    counters: dict[str, dict[str, int]] = field(default_factory=dict)
    waits: dict[str, dict[str, float]] = field(default_factory=dict)
    deadlocks: dict[str, Any] = field(default_factory=dict)
    # Session settings of this system's follow-server connections (a variant of the
    # cluster: the same nodes, its server's URL carries them as query parameters).
    session_settings: dict[str, str] = field(default_factory=dict)
    # Another checkout whose server package this system's follow-server runs (a variant).
    checkout: Path | None = None
    # The bench database on its nodes: with variants, each cluster system has its own copy
    # (the write scenarios change the graph: on a shared one only the first would write).
    database: str = DATABASE

    @property
    def citus(self) -> bool:
        return self.key != "single"

    def median_results(self) -> None:
        """Per scenario, the round with the median calls/s (the lower middle of an even
        count) into `results`."""
        self.results = {}
        names = {name for r in self.rounds for name in r}
        for name in names:
            runs = sorted((r[name] for r in self.rounds if name in r), key=_rate)
            self.results[name] = runs[(len(runs) - 1) // 2]


def _rate(result: ScenarioResult) -> float:
    return result.calls_per_s


# -- the two systems ------------------------------------------------------------------------


def start_systems(settings: dict[str, str]) -> tuple[SinglePostgres, CitusCluster]:
    """Start the plain server and the cluster at once (initdb takes seconds per node)."""
    single, cluster = SinglePostgres(), CitusCluster(2, settings=settings)
    with ThreadPoolExecutor(2) as pool:
        futures: list[Future[Any]] = [pool.submit(single.start), pool.submit(cluster.start)]
    errors = [f.exception() for f in futures]
    failed = next((e for e in errors if e is not None), None)
    if failed is not None:
        single.stop()
        cluster.stop()
        raise failed
    return single, cluster


def _variants(specs: list[str]) -> list[tuple[str, dict[str, str], Path | None]]:
    """`NAME:SETTING=VALUE,...` into (name, session settings, checkout); the setting
    `checkout=DIR` is no session setting: the follow-server of DIR's server package."""
    out = []
    for spec in specs:
        name, _, pairs = spec.partition(":")
        values = dict(pair.split("=", 1) for pair in pairs.split(",") if "=" in pair)
        checkout = values.pop("checkout", None)
        if not name or not (values or checkout):
            raise SystemExit(f"--citus-variant wants NAME:SETTING=VALUE[,...], not {spec!r}")
        out.append((name, values, Path(checkout).resolve() if checkout else None))
    return out


def _settings(pairs: list[str]) -> dict[str, str]:
    settings = dict(BENCH_CLUSTER_SETTINGS)
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise SystemExit(f"--citus-setting wants NAME=VALUE, not {pair!r}")
        settings[name.strip()] = value.strip()
    return settings


# -- seeding --------------------------------------------------------------------------------


async def _migrate(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await migrate(conn)
    finally:
        await conn.close()


async def _analyze(url: str) -> None:
    """VACUUM ANALYZE each table (named: Citus propagates a named table to its shards)."""
    conn = await asyncpg.connect(url)
    try:
        for table in TABLES:
            await conn.execute(f"VACUUM ANALYZE {table}")
    finally:
        await conn.close()


async def seed_single(url: str, accounts: Path, edges: Path) -> dict[str, Any]:
    await _migrate(url)
    print("seeding the single node: follow-server import ...", file=sys.stderr)
    imported = await import_csv(url, accounts, edges)
    await _analyze(url)
    return imported


async def copy_tables(source: str, target: str, folder: Path) -> dict[str, Any]:
    """COPY every table out of `source` (binary) and into the same table of `target`,
    which must be empty; rows per table and the seconds it took."""
    started = time.perf_counter()
    rows: dict[str, int] = {}
    src = await asyncpg.connect(source)
    dst = await asyncpg.connect(target)
    try:
        for table in TABLES:
            path = folder / f"{table}.copy"
            await src.copy_from_table(table, output=path, format="binary")
            status = await dst.copy_to_table(table, source=path, format="binary")
            rows[table] = int(status.split()[-1])
            path.unlink()
    finally:
        await src.close()
        await dst.close()
    return {"rows": rows, "seconds": round(time.perf_counter() - started, 3)}


async def seed_cluster(
    url: str, single_url: str, method: str, accounts: Path, edges: Path, folder: Path
) -> dict[str, Any]:
    """Migrate (the tables are distributed), then seed by the importer or by COPY."""
    await _migrate(url)
    doc: dict[str, Any] = {}
    if method in ("auto", "import"):
        print("seeding the cluster: follow-server import ...", file=sys.stderr)
        try:
            doc["import"] = await import_csv(url, accounts, edges)
            doc["method"] = "the bulk importer"
        except Exception as exc:
            if method == "import":
                raise
            # One transaction: a failed import leaves nothing behind; say why it failed.
            doc["import_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
            print(f"  the importer failed on Citus: {doc['import_error']}", file=sys.stderr)
    if "method" not in doc:
        print("seeding the cluster: COPY out of the single node, in ...", file=sys.stderr)
        await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(f"TRUNCATE {', '.join(TABLES)}")
        finally:
            await conn.close()
        doc["copy"] = await copy_tables(single_url, url, folder)
        doc["method"] = "COPY from the seeded single node"
    await _analyze(url)
    return doc


async def fingerprint(url: str) -> dict[str, Any]:
    """Rows per table and the counter sums: equal on both systems when the data is."""
    conn = await asyncpg.connect(url)
    try:
        doc: dict[str, Any] = {}
        for table in TABLES:
            if table != "follow_count_deltas":  # rows of partial counts: see below
                doc[table] = await conn.fetchval(f"SELECT count(*) FROM {table}")
        # Counts are the counter rows plus the delta rows (follow_totals); how much sits in
        # each depends on who wrote them (the importer, the calls), not on the data.
        row = await conn.fetchrow(
            "SELECT c.following, c.followers + d.followers, c.mutual + d.mutual"
            " FROM (SELECT sum(following)::bigint AS following,"
            " sum(followers)::bigint AS followers, sum(mutual)::bigint AS mutual"
            " FROM follow_counts) c,"
            " (SELECT coalesce(sum(followers), 0)::bigint AS followers,"
            " coalesce(sum(mutual), 0)::bigint AS mutual FROM follow_count_deltas) d"
        )
        doc["sum_following_followers_mutual"] = list(row) if row else None
        doc["mutual_edges"] = await conn.fetchval(
            "SELECT count(*) FROM following WHERE mutual_since IS NOT NULL"
        )
        return doc
    finally:
        await conn.close()


# -- the statements behind the reads, on idle systems ----------------------------------------


def _task_count(plan: Any) -> int | None:
    """The largest "Task Count" anywhere in an EXPLAIN (FORMAT JSON) plan (Citus' job)."""
    if isinstance(plan, dict):
        found = [plan["Task Count"]] if isinstance(plan.get("Task Count"), int) else []
        found += [c for c in (_task_count(v) for v in plan.values()) if c is not None]
        return max(found) if found else None
    if isinstance(plan, list):
        counts = [c for c in (_task_count(v) for v in plan) if c is not None]
        return max(counts) if counts else None
    return None


_OPENED = "SELECT connection_establishment_succeeded FROM citus_stat_counters WHERE name = $1"


async def statement_times(
    url: str, meta: dict[str, Any], runs: int, citus: bool
) -> list[dict[str, Any]]:
    """Each read call's statements, prepared, timed `runs` times one after another from one
    client (median ms); on Citus, the tasks it runs for each (EXPLAIN ANALYZE) and the
    connections to workers it opened per run."""
    celebrity = meta["celebrity"]
    users = meta["params"]["users"]
    rng = random.Random(5)
    conn = await asyncpg.connect(url)
    try:
        first, _ = _PAGES[FollowType.FAN]
        page = [r[0] for r in await conn.fetch(first, celebrity, 100)]
        some = [USERS_FORMAT.format(rng.randrange(users)) for _ in range(120)]
        cases: list[tuple[str, str, tuple[Any, ...]]] = [
            ("List page: profiles of 101 users (accounts, user_id = ANY)", _PROFILES,
             ([celebrity, *page],)),
            ("List page: first 101 fans (followers, one owner)", first, (celebrity, 101)),
            ("GetInfo(20): counts of 21 users (follow_counts + deltas)", _COUNTS,
             (some[:21],)),
            ("Check(100): one owner's edges to 100 targets", _CHECK, (some[0], some[20:120])),
        ]  # fmt: skip
        out = []
        for name, sql, params in cases:
            statement = await conn.prepare(sql)
            for _ in range(max(5, runs // 10)):
                await statement.fetch(*params)
            opened = await conn.fetchval(_OPENED, DATABASE) if citus else 0
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                await statement.fetch(*params)
                times.append((time.perf_counter() - t0) * 1000)
            if citus:
                opened = (await conn.fetchval(_OPENED, DATABASE) - opened) / runs
            plan = json.loads(await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}", *params))
            out.append(
                {
                    "name": name,
                    "ms": statistics.median(times),
                    "p90_ms": statistics.quantiles(times, n=10)[-1],
                    "tasks": _task_count(plan),
                    "connections_opened_per_run": opened if citus else None,
                    "explain_execution_ms": plan[0].get("Execution Time"),
                    "sql": " ".join(sql.split()),
                }
            )
        return out
    finally:
        await conn.close()


# -- deadlocks and counters -----------------------------------------------------------------


async def _deadlock_counts(nodes: list[Node], database: str = DATABASE) -> dict[str, int]:
    counts = {}
    for node in nodes:
        conn = await asyncpg.connect(node.url(database))
        try:
            counts[node.name] = await conn.fetchval(
                "SELECT deadlocks FROM pg_stat_database WHERE datname = $1", database
            )
        finally:
            await conn.close()
    return counts


def _log_size(path: Path) -> int:
    with contextlib.suppress(OSError):
        return path.stat().st_size
    return 0


def _log_lines(path: Path, offset: int) -> list[str]:
    """The lines naming a deadlock that `path` gained after `offset` bytes."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if any(w in line for w in DEADLOCK_WORDS)]


def deadlocks(system: System, before: dict[str, Any], server_log: Path) -> dict[str, Any]:
    """What the nodes and the server say about deadlocks since `before`."""
    after = asyncio.run(_deadlock_counts(system.nodes, system.database))
    local = {n: after[n] - before["stat"][n] for n in after}
    lines = {n.name: _log_lines(n.log, before["logs"][n.name]) for n in system.nodes}
    server_lines = _log_lines(server_log, 0)
    distributed = sum(1 for ls in lines.values() for line in ls if "distributed deadlock" in line)
    return {
        "total": sum(local.values()) + distributed,
        "local": sum(local.values()),
        "local_by_node": local,
        "distributed": distributed,
        "log_lines": sum(len(ls) for ls in lines.values()),
        "server_log_lines": len(server_lines),
        "nodes": [n.name for n in system.nodes],
        "samples": [line for ls in lines.values() for line in ls][:10] + server_lines[:5],
    }


# Client backends of the bench database busy on a node, by state and what they wait for
# ("CPU" when they wait for nothing; on the coordinator "Extension:Extension" is Citus
# waiting for the workers' answers, "Lock:advisory" its shard-resource locks).
_BUSY = """
SELECT state || ' ' || coalesce(wait_event_type || ':' || wait_event, 'CPU') AS what, count(*)
FROM pg_stat_activity
WHERE datname = $1 AND backend_type = 'client backend' AND state <> 'idle'
  AND pid <> pg_backend_pid()
GROUP BY 1
"""


class WaitSampler:
    """What the cluster's backends do during a scenario: pg_stat_activity on every node,
    sampled every `interval` seconds from a thread; the mean number of backends per
    (node, state, wait event)."""

    def __init__(self, nodes: list[Node], database: str, interval: float = 0.1) -> None:
        self._nodes = nodes
        self._database = database
        self._interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._counts: Counter[str] = Counter()
        self._samples = 0

    def start(self) -> None:
        self._stop.clear()
        self._counts.clear()
        self._samples = 0
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._thread.start()

    async def _run(self) -> None:
        conns = [await asyncpg.connect(n.url(self._database)) for n in self._nodes]
        try:
            while not self._stop.is_set():
                for node, conn in zip(self._nodes, conns, strict=True):
                    for what, count in await conn.fetch(_BUSY, self._database):
                        self._counts[f"{node.name}: {what}"] += count
                self._samples += 1
                await asyncio.sleep(self._interval)
        finally:
            for conn in conns:
                await conn.close()

    def stop(self) -> dict[str, float]:
        """Stop sampling; the mean backends per (node, state, wait event), largest first."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        n = max(self._samples, 1)
        return {k: round(v / n, 2) for k, v in self._counts.most_common()}


def _counter_probe(system: System) -> Callable[[str], None]:
    """A run_scenarios probe: the coordinator's Citus statement counters and the CPU time
    of the coordinator and of the workers before and after each scenario (their
    differences are added to system.counters[scenario], over the rounds), and what the
    nodes' backends wait for meanwhile (system.waits[scenario], the last round)."""
    sampler = WaitSampler(system.nodes, system.database)
    columns = {
        "query_execution_single_shard": "single_shard",
        "query_execution_multi_shard": "multi_shard",
        "connection_establishment_succeeded": "connections_opened",
        "connection_reused": "connections_reused",
    }
    pids = _postmasters(system.nodes)
    seen: dict[str, list[int]] = {}

    def read() -> list[int]:
        out = system.harness.sql(
            system.nodes[0],
            f"SELECT {', '.join(columns)} FROM citus_stat_counters"
            f" WHERE name = '{system.database}'",
            database=system.database,
        )
        cpu = [tree_cpu_seconds(pid) for pid in pids]
        return [
            *(int(x) for x in out.strip().split("|")),
            round(cpu[0] * 1000),
            round(sum(cpu[1:]) * 1000),
        ]

    keys = [*columns.values(), "coordinator_cpu_ms", "workers_cpu_ms"]

    def probe(name: str) -> None:
        if name in seen:
            system.waits[name] = sampler.stop()
            now = read()
            before = seen.pop(name)
            summed = system.counters.setdefault(name, dict.fromkeys(keys, 0))
            for key, a, b in zip(keys, now, before, strict=True):
                summed[key] += a - b
        else:
            seen[name] = read()
            sampler.start()

    return probe


# -- one system's scenarios ----------------------------------------------------------------


def _postmasters(nodes: list[Node]) -> list[int]:
    pids = []
    for node in nodes:
        with contextlib.suppress(OSError, ValueError, IndexError):
            pids.append(int((node.data / "postmaster.pid").read_text().split()[0]))
    return pids


def _start_server(system: System, profile: Profile, log: Path, workers: int) -> Any:
    """follow-server for `system`: this checkout's, or with a variant's `checkout` the
    server package of that folder (first on PYTHONPATH, ahead of the editable install)."""
    if system.checkout is None:
        return start_server(system.url, profile, log, workers)
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(system.checkout)
    try:
        return start_server(system.url, profile, log, workers)
    finally:
        if before is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = before


class Session:
    """follow-server against one system, its load generators and monitors, for as long as
    the scenarios run; `close()` stops them and reads the deadlock figures."""

    def __init__(
        self, system: System, profile: Profile, meta: dict[str, Any], out: Path, workers: int
    ) -> None:
        print(f"{system.key}: starting follow-server ...", file=sys.stderr)
        self.system = system
        self.profile = profile
        self.meta = meta
        self.log = out / f"bench-citus-server-{system.key}.log"
        self._before = {
            "stat": asyncio.run(_deadlock_counts(system.nodes, system.database)),
            "logs": {n.name: _log_size(n.log) for n in system.nodes},
        }
        self.server = _start_server(system, profile, self.log, workers)
        self.workers: Workers | None = None
        try:
            # The bench's own queries without the variant's session settings.
            plain = system.url.partition("?")[0]
            self.fixtures = asyncio.run(prepare(plain, meta))
            self.workers = Workers(profile.processes, Target(self.server.grpc_address, plain))
        except BaseException:
            self.close()
            raise
        self.monitor = Monitor(self.server, _postmasters(system.nodes))
        self.probe = _counter_probe(system) if system.citus else None

    def run(self, scenario: tuple[str, str], results: dict[str, ScenarioResult]) -> None:
        """One scenario into `results` (one round's; unfollow20 replays that round's
        follow20)."""
        assert self.workers is not None
        run_scenarios(
            self.workers, self.monitor, self.profile, self.meta, self.fixtures, [scenario],
            None, None, results, self.probe, f"{self.system.key:<8}",
        )  # fmt: skip

    def close(self) -> None:
        if self.workers is not None:
            self.workers.close()
            self.workers = None
        if self.server.process.poll() is None:
            self.server.stop()
            time.sleep(1.5)  # statistics reach the shared counters when backends end
            self.system.deadlocks = deadlocks(self.system, self._before, self.log)


def run_interleaved(
    systems: list[System],
    profile: Profile,
    meta: dict[str, Any],
    out: Path,
    server_workers: int,
    only: set[str] | None,
    rounds: int = 1,
) -> None:
    """All systems served at once, each scenario run on one system after the other (the
    order rotating from scenario to scenario and from round to round), so the figures of
    a scenario are taken minutes apart at most under whatever else this machine is
    running; `rounds` times over, each system's median round kept as its results."""
    sessions: list[Session] = []
    try:
        for system in systems:
            sessions.append(Session(system, profile, meta, out, server_workers))
        chosen = [s for s in CITUS_SCENARIOS if only is None or s[0] in only]
        for round_ in range(rounds):
            if rounds > 1:
                print(f"round {round_ + 1} of {rounds}", file=sys.stderr)
            results: list[dict[str, ScenarioResult]] = [{} for _ in sessions]
            for i, scenario in enumerate(chosen):
                shift = (i + round_) % len(sessions)
                for k in [*range(shift, len(sessions)), *range(shift)]:
                    sessions[k].run(scenario, results[k])
            for session, result in zip(sessions, results, strict=True):
                session.system.rounds.append(result)
    finally:
        for session in sessions:
            session.system.median_results()
            session.close()


# -- the run --------------------------------------------------------------------------------


def comparison(single: System, cluster: System) -> list[dict[str, Any]]:
    """Per scenario: both throughputs (the median rounds'), the ratio cluster / single (the
    median of the rounds' ratios, each round's pair taken close together), every round's
    ratio, and the target."""
    rows = []
    for name, _ in CITUS_SCENARIOS:
        s, c = single.results.get(name), cluster.results.get(name)
        if s is None and c is None:
            continue
        per_round = [
            round(b[name].calls_per_s / a[name].calls_per_s, 3)
            for a, b in zip(single.rounds, cluster.rounds, strict=False)
            if name in a and name in b and a[name].calls_per_s
        ]
        ratio = statistics.median(per_round) if per_round else None
        target = CLUSTER_TARGETS.get(name)
        counters = cluster.counters.get(name)
        calls = sum(sum(r[name].issued_per_worker) for r in cluster.rounds if name in r)

        def per_call(key: str, counters: dict[str, int] | None = counters, n: int = calls) -> Any:
            return counters[key] / n if counters and n and key in counters else None

        rows.append(
            {
                "scenario": name,
                "single_calls_per_s": s.calls_per_s if s else None,
                "cluster_calls_per_s": c.calls_per_s if c else None,
                "ratio": ratio,
                "ratio_rounds": per_round,
                "target": target,
                "met": None if target is None or ratio is None else ratio >= target,
                "single_p50_ms": s.p50_ms if s else None,
                "cluster_p50_ms": c.p50_ms if c else None,
                "single_errors": s.errors if s else None,
                "cluster_errors": c.errors if c else None,
                "cluster_statements": counters,
                "multi_shard_per_call": per_call("multi_shard"),
                "single_shard_per_call": per_call("single_shard"),
                "connections_opened_per_call": per_call("connections_opened"),
                "coordinator_cpu_ms_per_call": per_call("coordinator_cpu_ms"),
                "workers_cpu_ms_per_call": per_call("workers_cpu_ms"),
                "cluster_busy_backends": cluster.waits.get(name),
            }
        )
    return rows


def variant_table(single: System, clusters: list[System]) -> str:
    """Per scenario, each cluster variant's median ratio to the single node (its rounds in
    brackets) and its coordinator CPU per call."""
    head = " | ".join(c.key for c in clusters)
    lines = [
        "### cluster variants / single node: median ratio [rounds], coordinator CPU ms / call",
        "",
        f"| scenario | {head} |",
        "|---|" + "---|" * len(clusters),
    ]
    tables = [{row["scenario"]: row for row in comparison(single, c)} for c in clusters]
    for name, _ in CITUS_SCENARIOS:
        cells = []
        for table in tables:
            row = table.get(name)
            if row is None or row["ratio"] is None:
                cells.append("")
                continue
            cpu = row["coordinator_cpu_ms_per_call"]
            rounds = " ".join(f"{r:.2f}" for r in row["ratio_rounds"])
            cells.append(f"{row['ratio']:.2f} [{rounds}], {cpu:.2f} ms" if cpu is not None else "")
        if any(cells):
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


async def _versions(single_url: str, cluster_url: str) -> dict[str, str]:
    out = {}
    for key, url in (("single", single_url), ("cluster", cluster_url)):
        conn = await asyncpg.connect(url)
        try:
            out[key] = await conn.fetchval("SHOW server_version")
            if key == "cluster":
                full = await conn.fetchval("SELECT citus_version()")
                out["citus"] = full.split(" on ")[0]
                out["citus_full"] = full
                out["shards"] = await conn.fetchval(
                    "SELECT count(*) FROM pg_dist_shard WHERE logicalrelid = 'accounts'::regclass"
                )
        finally:
            await conn.close()
    return out


def run_citus(args: argparse.Namespace, profile: Profile, out: Path) -> None:
    """`python -m tests.bench --citus`: see the module docstring."""
    started = time.monotonic()
    settings = _settings(args.citus_setting)
    load_at_start = machine("")["load_average_at_start"]
    print("starting a Citus cluster (coordinator + 2 workers) and one PostgreSQL ...",
          file=sys.stderr)  # fmt: skip
    single_pg, cluster_pg = start_systems(settings)
    try:
        folder = out / "cache" / seed_key(profile.graph)
        graph = graphs.generate(profile.graph)
        accounts, edges = graphs.write_csv(graph, folder)
        single = System("single", single_pg, single_pg.create_database(DATABASE),
                        [single_pg.node])  # fmt: skip
        cluster = System(
            "cluster",
            cluster_pg,
            cluster_pg.create_database(DATABASE),
            [n for n in (cluster_pg.coordinator, *cluster_pg.workers) if n is not None],
        )
        if getattr(args, "citus_coordinator_shards", False):
            # The coordinator holds shards too (before the tables are distributed): Citus
            # runs the statements of its own shards locally, with no connection between.
            coordinator = cluster.nodes[0]
            cluster_pg.sql(
                coordinator,
                f"SELECT citus_set_node_property('127.0.0.1', {coordinator.port},"
                " 'shouldhaveshards', true)",
                database=DATABASE,
            )
        imported = asyncio.run(seed_single(single.url, accounts, edges))
        cluster_seed = asyncio.run(
            seed_cluster(cluster.url, single.url, args.citus_seed, accounts, edges,
                         folder / "copy")
        )  # fmt: skip
        prints = {s.key: asyncio.run(fingerprint(s.url)) for s in (single, cluster)}
        if prints["single"] != prints["cluster"]:
            raise SystemExit(f"the two systems hold different data: {prints}")
        meta = graph.meta() | {"import": imported}
        versions = asyncio.run(_versions(single.url, cluster.url))
        print("timing the read statements on both idle systems ...", file=sys.stderr)
        runs = 200 if args.quick else 500
        times = {
            s.key: asyncio.run(statement_times(s.url, meta, runs, s.citus))
            for s in (single, cluster)
        }
        only = set(args.only.split(",")) if args.only else None
        variants = [
            System(f"cluster:{name}", cluster_pg, "", cluster.nodes,
                   session_settings=values, checkout=checkout, database=f"{DATABASE}_v{i}")
            for i, (name, values, checkout) in enumerate(
                _variants(getattr(args, "citus_variant", None) or []))
        ]  # fmt: skip
        if variants:
            # One copy of the seeded database per cluster system (the original becomes
            # their template).
            cluster_pg.seal_template(DATABASE)
            cluster.database = f"{DATABASE}_main"
            cluster.url = cluster_pg.copy_database(cluster.database, DATABASE)
            for v in variants:
                url = cluster_pg.copy_database(v.database, DATABASE)
                v.url = f"{url}?{urlencode(v.session_settings)}" if v.session_settings else url
        rounds = args.rounds or 1
        run_interleaved(
            [cluster, single, *variants], profile, meta, out, args.workers, only, rounds
        )
        _keep_logs(cluster, out)
    finally:
        cluster_pg.stop()
        single_pg.stop()
    host = machine(f"{versions['single']} (single), {versions['citus']} (cluster)")
    host["load_average_at_end"] = host["load_average_at_start"]
    host["load_average_at_start"] = load_at_start
    doc = {
        "mode": "citus",
        "profile": "quick" if args.quick else "full",
        "config": asdict(profile)
        | {
            "server_workers": args.workers,
            "cluster": {
                "workers": 2,
                "shards": versions["shards"],
                "coordinator_shards": getattr(args, "citus_coordinator_shards", False),
                "settings": cluster_pg.settings,
            },
            "single_settings": single_pg.settings,
        },
        "machine": host,
        "versions": versions,
        "git": git_revision(),
        "graph": meta,
        "seed": {"single": "the bulk importer", "cluster": cluster_seed, "fingerprint": prints},
        "systems": {
            s.key: {
                "url": s.url,
                "scenarios": [asdict(r) for r in s.results.values()],
                "ratios": ratios(s.results, meta),
                "deadlocks": s.deadlocks,
                "citus_statements": s.counters,
                "busy_backends": s.waits,
            }
            for s in (single, cluster)
        },
        "rounds": rounds,
        "comparison": comparison(single, cluster),
        "variants": {
            v.key: {
                "session_settings": v.session_settings,
                "checkout": str(v.checkout) if v.checkout else None,
                "comparison": comparison(single, v),
                "deadlocks": v.deadlocks,
            }
            for v in variants
        },
        "deadlocks": cluster.deadlocks | {"single_node": single.deadlocks["total"]},
        "statements": [
            {
                "name": a["name"],
                "single_ms": a["ms"],
                "cluster_ms": b["ms"],
                "single_p90_ms": a["p90_ms"],
                "cluster_p90_ms": b["p90_ms"],
                "tasks": b["tasks"],
                "cluster_connections_opened_per_run": b["connections_opened_per_run"],
                "cluster_explain_execution_ms": b["explain_execution_ms"],
                "single_explain_execution_ms": a["explain_execution_ms"],
                "sql": a["sql"],
            }
            for a, b in zip(times["single"], times["cluster"], strict=True)
        ],
        "seconds": round(time.monotonic() - started, 1),
    }
    stem = "bench-citus-quick" if args.quick else "bench-citus"
    json_path = out / f"{stem}.json"
    json_path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    png_path = out / f"{stem}.png"
    render_citus_chart(doc, png_path)
    print(render_citus_table(doc))
    print()
    print(variant_table(single, [cluster, *variants]))
    print(f"\nwrote {json_path} and {png_path} in {doc['seconds']:.0f}s")


def _keep_logs(system: System, out: Path) -> None:
    """Copy the nodes' logs next to the outputs (the cluster's folder goes with it)."""
    folder = out / "bench-citus-logs"
    folder.mkdir(parents=True, exist_ok=True)
    for node in system.nodes:
        with contextlib.suppress(OSError):
            shutil.copyfile(node.log, folder / f"{node.name}.log")


def main(argv: list[str] | None = None) -> None:
    """`python -m tests.bench.citus`: the quick Citus bench with several rounds (medians)
    and cluster variants: `--citus-variant NAME:SETTING=VALUE,...` (repeatable) adds one
    more follow-server on the same cluster whose connections carry those session settings
    (e.g. `generic:plan_cache_mode=force_generic_plan`), interleaved with the others and
    compared with the single node like the cluster."""
    from tests.bench.run import QUICK

    parser = argparse.ArgumentParser(prog="python -m tests.bench.citus", description=main.__doc__)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every scenario")
    parser.add_argument("--only", help="comma-separated scenario names to run")
    parser.add_argument("--out", type=Path, default=Path("var/bench"), help="output folder")
    parser.add_argument("--duration", type=float, help="measured seconds per scenario")
    parser.add_argument("--workers", type=int, default=1, help="follow-server --workers N")
    parser.add_argument(
        "--citus-seed", choices=("auto", "import", "copy"), default="copy", help="see --citus"
    )
    parser.add_argument("--citus-setting", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--citus-variant", action="append", default=[], metavar="NAME:S=V,...")
    parser.add_argument(
        "--citus-coordinator-shards",
        action="store_true",
        help="the coordinator holds shards too (3 nodes with shards, local execution)",
    )
    args = parser.parse_args(argv)
    args.quick = True
    profile = Profile(
        QUICK.graph,
        warmup=QUICK.warmup,
        duration=args.duration or QUICK.duration,
        concurrency=QUICK.concurrency,
        processes=QUICK.processes,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    run_citus(args, profile, args.out)


if __name__ == "__main__":
    main()
