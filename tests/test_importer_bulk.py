"""The importer's bulk path (server.importer.bulk, swap, prebuild): the accounts an import
creates and the edges among them written in one transaction without the batches, into new
edge tables swapped in when the live ones were empty (built beforehand on two connections
when every edge is among created accounts); edges touching existing accounts still through
the locked batches; exact counts and mutual state either way; re-runs change nothing; the
swap waits for a transaction holding the live tables and keeps its rows; no staging or new
table outlives an import."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from server.importer import ImportReport, bulk, prebuild, swap
from server.importer.staging import Staging
from tests.conftest import skip_on_citus
from tests.test_importer import T0, assert_counts_equal_lists, at, fetch_rows, run, snapshot

pytestmark = skip_on_citus("the bulk path runs on one PostgreSQL (Citus takes the batches)")

ACCOUNTS = ["user_id,nick", "a,Alice", "b,Bob", "c", "d"]
EDGES = [
    "follower_id,target_id,followed_at",
    f"a,b,{T0}",
    f"b,a,{T0 + 5}",
    f"c,a,{T0 + 1}",
    f"d,c,{T0 + 2}",
    f"c,d,{T0 + 1}",
]
FOLLOWING = [
    ("a", "b", at(T0), at(T0 + 5)),
    ("b", "a", at(T0 + 5), at(T0 + 5)),
    ("c", "a", at(T0 + 1), None),
    ("c", "d", at(T0 + 1), at(T0 + 2)),
    ("d", "c", at(T0 + 2), at(T0 + 2)),
]
COUNTS = [("a", 1, 2, 1), ("b", 1, 1, 1), ("c", 2, 1, 1), ("d", 1, 1, 1)]

_INDEXES = """
SELECT c.relname::text, i.indexrelid::regclass::text, con.conname::text
FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid
LEFT JOIN pg_constraint con ON con.conindid = i.indexrelid
WHERE c.relname IN ('following', 'followers') ORDER BY 1, 2
"""


@pytest.fixture
def swap_always(monkeypatch: pytest.MonkeyPatch) -> None:
    """Swap even for a handful of edges (normally only from SWAP_MIN_EDGES on)."""
    monkeypatch.setattr(swap, "SWAP_MIN_EDGES", 1)


async def _check(db_url: str, report: ImportReport) -> None:
    assert report.edges_added == len(FOLLOWING)
    assert report.batches == 0  # no locked batch: every edge is between created accounts
    await assert_counts_equal_lists(db_url)
    rows = await snapshot(db_url)
    assert rows["following"] == FOLLOWING
    assert rows["follow_counts"] == COUNTS
    assert [r[0] for r in rows["accounts"]] == ["a", "b", "c", "d"]


async def test_edges_among_created_accounts_go_in_bulk_into_the_live_tables(
    db_url: str,
) -> None:
    """A few edges among new accounts: one transaction into the live tables, no batches,
    both copies, mutual state and exact counts."""
    report = await run(db_url, ACCOUNTS, EDGES)
    assert not report.swapped
    await _check(db_url, report)


async def test_into_empty_edge_tables_new_ones_are_built_and_swapped_in(
    db_url: str, swap_always: None
) -> None:
    """Into empty edge tables the edges go into new tables, swapped in with the live ones'
    index and primary key names; a re-run then finds every edge present, changes nothing."""
    before = await fetch_rows(db_url, _INDEXES)
    report = await run(db_url, ACCOUNTS, EDGES)
    assert report.swapped
    await _check(db_url, report)
    assert await fetch_rows(db_url, _INDEXES) == before
    rows = await snapshot(db_url)
    again = await run(db_url, ACCOUNTS, EDGES)
    assert (again.edges_added, again.edges_already_present) == (0, len(FOLLOWING))
    assert await snapshot(db_url) == rows


async def test_edges_touching_existing_accounts_take_the_batches(
    db_url: str, swap_always: None
) -> None:
    """With an account present before the import, the edges among the new accounts go in
    bulk (no swap: the edge tables are not empty) and those touching it through the locked
    batches, with their mutual state (a <-> z) and exact counts."""
    await run(db_url, ["user_id", "z", "y"], ["follower_id,target_id,followed_at", f"y,z,{T0}"])
    report = await run(
        db_url,
        ACCOUNTS,
        [*EDGES, f"a,z,{T0 + 7}", f"z,a,{T0 + 3}", f"z,c,{T0 + 4}"],
    )
    assert not report.swapped
    assert report.edges_added == len(FOLLOWING) + 3
    assert report.batches >= 1
    await assert_counts_equal_lists(db_url)
    following = (await snapshot(db_url))["following"]
    assert ("a", "z", at(T0 + 7), at(T0 + 7)) in following
    assert ("z", "a", at(T0 + 3), at(T0 + 7)) in following
    assert ("z", "c", at(T0 + 4), None) in following


async def test_the_swap_waits_for_a_transaction_on_the_live_tables_and_keeps_its_rows(
    db_url: str, swap_always: None
) -> None:
    """A transaction holding the live edge tables (here one following x -> y as a Follow
    does) makes the swap's lock tries fail until it commits; its edge is then copied into
    the new tables, beside the import's."""
    await run(db_url, ["user_id", "x", "y"], None)
    call = await asyncpg.connect(db_url)
    watcher = await asyncpg.connect(db_url)
    try:
        tx = call.transaction()
        await tx.start()
        await call.execute("INSERT INTO following VALUES ('x', 'y', now(), NULL)")
        await call.execute("INSERT INTO followers VALUES ('y', 'x', now())")
        await call.execute("UPDATE follow_counts SET following = following + 1 WHERE user_id = 'x'")
        await call.execute("UPDATE follow_counts SET followers = followers + 1 WHERE user_id = 'y'")
        importing = asyncio.create_task(run(db_url, ACCOUNTS, EDGES))
        waiting = "SELECT count(*) FROM pg_locks WHERE NOT granted AND mode = 'AccessExclusiveLock'"
        for _ in range(600):  # until the import asks for the lock (at most a minute)
            if await watcher.fetchval(waiting) or importing.done():
                break
            await asyncio.sleep(0.1)
        assert not importing.done()
        await tx.commit()
        report = await importing
    finally:
        await call.close()
        await watcher.close()
    assert report.swapped
    assert report.edges_added == len(FOLLOWING)
    await assert_counts_equal_lists(db_url)
    following = (await snapshot(db_url))["following"]
    assert [r[:2] for r in following] == [*(r[:2] for r in FOLLOWING), ("x", "y")]


