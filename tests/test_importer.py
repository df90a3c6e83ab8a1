"""The bulk importer against a real PostgreSQL: edges, mutual state, counts, bad rows, re-runs."""

from __future__ import annotations

import io
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest

from server.importer import (
    ImportAbortedError,
    ImportOptions,
    ImportReport,
    csvread,
    import_graph,
    main,
    parse_time_us,
)
from tests.conftest import CITUS
from tests.invariants import violations

QUIET = ImportOptions(progress=False)
T0 = 1_700_000_000


def csv_text(*lines: str) -> io.StringIO:
    return io.StringIO("".join(f"{line}\n" for line in lines))


async def run(
    db_url: str, accounts: list[str] | None, edges: list[str] | None, **options: object
) -> ImportReport:
    opts = ImportOptions(progress=False, **options)  # type: ignore[arg-type]
    return await import_graph(
        db_url,
        csv_text(*accounts) if accounts is not None else None,
        csv_text(*edges) if edges is not None else None,
        opts,
    )


async def fetch_rows(db_url: str, sql: str) -> list[tuple[object, ...]]:
    """The rows of one query, as tuples."""
    conn = await asyncpg.connect(db_url)
    try:
        return [tuple(r) for r in await conn.fetch(sql)]
    finally:
        await conn.close()


async def snapshot(db_url: str) -> dict[str, list[tuple[object, ...]]]:
    """Every row of the edge tables and accounts, and each user's counts (counter row plus
    delta rows: follow_totals), in key order."""
    queries = {
        "accounts": "SELECT user_id, nick, face_url, profile_sequence FROM accounts",
        "follow_counts": "SELECT user_id, following, followers, mutual FROM follow_totals",
        "following": "SELECT * FROM following",
        "followers": "SELECT * FROM followers",
    }
    conn = await asyncpg.connect(db_url)
    try:
        return {
            table: [tuple(r) for r in await conn.fetch(f"{sql} ORDER BY 1, 2")]
            for table, sql in queries.items()
        }
    finally:
        await conn.close()


async def assert_counts_equal_lists(db_url: str) -> None:
    """Counts (counter row plus delta rows) equal the lists, both copies of every edge agree
    and mutual state is right: every invariant of server.graph_invariants and
    tests.invariants (they run on Citus too); on one PostgreSQL also by direct joins."""
    conn = await asyncpg.connect(db_url)
    try:
        assert await violations(conn, max_following=2**62) == {}
        if CITUS:
            return  # Citus refuses the two queries below (joins on target_id/follower_id).
        halves = await conn.fetchval(
            """
            SELECT count(*) FROM following f FULL JOIN followers r
              ON r.user_id = f.target_id AND r.follower_id = f.user_id
             AND r.followed_at = f.followed_at
            WHERE f.user_id IS NULL OR r.user_id IS NULL
            """
        )
        assert halves == 0
        bad_mutual = await conn.fetchval(
            """
            SELECT count(*) FROM following f
            LEFT JOIN following b ON b.user_id = f.target_id AND b.target_id = f.user_id
            WHERE (b.user_id IS NULL) <> (f.mutual_since IS NULL)
               OR f.mutual_since IS DISTINCT FROM
                  CASE WHEN b.user_id IS NOT NULL THEN greatest(f.followed_at, b.followed_at) END
            """
        )
        assert bad_mutual == 0
    finally:
        await conn.close()


