"""`follow-server import` and `follow-server check` on a real Citus cluster, judged against
one PostgreSQL.

On Citus every table is distributed on user_id and a statement may only join rows of one
owner; the importer's staging tables and the checker's views of the edges by their other
user are therefore distributed tables there (server.importer.staging,
server.graph_invariants.rekeyed_edges), while one PostgreSQL keeps temporary tables and
views. What must not differ is the outcome: so each test runs the same imports, corruptions
and repairs on a fresh Citus database and on a fresh single-node one and compares every
table, report and bad row. Skipped, with the reason, on a machine without Citus (run
../shared/citus/install.sh).
"""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import astuple
from pathlib import Path
from typing import NamedTuple

import asyncpg
import pytest

from server.checker import Report, check
from server.graph_invariants import graph_is_distributed
from server.importer import ImportAbortedError, ImportOptions, ImportReport, csvread, import_graph
from server.migrations import DISTRIBUTION, migrate
from tests.invariants import assert_sound
from tests.support.citus import CitusCluster, citus_missing_reason
from tests.test_checker import CORRUPTIONS

_MISSING = citus_missing_reason()
if _MISSING is not None:
    pytest.skip(_MISSING, allow_module_level=True)

pytestmark = pytest.mark.citus

T0 = 1_700_000_000
CAP = 2  # a small following cap, so that a few rows go over it
SERVICE_TABLES = {t for tables in DISTRIBUTION.values() for t in tables}

ACCOUNTS = [
    "user_id,nick,face_url",
    *(f"u{i:02d},nick {i}," for i in range(1, 13)),
    '"u13",quoted,',  # the slow path from here on (CSV quoting)
    "\x07bad",  # bad: a control character
    "u14,,https://x/14.png",
    "u02,Renamed,",  # a later row wins
]
EDGES = [
    "follower_id,target_id,followed_at",
    f"u01,u02,{T0 + 1}",
    f"u02,u01,{T0 + 5}.5",  # mutual with the row above
    f"u01,u03,{T0 + 2}",
    f"u03,u04,{T0 + 3}",
    f"u04,u01,{T0 + 4}",
    f"u05,u06,{T0 + 6}",
    f"u05,u07,{T0 + 7}",
    f"u05,u08,{T0 + 8}",  # over the cap: u05's third follow
    f"u06,u05,{T0 + 9}",
    f"u01,u01,{T0}",  # self-follow
    f"u01,ghost,{T0}",  # unknown target
    f"ghost2,u01,{T0}",  # unknown follower
    f"u01,u02,{T0 + 99}",  # duplicate of line 2
    "u07,u08,soon",  # bad time
    f'"u09",u10,{T0 + 10}',  # quoted: the slow path
    "u10,u09,2023-11-14T22:13:30Z",
    f"u11,u12,{T0 + 11}.123456",
    f"u12,u13,{T0 + 12}",
    f"u14,u11,{T0 + 13}",
]
# A later file: new accounts, old edges made mutual, repeats of old edges, a new cap victim.
LATER_ACCOUNTS = ["u15,late,", "u03,Carol,"]
LATER_EDGES = [
    f"u03,u01,{T0 + 20}",  # makes the old u01 -> u03 mutual
    f"u12,u11,{T0 + 21}",  # makes the old u11 -> u12 mutual
    f"u01,u02,{T0 + 22}",  # already present: its first time is kept
    f"u15,u01,{T0 + 23}",
    f"u01,u15,{T0 + 24}",  # u01 already follows 2: over the cap
    f"u13,u15,{T0 + 25}",
]


@pytest.fixture(scope="module")
def cluster() -> Iterator[CitusCluster]:
    """One coordinator + two workers for the module (starting one takes seconds)."""
    with CitusCluster() as running:
        yield running


@pytest.fixture
async def citus_url(cluster: CitusCluster) -> AsyncIterator[str]:
    """A fresh Citus database (Citus metadata is per database), migrated: the service's
    tables distributed on user_id, as a deployment has them."""
    name = f"tools_{uuid.uuid4().hex[:12]}"
    url = cluster.create_database(name)
    conn = await asyncpg.connect(url)
    try:
        await migrate(conn)
        assert await graph_is_distributed(conn)
    finally:
        await conn.close()
    yield url
    cluster.drop_database(name)


