"""Every SQL statement of server.store, EXPLAINed on a real Citus cluster.

The store's distribution rules (see server.store and the design notes) say each statement is
either about one owner, which Citus routes to one shard, or names its owners so that Citus
prunes it to their shards; none is pulled through the coordinator. Only a real cluster can
say whether that holds, so this finds every statement (by introspection of server.store, so
one added later is checked too), EXPLAINs it with representative parameters in a freshly
migrated Citus database, and fails on a plan that pulls rows to the coordinator, runs as an
INSERT ... SELECT, a repartition or a Citus MERGE, plans a subquery or CTE separately
(a "Distributed Subplan", results sent through the coordinator), or runs more tasks than its
owners have shards; a single-owner statement must be one task.

The plan test runs in Citus mode (`make test-citus`); `pytest -rP` shows its table. The
coverage check (every statement has a parameter sample, no sample is stale) needs no
database and runs everywhere.
"""

from __future__ import annotations

import ast
import inspect
import re
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime

import asyncpg
import pytest

from server import store
from server.database import Database
from server.migrations import migrate
from tests.conftest import CitusDatabase

SQL_KEYWORDS = ("SELECT", "INSERT", "UPDATE", "DELETE", "WITH")
# Plans that send rows through the coordinator or shuffle them between workers.
FORBIDDEN = (
    "pull to coordinator",
    "INSERT ... SELECT",
    "repartition",
    "Citus MERGE",
    "Distributed Subplan",
)
# Statements the store sends only to one PostgreSQL, never to Citus (it asks which it is on):
# EXPLAINed and shown here for the record, not judged.
SINGLE_NODE_ONLY: frozenset[str] = frozenset(getattr(store, "SINGLE_NODE_ONLY", ()))
DEFAULT_SHARDS = 32  # citus.shard_count's default
ROW_COUNTS = (1, 5)  # the multi-row VALUES statements are checked at these sizes
EXECUTIONS = 6  # PostgreSQL may switch a prepared statement to a generic plan at the sixth

# Representative parameters. ALICE acts; FIVE are the users she acts on (spread over several
# shards: asserted below, or the pruning checks would prove little).
ALICE = "alice"
FIVE = ["bob", "carol", "dave", "erin", "frank"]
AT = datetime(2025, 3, 4, 5, 6, 7, 890123, tzinfo=UTC)
NO_TABLE = None  # owners of a statement that reads no distributed table (coordinator alone)
REFERENCE: tuple[str, ...] = ()  # owners of a statement on reference tables only


@dataclass(frozen=True, slots=True)
class Sample:
    """Parameters to EXPLAIN a statement with, and the users whose rows it touches (the
    distribution column values): () for reference tables only, None for no table at all."""

    params: tuple[object, ...]
    owners: tuple[str, ...] | None


def _one(*params: object) -> Sample:
    """A statement about ALICE's rows alone (she is its first parameter)."""
    return Sample(params, (ALICE,))


def _theirs(*params: object) -> Sample:
    """A statement about FIVE's rows (named by the list among its parameters)."""
    return Sample(params, tuple(FIVE))


def _rows_sample(builder: str, n: int) -> Sample:
    """Parameters for the multi-row VALUES statements, n rows (server.store._values)."""
    users = FIVE[:n]
    if builder == "_insert_following":  # ALICE follows each: her rows
        rows: list[object] = [v for i, u in enumerate(users) for v in (u, AT if i % 2 else None)]
        return Sample((ALICE, AT, *rows), (ALICE,))
    if builder == "_insert_followers":  # each gains ALICE as a follower: their rows
        return Sample((ALICE, AT, *users), tuple(users))
    if builder == "_add_deltas":  # one delta row each (ALICE's delta shard 3): their rows
        return Sample((3, 1, *(v for i, u in enumerate(users) for v in (u, i % 2))), tuple(users))
    if builder == "_insert_counters":
        return Sample(tuple(users), tuple(users))
    if builder == "_upsert_accounts":
        return Sample(tuple(v for u in users for v in (u, f"nick {u}", None)), tuple(users))
    raise KeyError(builder)


