"""`make bench-scale` (`python -m tests.bench --scale`): cost flat as the graph grows.

1. Graphs of several sizes (`--scale-sizes`, millions of edges; default 1, 5 and 10) from
   the bench's generator (tests.bench.graph) with the full bench's shape: users grow with
   the edges (FULL's 4.8 edges per user) and the celebrity keeps FULL's share of the users
   as fans (84%). Each is imported with the bulk importer, VACUUM ANALYZEd and kept as a
   template database in an embedded PostgreSQL of its own (var/bench/scale-pgdata), cached
   by graph parameters like the bench's seeds; the generated CSV files are deleted once
   imported (the generator makes them again on demand). `--reseed` imports again.
2. Per size, from the template: the database size (pg_database_size, per table heap and
   indexes, per million edges), the depth of every B-tree (its metapage, read from the data
   file) and the import's time and rate (as measured when the template was made, with the
   machine's load average then).
3. A fresh copy of each template and a `follow-server` on each, all up at once, and the
   bench's gRPC scenarios (tests.bench.load; grpc:empty as a control that touches no
   table) run in rounds: every scenario on every size, one size right after the other
   (order alternating), so each set of figures is taken close together on a machine whose
   other load drifts; each run has the bench's warm-up first (1.5 s, then 4 s measured, 5
   rounds; with --quick 0.5 s + 3 s, 2 rounds). The figures are medians over the rounds.
   `--sequential` measures one size at a time instead (only one copy on disk at a time).
   The copies are dropped at the end; the templates stay.
4. Each call's statements at every size, EXPLAIN (ANALYZE, BUFFERS, WAL) on the copies
   with the servers stopped (writes rolled back): milliseconds and buffers per call.
5. A table (throughput and p50/p99 per size, largest / smallest with its 0.8 target, the
   sizes, the statements), a JSON file of every figure and a PNG chart, in var/bench/
   (bench-scale.json/png).
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
import struct
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from server.database import Database, open_database
from server.errors import FollowType
from server.store import (
    _CHECK,
    _COUNTS,
    _LOCK_OWNER,
    _OWN_EDGES_AMONG,
    _PAGES,
    _PROFILES,
    _SHARE_LOCK,
    _WRITE_FOLLOWS,
    _WRITE_UNFOLLOWS,
    delta_shard,
)
from tests.bench import graph as graphs
from tests.bench.load import USERS_FORMAT, Target
from tests.bench.report import SCALE_TARGET, render_scale_chart, render_scale_table
from tests.bench.run import (
    SCENARIOS,
    Fixtures,
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
    seed_key,
    start_server,
)

SCALE_SCENARIO_NAMES = (
    "grpc:empty",  # the control: no table, so its ratio is the machine's drift
    "grpc:check100",
    "grpc:getinfo20",
    "grpc:getinfo1@celebrity",
    "grpc:getinfo1@small",
    "grpc:list@first",
    "grpc:list@deep",
    "grpc:follow20",
    "grpc:unfollow20",
    "grpc:follow1@celebrity",
    "grpc:follow1",
)
SCALE_SCENARIOS = [(n, d) for n, d in SCENARIOS if n in SCALE_SCENARIO_NAMES]
CONTROL = "grpc:empty"
EDGE_TABLES = ("following", "followers")
TABLES = ("accounts", "follow_counts", "follow_count_deltas", "following", "followers")
BTREE_MAGIC = 0x053162
# Free disk the interleaved run keeps beyond the copies it makes.
DISK_MARGIN = 2 * 2**30
PROFILE_SAMPLES = 20
# The (client_ip, platform) a gRPC call's event row gets (server.origin), for the write
# statements' last two parameters.
ORIGIN = ("127.0.0.1", "gRPC")


def scale_params(millions: float) -> graphs.GraphParams:
    """The full bench's graph shape at `millions` edges: users and celebrity fans in the
    same proportions as graphs.FULL."""
    edges = round(millions * 1_000_000)
    users = round(edges * graphs.FULL.users / graphs.FULL.edges)
    fans = round(users * graphs.FULL.celebrity_followers / graphs.FULL.users)
    return graphs.GraphParams(users=users, edges=edges, celebrity_followers=fans)


def size_label(millions: float) -> str:
    return f"{millions:g}M"


@dataclass
class Size:
    """One graph size: its template, its measurements, and while measured its copy,
    server and load generators."""

    millions: float
    params: graphs.GraphParams
    seed: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    storage: dict[str, Any] = field(default_factory=dict)
    results: dict[str, list[ScenarioResult]] = field(default_factory=dict)
    load: dict[str, list[float]] = field(default_factory=dict)  # 1-min load average per run
    statements: dict[str, Any] = field(default_factory=dict)
    server_idle_rss_mb: float | None = None
    run_url: str = ""
    server: Server | None = None
    workers: Workers | None = None
    monitor: Monitor | None = None
    fixtures: Fixtures | None = None

    @property
    def label(self) -> str:
        return size_label(self.millions)

    @property
    def run_db(self) -> str:
        return "scale_run_" + f"{self.millions:g}".replace(".", "_")


# -- templates and their sizes ----------------------------------------------------------------


async def seed_sizes(database: Database, sizes: list[Size], out: Path, reseed: bool) -> None:
    """The template of each size (imported now unless cached), then its storage figures."""
    admin = await asyncpg.connect(database.url)
    try:
        for row in await admin.fetch(
            "SELECT datname FROM pg_database WHERE datname LIKE 'scale_run_%'"
        ):
            await admin.execute(f"DROP DATABASE IF EXISTS {row[0]} WITH (FORCE)")
        if reseed:
            for size in sizes:
                name = f"seed_{seed_key(size.params)}"
                await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await admin.close()
    for size in sizes:
        started = time.monotonic()
        print(
            f"scale {size.label}: template for {size.params.edges:,} edges,"
            f" {size.params.users:,} users ...",
            file=sys.stderr,
        )
        size.seed, size.meta = await ensure_seed(database, size.params, out)
        # The CSV files are only the importer's input: made again by the generator if needed.
        shutil.rmtree(out / "cache" / seed_key(size.params), ignore_errors=True)
        imp = size.meta["import"]
        print(
            f"scale {size.label}: {'cached' if size.meta['cached'] else 'imported'};"
            f" import {imp['seconds']}s, {imp['edges_per_s']:,} edges/s"
            f" ({time.monotonic() - started:.0f}s now)",
            file=sys.stderr,
        )
        size.storage = await storage(database, size.seed, size.meta["edges"])


async def storage(database: Database, name: str, edges: int) -> dict[str, Any]:
    """pg_database_size of a template, each table's heap and index bytes, and the depth of
    each B-tree (levels from root to leaf, 1 = the root is the leaf)."""
    conn = await asyncpg.connect(db_url(database, name))
    try:
        await conn.execute("CHECKPOINT")  # the metapages on disk are current
        total = await conn.fetchval("SELECT pg_database_size(current_database())")
        tables = {}
        for table in TABLES:
            row = await conn.fetchrow(
                """SELECT pg_relation_size(c.oid) AS heap, pg_indexes_size(c.oid) AS indexes,
                          pg_total_relation_size(c.oid) AS total, c.reltuples::bigint AS rows
                   FROM pg_class c WHERE c.oid = $1::regclass""",
                table,
            )
            tables[table] = dict(row) if row is not None else {}
        indexes = {}
        pgdata = getattr(database.embedded, "pgdata", None)
        for row in await conn.fetch(
            """SELECT i.relname AS name, t.relname AS table_name, pg_relation_size(i.oid) AS bytes,
                      pg_relation_filepath(i.oid) AS path
               FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
               JOIN pg_class t ON t.oid = x.indrelid JOIN pg_am a ON a.oid = i.relam
               WHERE t.relname = ANY($1::text[]) AND a.amname = 'btree' ORDER BY 2, 1""",
            list(TABLES),
        ):
            levels = btree_levels(Path(pgdata) / row["path"]) if pgdata else None
            indexes[row["name"]] = {
                "table": row["table_name"],
                "bytes": row["bytes"],
                "levels": levels,
            }
        shared_buffers = await conn.fetchval("SHOW shared_buffers")
    finally:
        await conn.close()
    return {
        "database_bytes": total,
        "bytes_per_million_edges": total / (edges / 1e6),
        "tables": tables,
        "indexes": indexes,
        "shared_buffers": shared_buffers,
    }


def btree_levels(path: Path) -> int | None:
    """A B-tree's depth from its metapage (block 0: the page header, then btm_magic,
    btm_version, btm_root, btm_level); None when the file cannot be read."""
    try:
        with path.open("rb") as f:
            head = f.read(40)
    except OSError:
        return None
    if len(head) < 40:
        return None
    magic, _version, _root, level = struct.unpack_from("<IIII", head, 24)
    return level + 1 if magic == BTREE_MAGIC else None


# -- the copies, their servers and the rounds --------------------------------------------------


async def make_copy(database: Database, size: Size) -> None:
    admin = await asyncpg.connect(database.url)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {size.run_db} WITH (FORCE)")
        await admin.execute(
            f"CREATE DATABASE {size.run_db} TEMPLATE {size.seed} STRATEGY FILE_COPY"
        )
    finally:
        await admin.close()
    size.run_url = db_url(database, size.run_db)


async def drop_copy(database: Database, size: Size) -> None:
    admin = await asyncpg.connect(database.url)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {size.run_db} WITH (FORCE)")
    finally:
        await admin.close()


def _tree_rss_mb(server: Server) -> float:
    total = 0
    for p in server.tree():
        with contextlib.suppress(Exception):
            total += p.memory_info().rss
    return total / 2**20


def start_size(database: Database, size: Size, profile: Profile, out: Path) -> None:
    """A copy of the template, a follow-server on it and load generators for it."""
    asyncio.run(make_copy(database, size))
    size.server = start_server(
        size.run_url, profile, out / f"bench-scale-server-{size.label}.log", workers=1
    )
    size.server_idle_rss_mb = _tree_rss_mb(size.server)
    size.fixtures = asyncio.run(prepare(size.run_url, size.meta))
    size.workers = Workers(profile.processes, Target(size.server.grpc_address, size.run_url))
    pid = _postmaster_pid(database)
    size.monitor = Monitor(size.server, [pid] if pid is not None else [])


def stop_size(size: Size) -> None:
    if size.workers is not None:
        size.workers.close()
        size.workers = None
    if size.server is not None:
        size.server.stop()
        size.server = None


def run_rounds(sizes: list[Size], profile: Profile, rounds: int, only: set[str] | None) -> None:
    """Every scenario on every size, round after round: the sizes of one scenario one right
    after the other, first-to-last on even steps and last-to-first on odd ones."""
    step = 0
    for r in range(rounds):
        for k, (name, description) in enumerate(SCALE_SCENARIOS):
            if only is not None and name not in only:
                continue
            order = sizes if step % 2 == 0 else list(reversed(sizes))
            step += 1
            for size in order:
                assert size.workers is not None
                assert size.monitor is not None
                assert size.fixtures is not None
                limits = None
                if name == "grpc:unfollow20":
                    follows = size.results.get("grpc:follow20", [])
                    if len(follows) <= r:
                        continue
                    limits = follows[r].issued_per_worker  # the same round's follows, replayed
                writes = name in ("grpc:follow20", "grpc:unfollow20")
                seed = 1000 * r + (20 if writes else 1 + k)
                # Each round's celebrity followers are other users than the last round's.
                fixtures = Fixtures(size.fixtures.deep_tokens, size.fixtures.non_fans[r::rounds])
                load = os.getloadavg()[0]
                result = run_scenario(
                    size.workers,
                    size.monitor,
                    profile,
                    name,
                    description,
                    size.meta,
                    fixtures,
                    limits,
                    seed,
                )
                size.results.setdefault(name, []).append(result)
                size.load.setdefault(name, []).append(load)
                print(
                    f"  round {r + 1}/{rounds} {size.label:>5} {name:<24}"
                    f" {result.calls_per_s:>8.0f}/s  p50 {result.p50_ms:7.2f} ms"
                    f"  p99 {result.p99_ms:7.2f} ms  errors {result.errors}  load {load:.1f}"
                    + (f"  ({result.error_sample})" if result.error_sample else ""),
                    file=sys.stderr,
                )


# -- each call's statements, EXPLAIN (ANALYZE, BUFFERS, WAL) ---------------------------------

_COUNTERS = (
    "Shared Hit Blocks",
    "Shared Read Blocks",
    "Shared Dirtied Blocks",
    "Shared Written Blocks",
    "WAL Records",
    "WAL FPI",
    "WAL Bytes",
)


def _nodes(node: dict[str, Any]) -> list[dict[str, Any]]:
    out = [node]
    for child in node.get("Plans", []):
        out += _nodes(child)
    return out


def plan_totals(plan: list[dict[str, Any]]) -> dict[str, float]:
    """A statement's buffers and WAL from EXPLAIN (ANALYZE, BUFFERS, WAL, FORMAT JSON): the
    top node's (which include what ran inside it), plus the writing CTEs nobody reads,
    which PostgreSQL runs after the main plan (outside the top node's counts)."""
    top = plan[0]["Plan"]
    nodes = [top] + [
        n
        for n in _nodes(top)[1:]
        if n.get("Node Type") == "ModifyTable" and str(n.get("Subplan Name", "")).startswith("CTE")
    ]
    totals = {k: float(sum(n.get(k, 0) for n in nodes)) for k in _COUNTERS}
    totals["ms"] = float(plan[0].get("Execution Time", 0.0))
    return totals


class _Explainer:
    """EXPLAIN ANALYZE of each statement of a call, summed; the text plan of the last one
    named `keep` kept for the report."""

    def __init__(self, conn: asyncpg.Connection, keep: str | None) -> None:
        self.conn = conn
        self.totals: dict[str, float] = dict.fromkeys((*_COUNTERS, "ms"), 0.0)
        self.statements = 0
        self.keep = keep
        self.kept_sql = ""
        self.kept_params: tuple[Any, ...] = ()

    async def run(self, label: str, sql: str, *params: Any) -> None:
        raw = await self.conn.fetchval(
            f"EXPLAIN (ANALYZE, BUFFERS, WAL, FORMAT JSON) {sql}", *params
        )
        for k, v in plan_totals(json.loads(raw)).items():
            self.totals[k] += v
        self.statements += 1
        if label == self.keep:
            self.kept_sql, self.kept_params = sql, params


async def _locks(ex: _Explainer, user: str, targets: list[str]) -> tuple[Any, set[str]]:
    """The lock statements of a write call (store._lock_users' order), each explained; the
    owner's row and the targets that exist."""
    ids = sorted({user, *targets})
    at = ids.index(user)
    known: set[str] = set()
    owner = None
    for i, uid in enumerate(ids):
        if i == at:
            await ex.run("lock owner", _LOCK_OWNER, uid)
            owner = await ex.conn.fetchrow(_LOCK_OWNER, uid)
        else:
            await ex.run("lock target", _SHARE_LOCK, uid)
            if await ex.conn.fetchval(_SHARE_LOCK, uid) is not None:
                known.add(uid)
    return owner, known


async def _write_call(ex: _Explainer, user: str, targets: list[str], unfollow: bool) -> None:
    """Follow's or Unfollow's statements on one PostgreSQL (store.Store.follow/unfollow)."""
    owner, known = await _locks(ex, user, targets)
    if owner is None:
        return
    await ex.run("own edges", _OWN_EDGES_AMONG, user, targets)
    own = await ex.conn.fetch(_OWN_EDGES_AMONG, user, targets)
    shard = delta_shard(user)
    if unfollow:
        gone = sorted(r[1] for r in own if r[0] == 1 and r[1] in known)
        mutual = [r[1] for r in own if r[0] == 1 and r[2] and r[1] in known]
        if gone:
            await ex.run(
                "write", _WRITE_UNFOLLOWS, user, gone, mutual, shard, owner["now"], *ORIGIN
            )
        return
    followed = {r[1] for r in own if r[0] == 1}
    fans = {r[1] for r in own if r[0] == 2}
    new = [t for t in targets if t in known and t not in followed]
    if new:
        mutual = [t for t in new if t in fans]
        await ex.run("write", _WRITE_FOLLOWS, user, new, owner["now"], mutual, shard, *ORIGIN)


class _Inputs:
    """The random inputs of the statement profiles at one size (the same seed everywhere)."""

    def __init__(
        self,
        size: Size,
        deep: list[tuple[Any, str]],
        unfollowers: list[str],
        non_fans: list[str],
    ) -> None:
        self.users = size.params.users
        self.celebrity: str = size.meta["celebrity"]
        self.small: str = size.meta["ten_follower_user"]
        self.deep = deep
        self.unfollowers = unfollowers
        self.non_fans = non_fans  # not following the celebrity now (after the rounds)

    def some(self, rng: random.Random, n: int) -> list[str]:
        return [USERS_FORMAT.format(rng.randrange(self.users)) for _ in range(n)]

    def user(self, rng: random.Random) -> str:
        return USERS_FORMAT.format(rng.randrange(1, self.users))

    def targets(self, rng: random.Random, user: str, n: int) -> list[str]:
        out: list[str] = []
        while len(out) < n:
            t = self.user(rng)
            if t != user and t not in out:
                out.append(t)
        return out


# The statement whose plan the report keeps, per scenario.
_KEEP = {
    "grpc:check100": "check",
    "grpc:getinfo20": "counts",
    "grpc:getinfo1@celebrity": "counts",
    "grpc:getinfo1@small": "counts",
    "grpc:list@first": "page",
    "grpc:list@deep": "page",
    "grpc:follow20": "write",
    "grpc:unfollow20": "write",
    "grpc:follow1@celebrity": "write",
    "grpc:follow1": "write",
}


async def _call(ex: _Explainer, name: str, inp: _Inputs, rng: random.Random, i: int) -> None:
    """One call of scenario `name`: its statements, explained (writes rolled back)."""
    conn = ex.conn
    user = inp.user(rng)
    if name == "grpc:check100":
        await ex.run("check", _CHECK, user, inp.some(rng, 100))
    elif name == "grpc:getinfo20":
        await ex.run("counts", _COUNTS, [user, *inp.some(rng, 20)])
    elif name in ("grpc:getinfo1@celebrity", "grpc:getinfo1@small"):
        target = inp.celebrity if name.endswith("celebrity") else inp.small
        await ex.run("counts", _COUNTS, [user, target])
    elif name in ("grpc:list@first", "grpc:list@deep"):
        first, next_ = _PAGES[FollowType.FAN]
        params: tuple[Any, ...]
        if name.endswith("first"):
            sql, params = first, (inp.celebrity, 101)
        else:
            at, fan = inp.deep[i % len(inp.deep)]
            sql, params = next_, (inp.celebrity, 101, at, fan)
        await ex.run("page", sql, *params)
        ids = [r[0] for r in await conn.fetch(sql, *params)]
        await ex.run("profiles", _PROFILES, [inp.celebrity, *ids])
    else:
        transaction = conn.transaction()
        await transaction.start()
        try:
            if name == "grpc:follow20":
                await _write_call(ex, user, inp.targets(rng, user, 20), unfollow=False)
            elif name == "grpc:follow1":
                await _write_call(ex, user, inp.targets(rng, user, 1), unfollow=False)
            elif name == "grpc:follow1@celebrity":
                actor = inp.non_fans[i % len(inp.non_fans)]
                await _write_call(ex, actor, [inp.celebrity], unfollow=False)
            elif name == "grpc:unfollow20":
                actor = inp.unfollowers[i % len(inp.unfollowers)]
                rows = await conn.fetch(
                    "SELECT target_id FROM following WHERE user_id = $1 LIMIT 20", actor
                )
                await _write_call(ex, actor, [r[0] for r in rows], unfollow=True)
        finally:
            await transaction.rollback()


async def _inputs(conn: asyncpg.Connection, size: Size) -> _Inputs:
    celebrity = size.meta["celebrity"]
    fans = await conn.fetchval("SELECT followers FROM follow_counts WHERE user_id = $1", celebrity)
    deep = []
    for j in range(5):
        row = await conn.fetchrow(
            """SELECT followed_at, follower_id FROM followers WHERE user_id = $1
               ORDER BY followed_at DESC, follower_id DESC OFFSET $2 LIMIT 1""",
            celebrity,
            int(fans * (0.5 + 0.1 * j)),
        )
        assert row is not None
        deep.append((row[0], row[1]))
    unfollowers = [
        r[0]
        for r in await conn.fetch(
            """SELECT user_id FROM follow_counts TABLESAMPLE SYSTEM (5) REPEATABLE (7)
               WHERE following BETWEEN 20 AND 200 ORDER BY user_id LIMIT 50"""
        )
    ]
    non_fans = [
        r[0]
        for r in await conn.fetch(
            """SELECT a.user_id FROM accounts a WHERE a.user_id <> $1 AND NOT EXISTS (
                   SELECT 1 FROM following f WHERE f.user_id = a.user_id AND f.target_id = $1)
               LIMIT 100""",
            celebrity,
        )
    ]
    return _Inputs(size, deep, unfollowers, non_fans)


async def profile_statements(
    sizes: list[Size], samples: int, only: set[str] | None
) -> dict[str, dict[str, Any]]:
    """Per scenario and size: each call's statements explained `samples` times (the sizes
    interleaved sample by sample): median ms and buffers per call, and one text plan of the
    scenario's main statement."""
    conns = [await asyncpg.connect(s.run_url) for s in sizes]
    try:
        inputs = [await _inputs(c, s) for c, s in zip(conns, sizes, strict=True)]
        found: dict[str, dict[str, Any]] = {}
        for name, _ in SCALE_SCENARIOS:
            if name == CONTROL or (only is not None and name not in only):
                continue
            per_size: list[list[dict[str, float]]] = [[] for _ in sizes]
            kept: list[_Explainer | None] = [None] * len(sizes)
            for i in range(samples):
                order = range(len(sizes)) if i % 2 == 0 else reversed(range(len(sizes)))
                for j in order:
                    rng = random.Random(10_000 + i)  # the same draws at every size
                    ex = _Explainer(conns[j], _KEEP[name])
                    await _call(ex, name, inputs[j], rng, i)
                    per_size[j].append(ex.totals | {"statements": float(ex.statements)})
                    kept[j] = ex
            found[name] = {}
            for j, size in enumerate(sizes):
                rows = per_size[j]
                summary: dict[str, Any] = {
                    k: statistics.median(r[k] for r in rows) for k in rows[0]
                }
                summary["plan"] = await _text_plan(conns[j], kept[j])
                found[name][size.label] = summary
        return found
    finally:
        for c in conns:
            await c.close()


async def _text_plan(conn: asyncpg.Connection, ex: _Explainer | None) -> str:
    """The kept statement's plan as text (its last inputs; writes rolled back)."""
    if ex is None or not ex.kept_sql:
        return ""
    transaction = conn.transaction()
    await transaction.start()
    try:
        rows = await conn.fetch(
            f"EXPLAIN (ANALYZE, BUFFERS, WAL, COSTS OFF) {ex.kept_sql}", *ex.kept_params
        )
    except asyncpg.PostgresError as exc:  # e.g. the edge its inputs drew is gone
        return f"({type(exc).__name__}: {exc})"
    finally:
        await transaction.rollback()
    return "\n".join(r[0] for r in rows)


# -- the run ----------------------------------------------------------------------------------


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v == v]  # NaN-free
    return statistics.median(values) if values else None