@pytest.fixture
async def single_url(db_url: str, cluster: CitusCluster) -> AsyncIterator[str]:
    """A fresh, migrated database on one PostgreSQL: the normal fixtures' `db_url`; when
    those run in Citus mode (FOLLOW_TEST_CITUS=1), a plain database on this module's
    coordinator instead (no Citus extension in it: one PostgreSQL 15)."""
    if os.environ.get("FOLLOW_TEST_CITUS") != "1":
        yield db_url
        return
    name = f"single_{uuid.uuid4().hex[:12]}"
    url = cluster.create_database(name, citus=False)
    conn = await asyncpg.connect(url)
    try:
        await migrate(conn)
    finally:
        await conn.close()
    yield url
    cluster.drop_database(name)


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """A few lines per fast-path chunk, so each file is read by both paths."""
    monkeypatch.setattr(csvread, "_FAST_CHUNK", 96)


def _csv(lines: list[str] | None) -> io.StringIO | None:
    return None if lines is None else io.StringIO("".join(f"{line}\n" for line in lines))


async def _import(
    url: str, accounts: list[str] | None, edges: list[str] | None, **options: object
) -> ImportReport | ImportAbortedError:
    """One import; its report, or the error that aborted it (which carries the report)."""
    opts = ImportOptions(progress=False, max_following=CAP, **options)  # type: ignore[arg-type]
    try:
        return await import_graph(url, _csv(accounts), _csv(edges), opts)
    except ImportAbortedError as exc:
        return exc


class Outcome(NamedTuple):
    """What an import did and found, without its timings: what must match across databases."""

    aborted: bool
    accounts_read: int
    edges_read: int
    accounts_written: int
    edges_added: int
    edges_already_present: int
    bad_rows: list[tuple[object, ...]]  # (source, line, problem)


def _outcome(result: ImportReport | ImportAbortedError) -> Outcome:
    report = result.report if isinstance(result, ImportAbortedError) else result
    return Outcome(
        isinstance(result, ImportAbortedError),
        report.accounts_read,
        report.edges_read,
        report.accounts_written,
        report.edges_added,
        report.edges_already_present,
        [astuple(b) for b in report.bad_rows],
    )


async def _import_both(
    urls: tuple[str, str], accounts: list[str] | None, edges: list[str] | None, **options: object
) -> Outcome:
    """The same import into both databases; what it did, asserted to be the same."""
    citus, single = [_outcome(await _import(url, accounts, edges, **options)) for url in urls]
    assert citus == single
    return citus


async def _snapshot(url: str) -> dict[str, list[tuple[object, ...]]]:
    """Every row of the service's per-user tables, in key order; each user's counts as the
    service reads them (the counter row plus its delta rows: how they are split between the
    two is not the graph, and `check --repair` folds deltas into the counter row)."""
    queries = {
        "accounts": "SELECT user_id, nick, face_url, profile_sequence FROM accounts",
        "counts": """
            SELECT c.user_id, c.following,
                   c.followers + coalesce(d.followers, 0), c.mutual + coalesce(d.mutual, 0)
            FROM follow_counts c
            LEFT JOIN (SELECT user_id, sum(followers)::bigint AS followers,
                              sum(mutual)::bigint AS mutual
                       FROM follow_count_deltas GROUP BY user_id) d ON d.user_id = c.user_id
        """,
        "following": "SELECT * FROM following",
        "followers": "SELECT * FROM followers",
    }
    conn = await asyncpg.connect(url)
    try:
        return {
            table: [tuple(r) for r in await conn.fetch(f"{sql} ORDER BY 1, 2")]
            for table, sql in queries.items()
        }
    finally:
        await conn.close()


async def _assert_same_and_sound(
    citus_url: str, single_url: str
) -> dict[str, list[tuple[object, ...]]]:
    rows = await _snapshot(citus_url)
    assert rows == await _snapshot(single_url)
    for url in (citus_url, single_url):
        conn = await asyncpg.connect(url)
        try:
            await assert_sound(conn, CAP)
        finally:
            await conn.close()
    return rows


async def _assert_nothing_left_behind(citus_url: str) -> None:
    """No staging or helper relation survives a run: only the service's tables are
    distributed, and no import_* or *_by_* relation or sequence exists."""
    conn = await asyncpg.connect(citus_url)
    try:
        placed = {
            r[0]
            for r in await conn.fetch("SELECT logicalrelid::regclass::text FROM pg_dist_partition")
        }
        leftovers = await conn.fetch(
            r"""SELECT relname FROM pg_class WHERE relname LIKE 'import\_%'
                   OR relname IN ('following_by_target', 'followers_by_follower')"""
        )
    finally:
        await conn.close()
    assert placed == SERVICE_TABLES
    assert leftovers == []


