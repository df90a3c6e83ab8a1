"""The merge's batches (server.importer.merge): their sizing and rests, the batch log
(server.importer.batchlog), and the maintenance-window merge (server.importer.exclusive),
which must leave the same graph as the live batches."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest

from server.importer import bulk, import_graph, staging
from server.importer.merge import MIN_BATCH_EDGES, _end_failed_transaction, next_batch_edges
from server.importer.options import ImportOptions
from server.importer.pair import MAX_PAUSE, pause_after
from tests.conftest import CITUS
from tests.test_importer import T0, assert_counts_equal_lists, at, csv_text, run, snapshot

# An existing graph and a file on top of it: an edge already present (a,b), one that makes
# an old edge mutual (b,a), a new pair made mutual within the file (c,d / d,c), and edges to
# and from users the file touches for the first time.
BASE_ACCOUNTS = ["a", "b", "c", "d", "e"]
BASE_EDGES = [f"a,b,{T0}", f"c,a,{T0 + 1}", f"e,a,{T0 + 2}"]
ON_TOP = [
    f"a,b,{T0 + 50}",
    f"b,a,{T0 + 20}",
    f"c,d,{T0 + 5}",
    f"d,c,{T0 + 7}",
    f"a,c,{T0 + 3}",
    f"e,d,{T0 + 4}",
]


def test_a_slowed_batch_shrinks_below_a_chunk_and_grows_back_gradually() -> None:
    """The next batch gets what the last one's rate writes in the budget, never less than
    MIN_BATCH_EDGES (far less than a plan chunk, so a starved CPU still finds a batch that
    fits its time limit), never more than twice the last size."""
    assert next_batch_edges(500, 500, 1.0, 0.1) == MIN_BATCH_EDGES
    assert next_batch_edges(100, 100, 0.05, 0.1) == 200
    assert next_batch_edges(1000, 1000, 0.2, 0.1) == 500


def test_the_rest_after_a_batch_is_proportional_and_bounded() -> None:
    """The merge rests pause_ratio times as long as the batch took, never more than
    MAX_PAUSE, and not at all with ratio 0."""
    assert pause_after(0.1, 1.0) == pytest.approx(0.1)
    assert pause_after(0.1, 0.5) == pytest.approx(0.05)
    assert pause_after(0.1, 0.0) == 0.0
    assert pause_after(30.0, 1.0) == MAX_PAUSE


async def test_the_batch_log_has_a_line_per_try(db_url: str, tmp_path: Path) -> None:
    """--batch-log writes a header and one line per edge batch try, with its edges, its
    follower range and how it ended."""
    await run(db_url, BASE_ACCOUNTS, BASE_EDGES)
    log = tmp_path / "batches.csv"
    options = ImportOptions(progress=False, batch_log=str(log))
    await import_graph(db_url, None, csv_text(*ON_TOP), options)
    with log.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows
    assert {r["outcome"] for r in rows} == {"ok"}
    assert sum(int(r["edges"]) for r in rows) == 5  # (a,b) is present: not in a batch
    assert rows[0]["lo"] == "a"
    assert all(float(r["seconds"]) >= 0 and float(r["pause"]) >= 0 for r in rows)


async def test_exclusive_merge_leaves_the_graph_the_live_merge_leaves(db_url: str) -> None:
    """The same file on top of the same graph, through the live batches and through
    --exclusive (in two databases made from one template), ends in the same rows and counts:
    both copies, mutual state on both sides (an old edge made mutual keeps its time), edges
    present skipped."""
    if CITUS:
        pytest.skip("--exclusive is for one PostgreSQL (on Citus the live batches run)")
    await run(db_url, BASE_ACCOUNTS, BASE_EDGES)
    other = await _copy_database(db_url, "exclusive_copy")
    try:
        live = await run(db_url, None, ON_TOP)
        excl = await run(other, None, ON_TOP, exclusive=True)
        assert (excl.edges_added, excl.edges_already_present) == (5, 1)
        assert (live.edges_added, live.edges_already_present) == (5, 1)
        assert await snapshot(other) == await snapshot(db_url)
        await assert_counts_equal_lists(other)
        rows = await snapshot(other)
        assert ("b", "a", at(T0 + 20), at(T0 + 20)) in rows["following"]
        assert ("a", "b", at(T0), at(T0 + 20)) in rows["following"]
    finally:
        await _drop_database(db_url, "exclusive_copy")


async def test_new_edges_found_a_range_of_followers_at_a_time_are_those_found_at_once(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Into a graph in use the first row of each new edge is found a range of followers at
    a time (staging.SLICE_ROWS staged rows each, here 2: several ranges): the same file on
    the same graph, sliced and in one statement (two databases from one template), ends in
    the same rows, counts and report, with a duplicate, a self-follow, unknown accounts and
    an account of the accounts file among the rows; the accounts the file creates are
    created a run of the profiles' batches at a time (bulk.ACCOUNTS_PER_STATEMENT) in the
    same way as all at once."""
    if CITUS:
        pytest.skip("the ranges are for one PostgreSQL (on Citus the shards share the work)")
    await run(db_url, BASE_ACCOUNTS, BASE_EDGES)
    other = await _copy_database(db_url, "sliced_copy")
    rows = [*ON_TOP, f"c,d,{T0 + 9}", "e,e", f"e,b,{T0 + 6}", f"d,a,{T0 + 8}"]
    rows += ["zz,a", "a,zz", f"f,a,{T0 + 10}", f"a,f,{T0 + 11}"]  # zz unknown, f in the file
    accounts = ["f", *(f"n{i:05}" for i in range(4500))]  # three of the profiles' batches
    try:
        whole = await run(db_url, accounts, rows, skip_bad_rows=True)
        monkeypatch.setattr(staging, "SLICE_ROWS", 2)
        monkeypatch.setattr(bulk, "ACCOUNTS_PER_STATEMENT", staging.ACCOUNT_BATCH)
        ranges: list[int] = []
        find_ranges = staging._slices

        async def counted(*args: Any) -> list[tuple[str, str]]:
            found = await find_ranges(*args)
            ranges.append(len(found))
            return found

        monkeypatch.setattr(staging, "_slices", counted)
        sliced = await run(other, accounts, rows, skip_bad_rows=True)
        assert sliced.accounts_written == whole.accounts_written == 4501
        assert ranges[0] > 2  # six followers in fourteen rows
        assert (sliced.edges_added, sliced.edges_already_present) == (9, 1)
        assert (whole.edges_added, whole.edges_already_present) == (9, 1)
        bad = [(b.line, b.problem) for b in whole.bad_rows]
        assert [(b.line, b.problem) for b in sliced.bad_rows] == bad
        assert [line for line, _ in bad] == [7, 8, 11, 12]
        assert await snapshot(other) == await snapshot(db_url)
        await assert_counts_equal_lists(other)
    finally:
        await _drop_database(db_url, "sliced_copy")


