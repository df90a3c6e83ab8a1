"""The importer's in-memory initial load (server.importer.inmemory): into an empty database,
plain files give the same accounts, edges (both copies), mutual state and counts as the
staged path, with the tables swapped in; whatever the staged path would have to decide or
report (bad rows, files outside the fast shape, a database not empty, a service write
before the swap) goes the staged way from the same text, with the same result and the same
bad rows; nothing of the load outlives it."""

from __future__ import annotations

import io
import itertools
import logging
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import server.importer.inmemory as inmemory
from server.database import Database
from server.importer import ImportAbortedError, ImportOptions, ImportReport, import_graph
from server.importer.swap import Index
from tests.conftest import scratch_database, skip_on_citus
from tests.test_importer import T0, assert_counts_equal_lists, fetch_rows, snapshot

pytestmark = skip_on_citus("the in-memory load runs on one PostgreSQL (Citus stages)")

_counter = itertools.count()
_LEFT_TABLES = "SELECT tablename::text FROM pg_tables WHERE tablename LIKE 'import%'"


@pytest.fixture
def any_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """The in-memory load for a handful of edges too (normally from MIN_EDGES on)."""
    monkeypatch.setattr(inmemory, "MIN_EDGES", 1)


@pytest.fixture
async def other_url(pg_cluster: Database) -> AsyncIterator[str]:
    """A second fresh database, for the staged path's result beside the in-memory one."""
    async with scratch_database(pg_cluster, f"test_inmemory_{next(_counter)}") as url:
        yield url


def _text(lines: list[str]) -> str:
    return "".join(f"{line}\n" for line in lines)


async def _import(
    db_url: str, accounts: str, edges: str, *, in_memory: bool, **options: object
) -> ImportReport:
    """Import the texts; with `in_memory`, with their sizes (the in-memory load is tried),
    else without (a stream of unknown size: the staged path)."""
    sizes = (len(accounts), len(edges)) if in_memory else (None, None)
    return await import_graph(
        db_url,
        io.StringIO(accounts),
        io.StringIO(edges),
        ImportOptions(progress=False, **options),  # type: ignore[arg-type]
        accounts_size=sizes[0],
        edges_size=sizes[1],
    )


def _now_as_now(rows: dict[str, list[tuple[object, ...]]]) -> dict[str, list[tuple[object, ...]]]:
    """The rows with each time of an edge given without one (the import's time, from T0's
    year on it is not) as "now": two imports of such rows differ by when they ran."""
    since = datetime(2025, 1, 1, tzinfo=UTC)
    return {
        table: [tuple("now" if isinstance(v, datetime) and v > since else v for v in r) for r in rs]
        for table, rs in rows.items()
    }


def _graph(users: int = 300, edges: int = 3000) -> tuple[list[str], list[str]]:
    """Accounts (some given twice, the later row with another nick; some without nick or
    face) and edges among them, a third with their reverse, times with and without
    fractions (one with more digits than microseconds)."""
    ids = [f"u{n:04d}" for n in range(users)]
    accounts = ["user_id,nick,face_url"]
    accounts += [
        f"{u},nick {n},https://img.example.com/{n}.png" if n % 5 else f"{u},,"
        for n, u in enumerate(ids)
    ]
    accounts += [f"{u},renamed {n}," for n, u in enumerate(ids[:20])]
    rows = ["follower_id,target_id,followed_at"]
    seen: set[tuple[str, str]] = set()
    fractions = ("", ".5", ".123456", ".123456789")
    for n in range(edges):
        a, b = ids[(n * 7919) % users], ids[(n * 104729 + 3) % users]
        for x, y, t in ((a, b, T0 + n), (b, a, T0 + n + 7)):
            if x != y and (x, y) not in seen and (t == T0 + n or n % 3 == 0):
                seen.add((x, y))
                rows.append(f"{x},{y},{t}{fractions[n % 4]}")
    return accounts, rows