ROW_BUILDERS = (
    "_insert_following",
    "_insert_followers",
    "_add_deltas",
    "_insert_counters",
    "_upsert_accounts",
)

SAMPLES: dict[str, Sample] = {
    "_LOCK_OWNER": _one(ALICE),
    "_SHARE_LOCK": _one(ALICE),
    "_SHARE_LOCKS": Sample(([ALICE],), (ALICE,)),  # the users of one shard
    # Advisory locks, no table: on Citus it stays on the coordinator.
    "_GATE": Sample(([ALICE, *FIVE], ALICE, False), NO_TABLE),
    "_GATE_SHARDS": Sample(([ALICE, *FIVE], ALICE, False), NO_TABLE),
    "_SHARDS_OF": Sample((FIVE,), NO_TABLE),
    "_OWN_EDGES_AMONG": _one(ALICE, FIVE),
    "_OWN_FOLLOWS_AMONG": _one(ALICE, FIVE),  # with a reference table (account_tombstones)
    "_UNFOLLOW_OWN": _one(ALICE, FIVE, -5, -2),
    "_UNFOLLOW_THEIRS": Sample((["bob"], ALICE), ("bob",)),  # the users of one shard
    "_SET_THEIR_MUTUALS": Sample((["bob"], ALICE, AT), ("bob",)),  # the users of one shard
    # Single-node only (store.SINGLE_NODE_ONLY): EXPLAINed and shown, not judged.
    "_WRITE_FOLLOWS": Sample((ALICE, FIVE, AT, FIVE[:2], 3, "::1", "gRPC"), (ALICE, *FIVE)),
    "_WRITE_UNFOLLOWS": Sample((ALICE, FIVE, FIVE[:2], 3, AT, "::1", "gRPC"), (ALICE, *FIVE)),
    # The change event: one row on the acting user's shard.
    "_WRITE_EVENT": _one(ALICE, 1, FIVE, FIVE[:2], AT, "127.0.0.1", "RESTAPI"),
    "_WRITE_DELETION_EVENT": _one(ALICE, "127.0.0.1", "RESTAPI"),
    "_DELETE_FOLLOWING": _one(ALICE, FIVE),
    "_DELETE_THEIR_FOLLOWERS": _theirs(ALICE, FIVE),
    "_ADD_DELTA": _one(ALICE, 3, 1, 0),
    "_ADD_OWN_COUNTS": _one(ALICE, 2, 1),
    "_CHECK": _one(ALICE, FIVE),
    "_COUNTS": _theirs(FIVE),
    "_COUNT_ROWS": _theirs(FIVE),
    "_PROFILES": _theirs(FIVE),
    "_PAGES[FAN].first": _one(ALICE, 20),
    "_PAGES[FAN].next": _one(ALICE, 20, AT, "bob"),
    "_PAGES[FOLLOWING].first": _one(ALICE, 20),
    "_PAGES[FOLLOWING].next": _one(ALICE, 20, AT, "bob"),
    "_PAGES[MUTUAL].first": _one(ALICE, 20),
    "_PAGES[MUTUAL].next": _one(ALICE, 20, AT, "bob"),
    "_LOCK_FOR_DELETE": _one(ALICE),
    "_TOMBSTONE": Sample((ALICE,), REFERENCE),
    "_TOMBSTONED_AMONG": Sample((FIVE,), REFERENCE),
    "_PENDING_DELETIONS": Sample((100,), REFERENCE),
    "_LOCK_TOMBSTONE": Sample((ALICE,), REFERENCE),
    "_END_DELETION": Sample((ALICE,), REFERENCE),
    "_DELETE_OWN[follow_count_deltas]": _one(ALICE),
    "_DELETE_OWN[follow_counts]": _one(ALICE),
    "_DELETE_OWN[accounts]": _one(ALICE),
    "_FANS_BATCH": _one(ALICE, "bob", 500),
    "_FOLLOWEES_BATCH": _one(ALICE, "bob", 500),
    "_TRY_GATE": Sample(([ALICE, *FIVE], True), NO_TABLE),
    "_TRY_LOCK_FAN": _one(ALICE),
    "_TRY_LOCK_FANS": _theirs(FIVE),  # single-node only
    "_TRY_SHARE_LOCKS": _theirs(FIVE),  # single-node only
    "_TRY_SHARE_LOCK": _one(ALICE),
    "_EXISTING_AMONG": _theirs(FIVE),
    "_FOLLOWED_BY": _one(ALICE, FIVE),
    "_UNCOUNT_FOLLOWING": _theirs(FIVE),
    "_UNCOUNT_MUTUAL": _theirs(FIVE),
    "_DELETE_THEIR_FOLLOWING": _theirs(ALICE, FIVE),
    "_DELETE_OWN_FOLLOWERS": _one(ALICE, FIVE),
    # Written inline in the Store's methods (named by method and order of appearance).
    "Store.cursor_key[0]": Sample((b"\x01" * 32,), REFERENCE),
    "Store.cursor_key[1]": Sample((), REFERENCE),
    "Store.ping[0]": Sample((), NO_TABLE),
    "Store.existing_accounts[0]": _theirs(FIVE),
    **{f"{builder}({n})": _rows_sample(builder, n) for builder in ROW_BUILDERS for n in ROW_COUNTS},
}