def at(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def test_parse_time_us_accepts_unix_seconds_and_iso() -> None:
    """Times are Unix seconds (fraction truncated to µs) or ISO-8601 (naive means UTC)."""
    assert parse_time_us("1700000000") == 1_700_000_000_000_000
    assert parse_time_us("1700000000.5") == 1_700_000_000_500_000
    assert parse_time_us("1700000000.1234567") == 1_700_000_000_123_456
    assert parse_time_us("2023-11-14T22:13:20Z") == 1_700_000_000_000_000
    assert parse_time_us("2023-11-14T22:13:20.000001") == 1_700_000_000_000_001
    assert parse_time_us("2023-11-15T00:13:20+02:00") == 1_700_000_000_000_000
    assert parse_time_us("yesterday") is None
    assert parse_time_us("17e8") is None


async def test_import_writes_both_copies_counts_and_mutual_state(db_url: str) -> None:
    """Both copies of each edge, exact counts, and mutual_since = the later follow time."""
    report = await run(
        db_url,
        ["user_id,nick,face_url", "a,Alice,https://a.png", "b", "c,Carol"],
        [
            "follower_id,target_id,followed_at",
            f"a,b,{T0}.25",
            f"b,a,{T0 + 10}",
            "c,a,2023-11-14T22:13:30Z",
        ],
    )
    assert report.edges_added == 3
    await assert_counts_equal_lists(db_url)
    rows = await snapshot(db_url)
    assert rows["accounts"] == [
        ("a", "Alice", "https://a.png", 0),
        ("b", None, None, 0),
        ("c", "Carol", None, 0),
    ]
    assert rows["follow_counts"] == [("a", 1, 2, 1), ("b", 1, 1, 1), ("c", 1, 0, 0)]
    assert rows["following"] == [
        ("a", "b", at(T0 + 0.25), at(T0 + 10)),
        ("b", "a", at(T0 + 10), at(T0 + 10)),
        ("c", "a", at(T0 + 10), None),
    ]


async def test_bad_rows_abort_with_their_line_numbers_and_change_nothing(db_url: str) -> None:
    """Every kind of bad row is reported with its line; by default nothing is imported."""
    await run(db_url, ["old"], None)
    before = await snapshot(db_url)
    edges = [
        "follower_id,target_id,followed_at",  # 1: header
        f"a,b,{T0}",  # 2: good
        f"a,a,{T0}",  # 3: self-follow
        f"a,ghost,{T0}",  # 4: unknown account
        f"a,b,{T0 + 1}",  # 5: duplicate of line 2
        "a,b",  # 6: duplicate again (no time)
        "b,a,soon",  # 7: bad time
        "a",  # 8: too few fields
        f"{'x' * 33},a,{T0}",  # 9: id too long
        "",  # 10: blank, ignored
        "b,\x01,1",  # 11: control character
        f"b,old,{T0}",  # 12: good (an account already in the database)
    ]
    with pytest.raises(ImportAbortedError) as raised:
        await run(db_url, ["user_id", "a", "b", "\x07bad"], edges)
    bad = [(b.source, b.line) for b in raised.value.report.bad_rows]
    assert bad == [
        ("accounts", 4),
        ("edges", 3),
        ("edges", 4),
        ("edges", 5),
        ("edges", 6),
        ("edges", 7),
        ("edges", 8),
        ("edges", 9),
        ("edges", 11),
    ]
    problems = {b.line: b.problem for b in raised.value.report.bad_rows if b.source == "edges"}
    assert "themselves" in problems[3]
    assert "ghost does not exist" in problems[4]
    assert problems[5] == "duplicate edge, first given on line 2"
    assert "followed_at" in problems[7]
    assert await snapshot(db_url) == before


async def test_skip_bad_rows_imports_the_good_ones(db_url: str) -> None:
    """--skip-bad-rows reports the bad rows and imports the rest, first duplicate kept."""
    report = await run(
        db_url,
        ["a", "b", "c"],
        [f"a,b,{T0}", f"a,b,{T0 + 5}", "a,zz,1", f"c,b,{T0 + 2}"],
        skip_bad_rows=True,
    )
    assert [b.line for b in report.bad_rows] == [2, 3]
    rows = await snapshot(db_url)
    assert rows["following"] == [("a", "b", at(T0), None), ("c", "b", at(T0 + 2), None)]
    await assert_counts_equal_lists(db_url)


async def test_an_edge_whose_first_row_is_bad_comes_from_its_next_good_row(db_url: str) -> None:
    """With --skip-bad-rows, an edge given first on a bad row (a bad time) and again on a
    good one is imported from the good one, which is no duplicate of the bad one."""
    report = await run(
        db_url, ["a", "b"], ["a,b,soon", f"a,b,{T0}", f"b,a,{T0 + 3}"], skip_bad_rows=True
    )
    assert [b.line for b in report.bad_rows] == [1]
    rows = await snapshot(db_url)
    assert rows["following"] == [("a", "b", at(T0), at(T0 + 3)), ("b", "a", at(T0 + 3), at(T0 + 3))]
    await assert_counts_equal_lists(db_url)


async def test_rerun_is_idempotent_and_a_later_file_extends_the_graph(db_url: str) -> None:
    """Importing the same files again changes nothing; new edges join old ones exactly,
    including old edges that the new ones make mutual."""
    accounts = ["a,Alice", "b", "c"]
    edges = [f"a,b,{T0}", f"c,a,{T0 + 1}"]
    await run(db_url, accounts, edges)
    first = await snapshot(db_url)
    again = await run(db_url, accounts, edges)
    assert again.edges_added == 0
    assert again.edges_already_present == 2
    assert await snapshot(db_url) == first

    more = await run(db_url, None, [f"b,a,{T0 + 20}", f"a,b,{T0 + 99}", f"a,c,{T0 + 3}"])
    assert more.edges_added == 2
    assert more.edges_already_present == 1
    await assert_counts_equal_lists(db_url)
    rows = await snapshot(db_url)
    assert rows["following"] == [
        ("a", "b", at(T0), at(T0 + 20)),  # old edge, kept its time, now mutual
        ("a", "c", at(T0 + 3), at(T0 + 3)),
        ("b", "a", at(T0 + 20), at(T0 + 20)),
        ("c", "a", at(T0 + 1), at(T0 + 3)),
    ]


async def test_following_cap_refuses_the_latest_follows(db_url: str) -> None:
    """A follower over --max-following keeps its earliest follows; the rest are bad rows."""
    await run(db_url, ["a", "b", "c", "d"], [f"a,b,{T0}"])
    edges = [f"a,d,{T0 + 9}", f"a,c,{T0 + 5}", f"b,a,{T0}"]
    with pytest.raises(ImportAbortedError) as raised:
        await run(db_url, None, edges, max_following=2)
    assert [(b.line, "limit" in b.problem) for b in raised.value.report.bad_rows] == [(1, True)]
    await run(db_url, None, edges, max_following=2, skip_bad_rows=True)
    rows = await snapshot(db_url)
    assert [r[:2] for r in rows["following"]] == [("a", "b"), ("a", "c"), ("b", "a")]
    await assert_counts_equal_lists(db_url)


def test_command_line_reports_bad_rows_and_exit_status(
    db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`follow-server import` exits 1 listing bad lines, and 0 after importing."""
    accounts = tmp_path / "accounts.csv"
    accounts.write_text("user_id,nick\na,Alice\nb,Bob\n")
    edges = tmp_path / "edges.csv"
    edges.write_text(f"a,b,{T0}\nb,b,{T0}\n")
    argv = ["--database-url", db_url, "--accounts", str(accounts), "--edges", str(edges)]
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--no-progress"])
    assert exited.value.code == 1
    err = capsys.readouterr().err
    assert "edges line 2: a user cannot follow themselves" in err
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--no-progress", "--skip-bad-rows"])
    assert exited.value.code == 0
    assert "1 new edge(s)" in capsys.readouterr().err


async def test_fast_and_slow_paths_number_lines_alike(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Plain rows go to COPY a chunk at a time; from the first chunk the fast pattern refuses
    (quotes, a bad row) the rest is read row by row, and every line number stays right."""
    monkeypatch.setattr(csvread, "_FAST_CHUNK", 64)  # a few lines per chunk
    users = [f"u{i:02d}" for i in range(30)]
    plain = [f"{users[i]},{users[i + 1]},{T0 + i}.000001" for i in range(20)]
    edges = [
        "follower_id,target_id,followed_at",
        *plain,  # lines 2-21: the fast path
        f'"{users[0]}",{users[5]},{T0}',  # 22: quoted, good
        f"{users[0]},{users[1]},{T0 + 50}",  # 23: duplicate of line 2
        f"{users[3]},ghost,{T0}",  # 24: unknown account
        f"{users[6]},{users[6]},{T0}",  # 25: self-follow
        f"{users[7]},{users[8]},x",  # 26: bad time
        f"{users[8]},{users[7]},{T0 + 99}",  # 27: good, makes 7 <-> 8 mutual
    ]
    report = await run(
        db_url, ["user_id,nick", *(f"{u},nick {u}" for u in users)], edges, skip_bad_rows=True
    )
    assert [(b.line, b.problem.split(":")[0]) for b in report.bad_rows] == [
        (23, "duplicate edge, first given on line 2"),
        (24, "target_id"),
        (25, "a user cannot follow themselves"),
        (26, "followed_at"),
    ]
    assert report.edges_read == 26
    assert report.edges_added == 22
    await assert_counts_equal_lists(db_url)
    rows = await snapshot(db_url)
    assert ("u07", "u08", at(T0 + 7.000001), at(T0 + 99)) in rows["following"]
    assert rows["accounts"][0] == ("u00", "nick u00", None, 0)


async def test_fast_path_fields_read_as_the_csv_reader_reads_them(db_url: str) -> None:
    """What COPY takes from a plain row is what the row-by-row reader would take: inner and
    outer spaces kept, an empty field is no value, punctuation in ids is kept."""
    report = await run(
        db_url,
        ["user_id,nick,face_url", "a!b, two  words ,", "c#d,,https://x/y?z=1", "e,f,g"],
        [f"a!b,c#d,{T0}.5", f"c#d,a!b,{T0 + 1}"],
    )
    assert report.accounts_written == 3
    rows = await snapshot(db_url)
    assert rows["accounts"] == [
        ("a!b", " two  words ", None, 0),
        ("c#d", None, "https://x/y?z=1", 0),
        ("e", "f", "g", 0),
    ]
    assert rows["following"] == [
        ("a!b", "c#d", at(T0 + 0.5), at(T0 + 1)),
        ("c#d", "a!b", at(T0 + 1), at(T0 + 1)),
    ]


async def test_counts_change_by_what_the_import_adds(db_url: str) -> None:
    """The merge adds to the counts what it added to the lists, as the service's calls do
    (the followers' counter rows, the targets' delta rows), so it can run beside them: delta
    rows already there stay counted, users the import does not touch keep their counts, and
    a count that was wrong before stays wrong by as much (`follow-server check --repair`
    mends it; the import does not recount)."""
    await run(db_url, ["a", "b", "c"], [f"a,b,{T0}"])
    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute(
            "INSERT INTO follow_count_deltas (user_id, shard, followers, mutual)"
            " VALUES ('b', 1, 5, 2), ('b', 2, -1, 0), ('c', 3, 4, 0)"
        )
        await run(db_url, None, [f"b,a,{T0 + 1}", f"c,a,{T0 + 2}"])
        totals = [
            tuple(r)
            for r in await conn.fetch(
                "SELECT user_id, following, followers, mutual FROM follow_totals ORDER BY 1"
            )
        ]
    finally:
        await conn.close()
    # b: 1 follower and 1 mutual from the lists, plus the 4 and 2 it was off by before.
    assert totals == [("a", 1, 2, 1), ("b", 1, 5, 3), ("c", 1, 4, 0)]