async def test_an_initial_load_in_memory_equals_the_staged_one(
    any_size: None, db_url: str, other_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Same accounts (the later row of an id winning, NULL nick and face), same edges with
    their times truncated to microseconds, mutual state, both copies and counts, in memory
    as staged; the in-memory one swapped its tables in, left no table of its own and logged
    its steps as it went."""
    accounts, edges = (_text(lines) for lines in _graph())
    with caplog.at_level(logging.INFO, logger="server.importer.inmemory"):
        report = await _import(db_url, accounts, edges, in_memory=True)
    steps = [r.getMessage() for r in caplog.records if r.name == "server.importer.inmemory"]
    assert len(steps) == 2
    assert steps[0].startswith(f"in-memory load: 300 accounts and {report.edges_read} edges")
    assert steps[1].startswith("in-memory load: tables and indexes built")
    staged = await _import(other_url, accounts, edges, in_memory=False)
    assert report.in_memory == "taken"
    assert staged.in_memory.startswith("not tried")
    assert report.swapped
    assert (report.accounts_read, report.edges_read) == (staged.accounts_read, staged.edges_read)
    assert (report.accounts_written, report.edges_added) == (
        staged.accounts_written,
        staged.edges_added,
    )
    ours, theirs = await snapshot(db_url), await snapshot(other_url)
    assert ours == theirs
    assert any(r[1] is None for r in ours["accounts"])
    assert ("u0000", "renamed 0", None, 0) in ours["accounts"]
    assert any(r[3] is not None for r in ours["following"])  # some mutual
    await assert_counts_equal_lists(db_url)
    assert await fetch_rows(db_url, _LEFT_TABLES) == []


async def test_the_swapped_tables_keep_their_indexes_constraints_and_the_view(
    any_size: None, db_url: str, other_url: str
) -> None:
    """The new accounts, following and followers tables carry the live ones' index and
    primary-key names (what later migrations and the checker name), and follow_totals (a
    view over follow_counts, which is written in place, not swapped) still answers."""
    shape = """
    SELECT c.relname::text, i.indexrelid::regclass::text, con.conname::text
    FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid
    LEFT JOIN pg_constraint con ON con.conindid = i.indexrelid
    WHERE c.relname IN ('accounts', 'following', 'followers', 'follow_counts')
    ORDER BY 1, 2
    """
    before = await fetch_rows(db_url, shape)
    accounts, edges = (_text(lines) for lines in _graph(50, 200))
    assert (await _import(db_url, accounts, edges, in_memory=True)).in_memory == "taken"
    assert await fetch_rows(db_url, shape) == before
    totals = await fetch_rows(db_url, "SELECT count(*) FROM follow_totals")
    assert totals == [(50,)]


async def test_edges_without_times_follow_at_the_import(any_size: None, db_url: str) -> None:
    """A file of two fields per edge: every edge followed at the import's time, as staged."""
    began = time.time()
    accounts = _text(["user_id", "a", "b", "c"])
    edges = _text(["follower_id,target_id", "a,b", "b,a", "c,a"])
    report = await _import(db_url, accounts, edges, in_memory=True)
    assert report.in_memory == "taken"
    rows = (await snapshot(db_url))["following"]
    assert [r[:2] for r in rows] == [("a", "b"), ("b", "a"), ("c", "a")]
    times = {r[2] for r in rows}
    assert len(times) == 1
    (when,) = times
    assert isinstance(when, datetime)
    assert began - 1 <= when.timestamp() <= time.time() + 1
    assert rows[0][3] == when
    assert rows[2][3] is None


@pytest.mark.parametrize(
    ("accounts", "edges", "why"),
    [
        (["a,Alice", "b", "c"], [f"a,b,{T0}", f"b,a,{T0}"], "taken"),  # no header lines
        (["user_id", "a", "b,Bob"], [f"a,b,{T0}"], "not taken: not the fast shape"),
        (["user_id", '"a"', "b"], ["a,b"], "not taken: not plain lines"),
        (["user_id", "a", "b"], ["follower_id,target_id", "a,b\r"], "not taken: not plain lines"),
        (["user_id", "a", "", "b"], ["a,b"], "not taken: not plain lines"),
        (["user_id,nick", "a,Zoë", "b"], ["a,b"], "not taken: too many fields, or not ASCII"),
        (["user_id", "a", "b"], [f"a,b,{T0}", "b,a,2023-11-14T22:13:20Z"], "not taken: a time"),
        (["user_id", "a", "b"], ["a,b", f"b,a,{T0}"], "not taken: not the fast shape"),
        (["user_id", "a", "b"], [f"a,b,{T0}", "b,a"], "not taken: a time outside"),
        (["user_id", "a b", "b"], ["b,a b"], "not taken: an account id outside"),
    ],
)
async def test_files_outside_the_fast_shape_go_the_staged_way_alike(
    any_size: None, db_url: str, other_url: str, accounts: list[str], edges: list[str], why: str
) -> None:
    """Quotes, carriage returns, blank lines, non-ASCII text, ISO times, a row with more
    fields than the first, an id the fast shape does not take: the staged path imports the
    same text (with the same result as without the in-memory try); files without header
    lines are taken in memory too."""
    a, e = _text(accounts), _text(edges)
    report = await _import(db_url, a, e, in_memory=True)
    await _import(other_url, a, e, in_memory=False)
    assert report.in_memory.startswith(why)
    assert _now_as_now(await snapshot(db_url)) == _now_as_now(await snapshot(other_url))
    assert await fetch_rows(db_url, _LEFT_TABLES) == []


@pytest.mark.parametrize(
    ("edges", "why", "options"),
    [
        (["a,b", "a,x"], "an edge names an unknown account", {}),
        (["a,b", "b,b"], "a self-follow", {}),
        (["a,b", "b,a", "a,b"], "a repeated edge", {}),
        (["a,b", "a,c", "b,a"], "a follower over the cap", {"max_following": 1}),
    ],
)
async def test_bad_rows_are_found_and_reported_by_the_staged_path(
    any_size: None,
    db_url: str,
    other_url: str,
    edges: list[str],
    why: str,
    options: dict[str, object],
) -> None:
    """An unknown account, a self-follow, a repeated edge, a follower over the cap: the
    import goes the staged way and aborts with the same bad rows, by line, as without the
    in-memory try, having imported nothing; with --skip-bad-rows both import the rest
    alike."""
    accounts, text = _text(["user_id", "a", "b", "c"]), _text(["follower_id,target_id", *edges])
    with pytest.raises(ImportAbortedError) as ours:
        await _import(db_url, accounts, text, in_memory=True, **options)
    with pytest.raises(ImportAbortedError) as theirs:
        await _import(other_url, accounts, text, in_memory=False, **options)
    assert ours.value.report.in_memory == f"not taken: {why}"
    assert ours.value.report.bad_rows == theirs.value.report.bad_rows != []
    assert (await snapshot(db_url))["accounts"] == []
    skipping = {**options, "skip_bad_rows": True}
    await _import(db_url, accounts, text, in_memory=True, **skipping)
    await _import(other_url, accounts, text, in_memory=False, **skipping)
    assert _now_as_now(await snapshot(db_url)) == _now_as_now(await snapshot(other_url))


async def test_a_database_not_empty_goes_the_staged_way(any_size: None, db_url: str) -> None:
    """Accounts already there: the in-memory load does not apply (it would have to merge)."""
    await _import(
        db_url, _text(["user_id", "a"]), _text(["follower_id,target_id"]), in_memory=False
    )
    accounts, edges = _text(["user_id", "b", "c"]), _text(["b,c", "c,a"])
    report = await _import(db_url, accounts, edges, in_memory=True)
    assert report.in_memory == "not taken: the database is not empty"
    assert report.edges_added == 2
    await assert_counts_equal_lists(db_url)


async def test_a_service_write_before_the_swap_sends_the_load_the_staged_way(
    any_size: None, db_url: str, other_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A service call that creates an account (one of the import's) while the new tables
    are built: the swap finds the live tables not empty, drops what it built, and the
    staged path imports the same text around that account: same graph as an import after
    it, exact counts, nothing left behind."""
    build = inmemory._build

    async def build_then_create_a(
        conn: asyncpg.Connection[asyncpg.Record],
        second: asyncpg.Connection[asyncpg.Record],
        rows: inmemory.Rows,
    ) -> dict[str, list[Index]]:
        built = await build(conn, second, rows)
        service = await asyncpg.connect(db_url)
        try:
            await service.execute("INSERT INTO accounts (user_id) VALUES ('a')")
            await service.execute("INSERT INTO follow_counts (user_id) VALUES ('a')")
        finally:
            await service.close()
        return built

    monkeypatch.setattr(inmemory, "_build", build_then_create_a)
    accounts, edges = (
        _text(lines)
        for lines in (["user_id", "a", "b", "c"], [f"a,b,{T0}", f"b,a,{T0 + 1}", f"c,a,{T0 + 2}"])
    )
    report = await _import(db_url, accounts, edges, in_memory=True)
    assert report.in_memory == "not taken: the service wrote meanwhile"
    await _import(
        other_url, _text(["user_id", "a"]), _text(["follower_id,target_id"]), in_memory=False
    )
    await _import(other_url, accounts, edges, in_memory=False)
    ours, theirs = await snapshot(db_url), await snapshot(other_url)
    assert ours["following"] == theirs["following"]
    assert ours["follow_counts"] == theirs["follow_counts"]
    await assert_counts_equal_lists(db_url)
    assert await fetch_rows(db_url, _LEFT_TABLES) == []


async def test_what_a_killed_load_left_is_dropped_by_the_next(any_size: None, db_url: str) -> None:
    """New tables a killed load left behind are dropped before the next one builds its own."""
    conn = await asyncpg.connect(db_url)
    try:
        for name in ("import_swap_accounts", "import_swap_following"):
            await conn.execute(f"CREATE TABLE {name} (junk int)")
    finally:
        await conn.close()
    report = await _import(db_url, _text(["user_id", "a", "b"]), _text(["a,b"]), in_memory=True)
    assert report.in_memory == "taken"
    assert await fetch_rows(db_url, _LEFT_TABLES) == []


async def test_files_of_unknown_or_too_large_size_are_not_read_into_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stream of unknown size (a pipe) or files over MEMORY_SHARE of the memory: nothing
    is read, the staged path streams them."""
    accounts, edges = io.StringIO("user_id\na\n"), io.StringIO("a,a\n")
    assert inmemory.read_texts(accounts, edges, None, None) is None
    monkeypatch.setattr(inmemory, "machine_memory", lambda: 100)
    assert inmemory.read_texts(accounts, edges, 10, 10) is None
    assert accounts.tell() == 0
    assert edges.tell() == 0
    monkeypatch.setattr(inmemory, "machine_memory", lambda: 10**9)
    texts = inmemory.read_texts(accounts, edges, 10, 10)
    assert texts == inmemory.Texts("user_id\na\n", "a,a\n")


_pairs = st.lists(
    st.tuples(st.integers(0, 11), st.integers(0, 11), st.integers(0, 10**6 - 1)), max_size=60
)


@settings(max_examples=60, deadline=None)
@given(_pairs)
def test_work_out_matches_the_definitions(pairs: list[tuple[int, int, int]]) -> None:
    """For any graph (first row of each pair kept, self-follows left out): the following
    rows in key order, the followers order, mutual state (the later of the two times) and
    each account's counts are those of their definitions, computed by plain Python."""
    edges: dict[tuple[str, str], int] = {}
    for a, b, t in pairs:
        if a != b:
            edges.setdefault((f"u{a:02d}", f"u{b:02d}"), t)
    if not edges:
        return
    ids = [f"u{n:02d}" for n in range(12)]
    texts = inmemory.Texts(
        _text(ids), _text([f"{a},{b},{T0}.{t:06d}" for (a, b), t in edges.items()])
    )
    graph = inmemory.work_out(texts, ImportOptions(), 0)
    name = graph.ids.to_list()
    assert name == ids
    rows = [(name[f], name[t]) for f, t in zip(graph.follower, graph.target, strict=True)]
    assert rows == sorted(edges)
    micros = {e: (T0 * 10**6 + t) for e, t in edges.items()}
    assert graph.at.tolist() == [micros[e] for e in rows]
    for i, (a, b) in enumerate(rows):
        back = micros.get((b, a))
        assert bool(graph.mutual[i]) == (back is not None)
        if back is not None:
            assert graph.mutual_since[i] == max(micros[(a, b)], back)
    fans = [(rows[i][1], rows[i][0]) for i in graph.by_target]
    assert fans == sorted(fans)
    for n, user in enumerate(ids):
        assert graph.following[n] == sum(a == user for a, _ in rows)
        assert graph.followers[n] == sum(b == user for _, b in rows)
        assert graph.mutuals[n] == sum(a == user and (b, a) in micros for a, b in rows)
    assert graph.mutual.dtype == np.bool_