def _is_sql(text: str) -> bool:
    words = text.split(None, 1)
    return bool(words) and words[0] in SQL_KEYWORDS  # the store writes SQL in capitals


def _inline_sql() -> dict[str, str]:
    """SQL string literals inside functions of server.store (not module constants), named
    `Qualname[i]`: the i-th such literal of that function. Docstrings and f-string pieces
    are not statements."""
    found: dict[str, str] = {}

    def walk(node: ast.AST, scope: list[str]) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                walk(child, [*scope, child.name])
            elif isinstance(child, ast.JoinedStr) or (
                isinstance(child, ast.Expr) and isinstance(child.value, ast.Constant)
            ):
                continue
            elif isinstance(child, ast.Constant) and isinstance(child.value, str):
                if scope and _is_sql(child.value):
                    qualname = ".".join(scope)
                    index = sum(1 for name in found if name.startswith(f"{qualname}["))
                    found[f"{qualname}[{index}]"] = child.value
            else:
                walk(child, scope)

    walk(ast.parse(inspect.getsource(store)), [])
    return found


def store_statements() -> dict[str, str]:
    """Every statement server.store sends, by name: its SQL module constants, the texts of
    _PAGES and _DELETE_OWN, the multi-row VALUES statements at ROW_COUNTS rows, and SQL
    literals written inside its functions (the builders' pieces excepted)."""
    found = {
        name: value
        for name, value in vars(store).items()
        if isinstance(value, str) and _is_sql(value)
    }
    for list_type, texts in store._PAGES.items():
        for which, text in zip(("first", "next"), texts, strict=True):
            found[f"_PAGES[{list_type.name}].{which}"] = text
    for text in store._DELETE_OWN:
        found[f"_DELETE_OWN[{text.split()[2]}]"] = text
    builders: dict[str, Callable[[int], str]] = {
        name: getattr(store, name) for name in ROW_BUILDERS
    }
    for name, build in builders.items():
        for n in ROW_COUNTS:
            found[f"{name}({n})"] = build(n)
    constants = set(found.values())
    built = [found[f"{name}({n})"] for name in ROW_BUILDERS for n in ROW_COUNTS]
    for name, text in _inline_sql().items():
        if text not in constants and not any(text in statement for statement in built):
            found[name] = text
    return found


def test_every_store_statement_has_a_parameter_sample() -> None:
    """A statement added to server.store without a sample here fails (so it is never left
    unchecked), and so does a sample whose statement is gone."""
    statements = store_statements()
    assert sorted(set(statements) - set(SAMPLES)) == [], "statements without a sample"
    assert sorted(set(SAMPLES) - set(statements)) == [], "samples of no statement"
    assert sorted(SINGLE_NODE_ONLY - set(statements)) == [], "SINGLE_NODE_ONLY of no statement"
    for name, text in statements.items():
        params = SAMPLES[name].params
        used = {int(n) for n in re.findall(r"\$(\d+)", text)}
        assert used == set(range(1, len(params) + 1)), f"{name}: ${sorted(used)} vs {params}"