def summarise(sizes: list[Size]) -> list[dict[str, Any]]:
    """Per scenario: each size's medians over the rounds, and largest / smallest."""
    small, large = sizes[0], sizes[-1]
    rows = []
    for name, description in SCALE_SCENARIOS:
        if not any(name in s.results for s in sizes):
            continue
        per: dict[str, Any] = {}
        for s in sizes:
            runs = s.results.get(name, [])
            ok = [r for r in runs if r.calls > 0]
            per[s.label] = {
                "calls_per_s": _median([r.calls_per_s for r in ok]),
                "p50_ms": _median([r.p50_ms for r in ok]),
                "p99_ms": _median([r.p99_ms for r in ok]),
                "rounds_calls_per_s": [r.calls_per_s for r in runs],
                "errors": sum(r.errors for r in runs),
                "error_sample": next((r.error_sample for r in runs if r.error_sample), ""),
                "server_peak_rss_mb": max((r.server_peak_rss_mb for r in runs), default=None),
                "server_cpu_pct": _median([r.server_cpu_pct for r in runs]),
                "db_cpu_pct": _median([r.db_cpu_pct for r in runs]),
                "load_average": s.load.get(name, []),
            }
        a, b = per[large.label]["calls_per_s"], per[small.label]["calls_per_s"]
        ratio = a / b if a is not None and b else None
        paired = [
            x / y
            for x, y in zip(
                per[large.label]["rounds_calls_per_s"],
                per[small.label]["rounds_calls_per_s"],
                strict=False,
            )
            if y
        ]
        target = None if name == CONTROL else SCALE_TARGET
        rows.append(
            {
                "scenario": name,
                "description": description,
                "sizes": per,
                "ratio": ratio,
                "round_ratios": paired,
                "target": target,
                "met": None if target is None or ratio is None else ratio >= target,
            }
        )
    return rows