async def test_exclusive_merge_keeps_the_cap(db_url: str) -> None:
    """With --exclusive too a follower over --max-following keeps its earliest follows (the
    checks refuse the rest; the merge counts again from the counter row it finds)."""
    if CITUS:
        pytest.skip("--exclusive is for one PostgreSQL")
    await run(db_url, BASE_ACCOUNTS, [f"a,b,{T0}"])
    edges = [f"a,d,{T0 + 9}", f"a,c,{T0 + 5}", f"b,a,{T0}"]
    report = await run(db_url, None, edges, exclusive=True, max_following=2, skip_bad_rows=True)
    assert [(b.line, "limit" in b.problem) for b in report.bad_rows] == [(1, True)]
    rows = await snapshot(db_url)
    assert [r[:2] for r in rows["following"]] == [("a", "b"), ("a", "c"), ("b", "a")]
    await assert_counts_equal_lists(db_url)


async def _copy_database(db_url: str, name: str) -> str:
    """A new database made from db_url's (nobody else connected to it)."""
    conn = await asyncpg.connect(db_url)
    try:
        source = await conn.fetchval("SELECT current_database()")
        await conn.execute(f"DROP DATABASE IF EXISTS {name}")
        await conn.execute(f'CREATE DATABASE {name} TEMPLATE "{source}"')
    finally:
        await conn.close()
    return urlsplit(db_url)._replace(path=f"/{name}").geturl()


async def _drop_database(db_url: str, name: str) -> None:
    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await conn.close()


async def test_a_given_up_batch_leaves_no_failed_transaction_behind(db_url: str) -> None:
    """A connection left in a failed transaction (what a cancelled ROLLBACK leaves) is
    rolled back before the next batch, so that batch's first statement runs."""
    if CITUS:
        pytest.skip("a connection's state, nothing distributed (its database's drop raced)")
    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute("BEGIN")
        with pytest.raises(asyncpg.DivisionByZeroError):
            await conn.execute("SELECT 1 / 0")
        assert conn.is_in_transaction()
        await _end_failed_transaction(conn)
        assert not conn.is_in_transaction()
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()