# -- the plans -------------------------------------------------------------------------------


def _literal(value: object) -> str:
    """A parameter as an SQL literal for EXECUTE (the statement's types come from PREPARE)."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    if isinstance(value, bytes):
        return f"'\\x{value.hex()}'::bytea"
    if isinstance(value, datetime):
        return f"'{value.isoformat()}'::timestamptz"
    if isinstance(value, list):
        kind = "bool" if value and all(isinstance(v, bool) for v in value) else "text"
        return "ARRAY[" + ", ".join(_literal(v) for v in value) + f"]::{kind}[]"
    raise TypeError(f"no literal for {value!r}")


def _named_users(params: Sequence[object]) -> set[str]:
    users: set[str] = set()
    for p in params:
        if isinstance(p, str):
            users.add(p)
        elif isinstance(p, list):
            users.update(v for v in p if isinstance(v, str))
    return users


@dataclass(frozen=True, slots=True)
class Verdict:
    """One statement's plan, classified."""

    name: str
    plan_type: str
    tasks: int
    shards: int  # distinct shards of its owners (0: reference tables or no table)
    problems: tuple[str, ...]
    judged: bool = True  # False: single-node only, its problems are for the record


async def _explain(conn: asyncpg.Connection, sql: str, params: Sequence[object]) -> list[str]:
    """EXPLAIN the prepared statement's plans over EXECUTIONS executions (the custom plans,
    then the generic one PostgreSQL may settle on for a long-lived pooled connection); the
    plan texts."""
    args = f"({', '.join(_literal(p) for p in params)})" if params else ""
    await conn.execute(f"PREPARE plan_me AS {sql}")
    try:
        return [
            "\n".join(
                r[0] for r in await conn.fetch(f"EXPLAIN (FORMAT TEXT) EXECUTE plan_me{args}")
            )
            for _ in range(EXECUTIONS)
        ]
    finally:
        await conn.execute("DEALLOCATE plan_me")


def _judge(name: str, sample: Sample, plans: list[str], debug: list[str], shards: int) -> Verdict:
    problems: list[str] = []
    task_counts = [sum(int(n) for n in re.findall(r"Task Count: (\d+)", p)) for p in plans]
    tasks = max(task_counts)
    for plan in plans:
        problems += [f"plan shows {bad!r}" for bad in FORBIDDEN if bad.lower() in plan.lower()]
    citus = ["Custom Scan (Citus" in p for p in plans]
    if sample.owners is NO_TABLE:
        if any(citus):
            problems.append("reads no table, yet Citus plans it")
        plan_type = "coordinator only (no dist. table)"
    else:
        if not all(citus):
            problems.append("not planned by Citus (a local table?)")
        limit = 1 if not sample.owners else shards
        if tasks > limit:
            problems.append(f"{tasks} tasks, more than its owners' {limit} shard(s)")
        if tasks < 1:
            problems.append("no task")
        if len(set(task_counts)) > 1:
            problems.append(f"task counts change between executions: {task_counts}")
        fast = any("fast-path router" in m for m in debug)
        on = "reference table" if not sample.owners else "router"
        if tasks == 1:
            plan_type = f"fast-path {on}" if fast else on
        else:
            plan_type = f"pruned multi-shard, {tasks} tasks"
    return Verdict(name, plan_type, tasks, shards, tuple(dict.fromkeys(problems)))


@pytest.fixture
async def citus_conn(pg_cluster: Database) -> AsyncIterator[asyncpg.Connection]:
    """A connection to a brand-new Citus database on the session's cluster, migrated by
    the service's own migrations (which distribute the tables)."""
    assert isinstance(pg_cluster, CitusDatabase)
    assert pg_cluster.cluster is not None
    cluster = pg_cluster.cluster
    name = f"plans_{uuid.uuid4().hex[:12]}"
    url = cluster.create_database(name)
    try:
        conn = await asyncpg.connect(url)
        try:
            # Citus' default shard count (the test cluster's is smaller, see tests/conftest.py):
            # the pruning checks mean more when owners rarely share a shard.
            await conn.execute(f"SET citus.shard_count = {DEFAULT_SHARDS}")
            await migrate(conn)
            await conn.execute("RESET citus.shard_count")
            yield conn
        finally:
            await conn.close()
    finally:
        cluster.drop_database(name)