def _groups(sizes: list[Size], sequential: bool, pgdata: Path) -> tuple[list[list[Size]], str]:
    """Sizes measured together: all at once, unless asked or the disk cannot hold a copy of
    every template besides the templates."""
    need = sum(s.storage["database_bytes"] for s in sizes) + DISK_MARGIN
    free = shutil.disk_usage(pgdata).free
    if sequential:
        return [[s] for s in sizes], "sequential (--sequential)"
    if free < need:
        return [[s] for s in sizes], (
            f"sequential: {free / 2**30:.1f} GiB free, interleaving needs {need / 2**30:.1f}"
        )
    return [sizes], "interleaved (all sizes up at once, each scenario on every size in turn)"


def _disk(path: Path) -> dict[str, float]:
    usage = shutil.disk_usage(path)
    return {"free_gib": round(usage.free / 2**30, 1), "total_gib": round(usage.total / 2**30, 1)}


def _folder_bytes(path: Path) -> int:
    total = 0
    for p in path.rglob("*"):
        with contextlib.suppress(OSError):
            if p.is_file():
                total += p.stat().st_size
    return total


def run_scale(args: argparse.Namespace) -> None:
    """`python -m tests.bench --scale`: see the module docstring."""
    started = time.monotonic()
    millions = sorted({float(x) for x in str(args.scale_sizes).split(",") if x.strip()})
    if len(millions) < 2:
        raise SystemExit("--scale-sizes needs at least two sizes, e.g. 1,5,10")
    quick = bool(args.quick)
    profile = Profile(
        graphs.QUICK,  # unused: each size has its own graph
        warmup=args.warmup if args.warmup is not None else (0.5 if quick else 1.5),
        duration=args.duration or (3.0 if quick else 4.0),
        concurrency=args.concurrency or 16,
        processes=args.processes or 2,
    )
    rounds = args.rounds or (2 if quick else 5)
    only = set(args.only.split(",")) if args.only else None
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    pgdata = out / "scale-pgdata"
    disk_start = _disk(out)
    load_start = [round(x, 2) for x in os.getloadavg()]
    print(
        f"bench-scale: sizes {', '.join(map(size_label, millions))} million edges; disk"
        f" {disk_start['free_gib']} GiB free of {disk_start['total_gib']}; load {load_start}",
        file=sys.stderr,
    )
    sizes = [Size(m, scale_params(m)) for m in millions]
    database = asyncio.run(open_database(None, pgdata))
    try:
        seeding = time.monotonic()
        asyncio.run(seed_sizes(database, sizes, out, args.reseed))
        seeding_s = time.monotonic() - seeding
        pg_version = asyncio.run(_server_version(database))
        groups, mode = _groups(sizes, args.sequential, pgdata)
        print(f"bench-scale: {mode}; {rounds} rounds", file=sys.stderr)
        peak_disk_use = 0
        statements: dict[str, dict[str, Any]] = {}
        profile_errors: list[str] = []
        for group in groups:
            try:
                for size in group:
                    start_size(database, size, profile, out)
                peak_disk_use = max(peak_disk_use, _folder_bytes(pgdata))
                run_rounds(group, profile, rounds, only)
                for size in group:
                    stop_size(size)
                print("bench-scale: statement profiles ...", file=sys.stderr)
                # The profiles replay server.store's statements with their own arguments:
                # when the store changes under them, say so and keep the measured rounds.
                try:
                    found = asyncio.run(profile_statements(group, PROFILE_SAMPLES, only))
                except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                    profile_errors.append(f"{type(exc).__name__}: {exc}"[:500])
                    print(f"bench-scale: statement profiles failed: {exc}", file=sys.stderr)
                    found = {}
                for name, by_size in found.items():
                    statements.setdefault(name, {}).update(by_size)
            finally:
                for size in group:
                    stop_size(size)
                    with contextlib.suppress(Exception):
                        asyncio.run(drop_copy(database, size))
        templates_bytes = _folder_bytes(pgdata)
    finally:
        database.close()
    doc = {
        "profile": "scale-quick" if quick else "scale",
        "config": asdict(profile)
        | {"rounds": rounds, "mode": mode, "sizes_millions": millions, "server_workers": 1},
        "machine": machine(pg_version)
        | {
            "load_average_at_start": load_start,  # machine() reads it now, at the end
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        },
        "git": git_revision(),
        "sizes": [
            {
                "label": s.label,
                "millions": s.millions,
                "params": asdict(s.params),
                "graph": s.meta,
                "storage": s.storage,
                "server_idle_rss_mb": s.server_idle_rss_mb,
                "server_peak_rss_mb": max(
                    (r.server_peak_rss_mb for rs in s.results.values() for r in rs), default=None
                ),
                "runs": {name: [asdict(r) for r in rs] for name, rs in s.results.items()},
            }
            for s in sizes
        ],
        "scenarios": summarise(sizes),
        "statements": statements,
        "statement_profile_errors": profile_errors,
        "disk": {
            "at_start": disk_start,
            "at_end": _disk(out),
            "pgdata_peak_gib": round(peak_disk_use / 2**30, 2),
            "pgdata_templates_gib": round(templates_bytes / 2**30, 2),
            "pgdata": str(pgdata),
        },
        "seeding_seconds": round(seeding_s, 1),
        "seconds": round(time.monotonic() - started, 1),
    }
    stem = "bench-scale-quick" if quick else "bench-scale"
    json_path = out / f"{stem}.json"
    json_path.write_text(json.dumps(doc, indent=2, default=_nan_safe) + "\n")
    png_path = out / f"{stem}.png"
    render_scale_chart(doc, png_path)
    print(render_scale_table(doc))
    print(f"\nwrote {json_path} and {png_path} in {doc['seconds']:.0f}s")


async def _server_version(database: Database) -> str:
    conn = await asyncpg.connect(database.url)
    try:
        version: str = await conn.fetchval("SHOW server_version")
        return version
    finally:
        await conn.close()