async def test_import_gives_the_same_graph_as_one_postgresql(
    citus_url: str, single_url: str
) -> None:
    """Bad rows (of every kind, over-cap ones included) abort the import on both with the
    same lines and change nothing; skipping them imports the same rows; a re-run changes
    nothing; a later file joins the old edges the same way (old edges made mutual, the cap
    counted with the stored edges), leaving exact counts (counter and delta rows alike)."""
    urls = (citus_url, single_url)
    aborted = await _import_both(urls, ACCOUNTS, EDGES)
    assert aborted.aborted
    assert [b[:2] for b in aborted.bad_rows] == [
        ("accounts", 15),
        ("edges", 9),  # u05's third follow, over the cap of 2
        ("edges", 11),
        ("edges", 12),
        ("edges", 13),
        ("edges", 14),
        ("edges", 15),
    ]
    assert await _snapshot(citus_url) == await _snapshot(single_url)
    assert (await _snapshot(citus_url))["accounts"] == []
    await _assert_nothing_left_behind(citus_url)

    first = await _import_both(urls, ACCOUNTS, EDGES, skip_bad_rows=True)
    assert (first.aborted, first.edges_added, len(first.bad_rows)) == (False, 13, 7)
    rows = await _assert_same_and_sound(*urls)
    assert ("u02", "Renamed", None, 0) in rows["accounts"]
    assert [r[:2] for r in rows["following"] if r[3] is not None] == [
        ("u01", "u02"),
        ("u02", "u01"),
        ("u05", "u06"),
        ("u06", "u05"),
        ("u09", "u10"),
        ("u10", "u09"),
    ]

    again = await _import_both(urls, ACCOUNTS, EDGES, skip_bad_rows=True)
    assert (again.edges_added, again.edges_already_present) == (0, 13)
    assert await _assert_same_and_sound(*urls) == rows

    later = await _import_both(urls, LATER_ACCOUNTS, LATER_EDGES, skip_bad_rows=True)
    assert (later.edges_added, later.edges_already_present) == (4, 1)
    assert later.bad_rows == [
        ("edges", 5, "following limit reached: u01 would follow more than 2 users")
    ]
    rows = await _assert_same_and_sound(*urls)
    following = {r[:2]: r for r in rows["following"]}
    assert following["u01", "u03"][3] == following["u03", "u01"][3]  # now mutual
    assert following["u11", "u12"][3] is not None
    await _assert_nothing_left_behind(citus_url)


async def _check_both(urls: tuple[str, str], *, repair: bool = False) -> Report:
    """The checker on both databases; its reports, asserted to be the same (samples
    compared as sets: without an order, LIMIT may pick rows in any order)."""
    reports = []
    for url in urls:
        conn = await asyncpg.connect(url)
        try:
            reports.append(await check(conn, max_following=CAP, repair=repair))
        finally:
            await conn.close()
    citus, single = reports
    assert citus.violations == single.violations
    assert citus.repaired == single.repaired
    assert {k: sorted(map(repr, v)) for k, v in citus.samples.items()} == {
        k: sorted(map(repr, v)) for k, v in single.samples.items()
    }
    return citus


async def _execute_both(urls: tuple[str, ...], *statements: str) -> None:
    for url in urls:
        conn = await asyncpg.connect(url)
        try:
            for sql in statements:
                await conn.execute(sql)
        finally:
            await conn.close()


CHECKER_ACCOUNTS = ["a", "b", "c", "d", "e"]
CHECKER_EDGES = [f"a,b,{T0}", f"b,a,{T0 + 1}", f"a,c,{T0 + 2}", f"c,d,{T0 + 3}", f"d,a,{T0 + 4}"]