@pytest.mark.citus  # skipped outside make test-citus (tests/conftest.py)
async def test_every_store_statement_is_routed_or_pruned(citus_conn: asyncpg.Connection) -> None:
    """Each statement's plan: one task for a single owner (or a reference table), at most
    one task per owner shard otherwise, and never rows through the coordinator."""
    conn = citus_conn
    users = sorted({ALICE, *FIVE})
    shard_of = {
        u: await conn.fetchval(
            "SELECT get_shard_id_for_distribution_column('follow_counts', $1::text)", u
        )
        for u in users
    }
    assert len({shard_of[u] for u in FIVE}) >= 3, f"FIVE share shards: {shard_of}"
    shard_count = await conn.fetchval(
        "SELECT count(*) FROM pg_dist_shard WHERE logicalrelid = 'follow_counts'::regclass"
    )
    assert shard_count == DEFAULT_SHARDS

    debug: list[str] = []
    conn.add_log_listener(lambda _conn, message: debug.append(str(message.message)))
    await conn.execute("SET client_min_messages = debug2")  # Citus says how it planned
    verdicts: list[Verdict] = []
    for name, sql in store_statements().items():
        sample = SAMPLES[name]
        owners = sample.owners or ()
        assert set(owners) <= _named_users(sample.params), f"{name}: owners not in params"
        debug.clear()
        try:
            plans = await _explain(conn, sql, sample.params)
        except asyncpg.PostgresError as e:
            # A single-node-only statement may be one Citus refuses (FOR UPDATE of rows of
            # several shards): shown, not judged, like its plan would be.
            refusal = (f"{type(e).__name__}: {e}",)
            judged = name not in SINGLE_NODE_ONLY
            verdicts.append(Verdict(name, "refused", 0, 0, refusal, judged=judged))
            continue
        shards = len({shard_of[u] for u in owners})
        verdict = _judge(name, sample, plans, list(debug), shards)
        if name in SINGLE_NODE_ONLY:
            verdict = replace(
                verdict, plan_type="single-node only (not sent to Citus)", judged=False
            )
        verdicts.append(verdict)
    await conn.execute("RESET client_min_messages")

    print(f"\n{shard_count} shards per table; the sample users' shards: {shard_of}")
    width = max(len(v.name) for v in verdicts)
    print(f"{'statement':<{width}}  {'plan':<48} tasks  owner shards")
    for v in verdicts:
        print(f"{v.name:<{width}}  {v.plan_type:<48} {v.tasks:>5}  {v.shards:>12}")
        for problem in v.problems:
            print(f"{'':<{width}}  {'!!' if v.judged else '(on Citus)'} {problem}")

    # The judge itself: statements the rules forbid must be caught, or a pass means little.
    controls: dict[str, tuple[str, Sample]] = {
        "INSERT ... SELECT over unnest": (
            "INSERT INTO follow_counts (user_id) SELECT unnest($1::text[])",
            _theirs(FIVE),
        ),
        "writing CTE": (
            "WITH gone AS (DELETE FROM following WHERE user_id = $1 RETURNING target_id)"
            " UPDATE follow_counts SET followers = followers - 1"
            " WHERE user_id IN (SELECT target_id FROM gone)",
            _one(ALICE),
        ),
        "every shard for one owner": (
            "SELECT user_id FROM follow_counts WHERE user_id <> $1",
            _one(ALICE),
        ),
    }
    for label, (sql, sample) in controls.items():
        debug.clear()
        try:
            plans = await _explain(conn, sql, sample.params)
        except asyncpg.PostgresError:
            continue  # refused outright: also caught
        control = _judge(label, sample, plans, list(debug), 1)
        assert control.problems, f"the judge let a forbidden plan through: {label}: {plans[0]}"
    failed = {v.name: v.problems for v in verdicts if v.problems and v.judged}
    assert not failed, f"statements Citus does not route or prune: {failed}"
