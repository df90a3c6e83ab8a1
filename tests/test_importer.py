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
# What assert_counts_equal_lists checks beyond the counts, as invariants that run on Citus.
EDGE_CHECKS = (
    "missing_edge_copy",
    "edge_time_mismatch",
    "mutual_asymmetric",
    "mutual_time_not_latest_follow",
)
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


async def snapshot(db_url: str) -> dict[str, list[tuple[object, ...]]]:
    """Every row of the four tables, in key order."""
    conn = await asyncpg.connect(db_url)
    try:
        return {
            table: [tuple(r) for r in await conn.fetch(f"SELECT * FROM {table} ORDER BY 1, 2")]
            for table in ("accounts", "follow_counts", "following", "followers")
            if table != "accounts"
        } | {
            "accounts": [
                tuple(r)
                for r in await conn.fetch(
                    "SELECT user_id, nick, face_url, profile_sequence FROM accounts ORDER BY 1"
                )
            ]
        }
    finally:
        await conn.close()


async def assert_counts_equal_lists(db_url: str) -> None:
    """follow_counts equals the lists, and both copies of every edge agree."""
    conn = await asyncpg.connect(db_url)
    try:
        wrong = await conn.fetch(
            """
            SELECT c.user_id FROM follow_counts c
            WHERE c.following <> (SELECT count(*) FROM following f WHERE f.user_id = c.user_id)
               OR c.followers <> (SELECT count(*) FROM followers r WHERE r.user_id = c.user_id)
               OR c.mutual <> (SELECT count(*) FROM following f
                               WHERE f.user_id = c.user_id AND f.mutual_since IS NOT NULL)
            """
        )
        assert wrong == []
        if CITUS:
            # Citus refuses the two queries below (outer joins on target_id/follower_id).
            # The same properties, written so that Citus runs them (server.graph_invariants):
            # both copies of every edge, with one time; mutual_since set exactly when the
            # reverse edge exists, equal on both rows and the later of the two follow times.
            broken = await violations(conn, max_following=2**62)
            assert not {name: rows for name, rows in broken.items() if name in EDGE_CHECKS}
            return
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


async def test_rerun_is_idempotent_and_a_later_file_extends_the_graph(db_url: str) -> None:
    """Importing the same files again changes nothing; new edges join old ones exactly,
    including old edges that the new ones make mutual, and wrong counts are repaired."""
    accounts = ["a,Alice", "b", "c"]
    edges = [f"a,b,{T0}", f"c,a,{T0 + 1}"]
    await run(db_url, accounts, edges)
    first = await snapshot(db_url)
    again = await run(db_url, accounts, edges)
    assert again.edges_added == 0
    assert again.edges_already_present == 2
    assert await snapshot(db_url) == first

    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute("UPDATE follow_counts SET followers = 7 WHERE user_id = 'b'")
    finally:
        await conn.close()
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


async def test_rebuilding_indexes_leaves_the_schema_as_migrated(db_url: str) -> None:
    """Bulk mode drops and rebuilds the edge tables' indexes; the definitions come back
    identical and the data is the same as with row-by-row maintenance."""
    conn = await asyncpg.connect(db_url)
    query = (
        "SELECT indexname, indexdef FROM pg_indexes"
        " WHERE tablename IN ('following', 'followers') ORDER BY 1"
    )
    try:
        before = [tuple(r) for r in await conn.fetch(query)]
        await run(db_url, ["a", "b", "c"], [f"a,b,{T0}", f"b,a,{T0 + 1}"], rebuild_indexes="always")
        after = [tuple(r) for r in await conn.fetch(query)]
        constraints = await conn.fetch(
            "SELECT conname FROM pg_constraint WHERE contype = 'p'"
            " AND conrelid IN ('following'::regclass, 'followers'::regclass) ORDER BY 1"
        )
    finally:
        await conn.close()
    assert after == before
    assert [r[0] for r in constraints] == ["followers_pkey", "following_pkey"]
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


async def test_recounted_users_lose_their_delta_rows(db_url: str) -> None:
    """Counts are the counter row plus follow_count_deltas rows: the import writes exact
    counter rows and deletes the deltas of every user it recounts, so the totals are exact."""
    await run(db_url, ["a", "b", "c"], [f"a,b,{T0}"])
    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute(
            "INSERT INTO follow_count_deltas (user_id, shard, followers, mutual)"
            " VALUES ('b', 1, 5, 2), ('b', 2, -1, 0), ('c', 3, 4, 0)"
        )
        await run(db_url, None, [f"b,a,{T0 + 1}"])
        totals = [
            tuple(r)
            for r in await conn.fetch(
                "SELECT user_id, following, followers, mutual FROM follow_totals ORDER BY 1"
            )
        ]
        left = [tuple(r) for r in await conn.fetch("SELECT user_id FROM follow_count_deltas")]
    finally:
        await conn.close()
    # c is not touched by the second import: neither recounted nor its deltas deleted.
    assert totals == [("a", 1, 1, 1), ("b", 1, 1, 1), ("c", 0, 4, 0)]
    assert left == [("c",)]
    await assert_counts_equal_lists(db_url)