async def test_checker_finds_and_repairs_the_same_damage_as_on_one_postgresql(
    citus_url: str, single_url: str
) -> None:
    """A clean graph is clean on Citus; a deleted followers copy, a skewed counter and a
    broken mutual pair are found exactly (the same counts and rows as on one PostgreSQL),
    and --repair brings the graph back to what it was."""
    urls = (citus_url, single_url)
    await _import_both(urls, CHECKER_ACCOUNTS, CHECKER_EDGES)
    clean = await _check_both(urls)
    assert clean.total == 0, clean.violations
    before = await _snapshot(citus_url)

    await _execute_both(
        urls,
        "DELETE FROM followers WHERE user_id = 'c' AND follower_id = 'a'",
        "UPDATE follow_counts SET followers = followers + 7 WHERE user_id = 'e'",
        "UPDATE following SET mutual_since = NULL WHERE user_id = 'a' AND target_id = 'b'",
    )
    broken = await _check_both(urls)
    assert {k: v for k, v in broken.violations.items() if v} == {
        "missing_edge_copy": 1,  # a -> c has no followers copy
        "mutual_asymmetric": 2,  # both rows of the pair a <-> b disagree
        "counts_differ": 3,  # c's followers, e's followers, a's mutual
    }
    assert broken.samples["missing_edge_copy"] == [
        {"problem": "no followers copy", "user_id": "a", "other": "c"}
    ]

    repaired = await _check_both(urls, repair=True)
    assert repaired.total == 0, repaired.violations
    assert repaired.repaired == {"missing_edge_copy": 1, "mutual_asymmetric": 2, "counts_differ": 3}
    assert await _snapshot(citus_url) == before == await _snapshot(single_url)
    await _assert_nothing_left_behind(citus_url)


async def test_checker_repairs_each_kind_of_damage_on_citus(
    citus_url: str, single_url: str
) -> None:
    """Every corruption of tests/test_checker (edges to missing accounts, time mismatches,
    missing counter rows too), one at a time: found under its invariant as on one
    PostgreSQL, and repaired back to the graph the import wrote."""
    urls = (citus_url, single_url)
    await _import_both(urls, CHECKER_ACCOUNTS, CHECKER_EDGES)
    before = await _snapshot(citus_url)
    # Citus refuses `followed_at - interval '1 day'` in an UPDATE (a STABLE function of a
    # column): the same damage with a constant time.
    corruptions = CORRUPTIONS | {
        "edge_time_mismatch": "UPDATE followers SET followed_at = '2001-02-03 04:05:06+00'"
        " WHERE user_id = 'd' AND follower_id = 'c'"
    }
    for name, corruption in sorted(corruptions.items()):
        await _execute_both(urls, corruption)
        report = await _check_both(urls)
        assert report.violations[name] > 0, name
        repaired = await _check_both(urls, repair=True)
        assert repaired.total == 0, (name, repaired.violations)
        assert name in repaired.repaired
        assert await _snapshot(citus_url) == before, name
    await _assert_nothing_left_behind(citus_url)


async def test_over_cap_is_reported_alike(citus_url: str, single_url: str) -> None:
    """The cap is reported (never repaired) the same way on Citus."""
    urls = (citus_url, single_url)
    await _import_both(urls, CHECKER_ACCOUNTS, CHECKER_EDGES)
    conn_reports = []
    for url in urls:
        conn = await asyncpg.connect(url)
        try:
            conn_reports.append(await check(conn, max_following=1, repair=True))
        finally:
            await conn.close()
    assert [r.violations["over_cap"] for r in conn_reports] == [1, 1]
    assert conn_reports[0].samples == conn_reports[1].samples


async def test_command_lines_against_a_citus_coordinator(citus_url: str, tmp_path: Path) -> None:
    """`follow-server import` and `follow-server check [--repair]` work given the
    coordinator's URL, with the same exit codes as on one PostgreSQL."""
    accounts = tmp_path / "accounts.csv"
    accounts.write_text("user_id,nick\na,Alice\nb,Bob\nc\n")
    edges = tmp_path / "edges.csv"
    edges.write_text(f"a,b,{T0}\nb,a,{T0 + 1}\nb,b,{T0}\nc,a,{T0 + 2}\n")

    async def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "server", *argv, "--database-url", citus_url],
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )

    files = ["--accounts", str(accounts), "--edges", str(edges), "--no-progress"]
    refused = await run("import", *files)
    assert refused.returncode == 1, refused.stderr
    assert "edges line 3: a user cannot follow themselves" in refused.stderr
    imported = await run("import", *files, "--skip-bad-rows")
    assert imported.returncode == 0, imported.stderr
    assert "imported 3 account(s) and 3 new edge(s)" in imported.stderr

    clean = await run("check")
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "total violations: 0" in clean.stdout
    await _execute_both(
        (citus_url,), "UPDATE follow_counts SET following = following + 1 WHERE user_id = 'c'"
    )
    broken = await run("check")
    assert broken.returncode == 1
    assert "counts_differ 1 violation(s)" in " ".join(broken.stdout.split())
    fixed = await run("check", "--repair")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert "repaired 1" in fixed.stdout
    await _assert_nothing_left_behind(citus_url)