async def test_no_swap_when_something_hangs_on_the_live_tables(
    db_url: str, swap_always: None
) -> None:
    """A view over `following` (or a trigger, a grant, a publication) would be lost or
    would block with a swap: the edges then go into the live tables, all the same."""
    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute("CREATE VIEW following_view AS SELECT * FROM following")
    finally:
        await conn.close()
    report = await run(db_url, ACCOUNTS, EDGES)
    assert not report.swapped
    await _check(db_url, report)
    assert len(await fetch_rows(db_url, "SELECT * FROM following_view")) == len(FOLLOWING)


async def test_a_batch_whose_user_a_call_holds_lets_its_locks_go_and_is_tried_again(
    db_url: str,
) -> None:
    """A batch finding a follower's gate held (a call acting for it) waits at most
    merge.LOCK_WAIT_MS, rolls back and is tried again after a pause (no convoy behind it),
    and completes once the call is over."""
    await run(db_url, ["user_id", "z"], None)
    call = await asyncpg.connect(db_url)
    watcher = await asyncpg.connect(db_url)
    try:
        tx = call.transaction()
        await tx.start()
        await call.execute("SELECT pg_advisory_xact_lock(hashtextextended('z', 0))")
        importing = asyncio.create_task(
            run(db_url, ACCOUNTS, [*EDGES, f"z,a,{T0 + 9}", f"a,z,{T0 + 9}"])
        )
        waiting = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        for _ in range(6000):  # until the batch has tried the gate (at most a minute)
            if await watcher.fetchval(waiting) or importing.done():
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(1)  # past LOCK_WAIT_MS: that try gives up
        await tx.commit()
        report = await importing
    finally:
        await call.close()
        await watcher.close()
    assert report.retries >= 1
    assert report.edges_added == len(FOLLOWING) + 2
    await assert_counts_equal_lists(db_url)
    following = (await snapshot(db_url))["following"]
    assert ("z", "a", at(T0 + 9), at(T0 + 9)) in following


async def test_an_account_created_meanwhile_makes_the_bulk_step_check_each_id(
    db_url: str, swap_always: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Into an empty graph every account is created by a plain INSERT; when a service call
    created one of the file's ids after the checks (here `c`, committed just before the
    bulk step's insert), that insert fails in its savepoint and the step falls back to
    creating only the ids still absent: `c` keeps its own row, its edges take the locked
    batches, and counts and mutual state come out exact all the same."""
    real = bulk.create_all

    async def service_creates_c_first(conn: asyncpg.Connection[asyncpg.Record]) -> int | None:
        other = await asyncpg.connect(db_url)
        try:
            await other.execute("INSERT INTO accounts (user_id) VALUES ('c')")
            await other.execute("INSERT INTO follow_counts (user_id) VALUES ('c')")
        finally:
            await other.close()
        return await real(conn)

    monkeypatch.setattr(bulk, "create_all", service_creates_c_first)
    report = await run(db_url, ACCOUNTS, EDGES)
    assert report.edges_added == len(FOLLOWING)
    assert report.batches >= 1  # c's edges
    await assert_counts_equal_lists(db_url)
    rows = await snapshot(db_url)
    assert rows["following"] == FOLLOWING
    assert rows["follow_counts"] == COUNTS


async def test_counter_rows_met_by_the_plain_insert_get_the_counts_added(db_url: str) -> None:
    """write_counts into a table already holding one of the counter rows (the plain INSERT
    fails in its savepoint): the counts are added to that row, the others inserted."""
    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute(
            'CREATE TEMP TABLE import_profiles (user_id text COLLATE "C" NOT NULL);'
            ' CREATE TEMP TABLE import_bulk (follower text COLLATE "C" NOT NULL,'
            ' target text COLLATE "C" NOT NULL, at timestamptz NOT NULL,'
            " mutual_since timestamptz);"
            " INSERT INTO import_profiles VALUES ('p'), ('q');"
            " INSERT INTO import_bulk VALUES ('p', 'q', now(), now()), ('q', 'p', now(), now());"
            " INSERT INTO follow_counts (user_id, following) VALUES ('p', 1)"
        )
        async with conn.transaction():
            await bulk.write_counts(conn, "import_profiles")
        rows = await conn.fetch("SELECT * FROM follow_counts ORDER BY user_id")
    finally:
        await conn.close()
    assert [tuple(r) for r in rows] == [("p", 2, 1, 1), ("q", 1, 1, 1)]


_LEFT_TABLES = "SELECT tablename::text FROM pg_tables WHERE tablename LIKE 'import%' ORDER BY 1"


async def test_an_account_created_while_the_tables_were_prebuilt_takes_the_other_way(
    db_url: str, swap_always: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The new edge tables are built before the bulk transaction; when a service call
    creates one of the import's accounts meanwhile, the transaction drops them and writes
    the edges its own way (that account's through the batches): same graph, exact counts,
    nothing of the prebuilt tables left."""
    built: list[prebuild.Prebuilt | None] = []

    async def build_then_create_a(conn: asyncpg.Connection, second: asyncpg.Connection) -> object:
        built.append(await real_build(conn, second))
        await second.execute("INSERT INTO accounts (user_id) VALUES ('a')")
        await second.execute("INSERT INTO follow_counts (user_id) VALUES ('a')")
        return built[-1]

    real_build = prebuild.build
    monkeypatch.setattr(prebuild, "build", build_then_create_a)
    report = await run(db_url, ACCOUNTS, EDGES)
    assert built[0] is not None
    assert built[0].edges == len(FOLLOWING)
    assert report.edges_added == len(FOLLOWING)
    assert report.batches >= 1
    await assert_counts_equal_lists(db_url)
    rows = await snapshot(db_url)
    assert rows["following"] == FOLLOWING
    assert rows["follow_counts"] == COUNTS
    assert await fetch_rows(db_url, _LEFT_TABLES) == []


async def test_what_a_killed_import_left_is_dropped_by_the_next(
    db_url: str, swap_always: None
) -> None:
    """Staging and prebuilt tables are regular tables where two connections read them; a
    killed import leaves them behind, and the next import drops them before its own and
    leaves none of its own."""
    conn = await asyncpg.connect(db_url)
    try:
        for name in ("import_new", "import_edges", "import_swap_following", "import_count_in"):
            await conn.execute(f"CREATE TABLE {name} (junk int)")
    finally:
        await conn.close()
    report = await run(db_url, ACCOUNTS, EDGES)
    assert report.swapped
    await _check(db_url, report)
    assert await fetch_rows(db_url, _LEFT_TABLES) == []


async def test_a_graph_big_enough_to_sample_is_built_in_halves_with_exact_counts(
    db_url: str, swap_always: None
) -> None:
    """40,000 edges (enough pages for the pivot's 1% sample) among 2,000 new accounts, a
    quarter of them with their reverse: built beforehand in two halves of the followers,
    every count, both copies and every mutual state exact (the reverse of an edge lies in
    its half's reverse rows)."""
    users = [f"u{n:05d}" for n in range(2000)]
    edges = ["follower_id,target_id,followed_at"]
    for n in range(20_000):
        a, b = users[(n * 7919) % 2000], users[(n * 104729 + 1) % 2000]
        if a != b and n % 4 == 0:
            edges.append(f"{b},{a},{T0 + n}")
        if a != b:
            edges.append(f"{a},{b},{T0 + n}")
    report = await run(db_url, ["user_id", *users], edges, skip_bad_rows=True)
    assert report.swapped
    assert report.batches == 0
    assert report.edges_added + report.bad_row_count == len(edges) - 1
    await assert_counts_equal_lists(db_url)
    mutual = await fetch_rows(
        db_url, "SELECT count(*) FROM following WHERE mutual_since IS NOT NULL"
    )
    (count,) = mutual[0]
    assert isinstance(count, int)
    assert count > 0
    # the followers table was written in its key's order (each user's fans on neighbouring
    # pages)
    rows = await fetch_rows(db_url, "SELECT user_id, follower_id FROM followers ORDER BY ctid")
    assert len(rows) == report.edges_added
    assert [tuple(r) for r in rows] == sorted(tuple(r) for r in rows)


async def test_only_an_import_of_edges_into_empty_edge_tables_is_paired(db_url: str) -> None:
    """The second connection (and unlogged staging tables) only for an initial load: an
    import into a graph in use keeps to one connection, leaving the other core to the
    service's calls; an import of accounts alone has nothing to pair."""
    conn = await asyncpg.connect(db_url)
    try:
        assert (await Staging.detect(conn, edges=True)).paired
        assert not (await Staging.detect(conn, edges=False)).paired
        await run(db_url, ["user_id", "x", "y"], ["follower_id,target_id", "x,y"])
        assert not (await Staging.detect(conn, edges=True)).paired
    finally:
        await conn.close()
