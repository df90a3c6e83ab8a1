"""`follow-server import` into the database of a running service: the service's writes keep
completing while it runs (its batches hold their users' locks briefly, nothing more), the
graph is sound afterwards, an interrupted import leaves a sound graph that a re-run
completes, and accounts being deleted are refused rather than given edges."""

from __future__ import annotations

import asyncio
import io
import random
import signal
import time
from pathlib import Path

import asyncpg
import grpc
import pytest

from follow.v1 import follow_pb2 as pb
from follow.v1 import follow_pb2_grpc as pb_grpc
from server.checker import check, finish_pending_deletions
from server.database import create_pool
from server.importer import (
    ImportAbortedError,
    ImportIncompleteError,
    ImportOptions,
    import_graph,
    merge,
    transaction,
)
from server.store import Store
from tests.conftest import ServiceFactory
from tests.helpers import follow_server
from tests.invariants import assert_sound

CAP = 5000
QUIET = ImportOptions(progress=False)
T0 = 1_700_000_000
USERS = [f"u{i:05d}" for i in range(20_000)]
CELEBRITY = USERS[0]
CLIENTS = 8  # users acting through the service meanwhile, all of them in the imported graph


def graph_edges(edges: int, seed: int = 7) -> list[str]:
    """A power-law-ish graph over USERS: everyone follows the celebrity, each user follows a
    few others, a quarter of the follows returned. Distinct edges, no self-follows."""
    rng = random.Random(seed)
    chosen: dict[tuple[str, str], int] = {}
    for i, u in enumerate(USERS[1:]):
        chosen[u, CELEBRITY] = T0 + i
    while len(chosen) < edges:
        a = USERS[int(len(USERS) * rng.random() ** 2)]
        b = USERS[int(len(USERS) * rng.random() ** 3)]
        if a != b and (a, b) not in chosen:
            chosen[a, b] = T0 + len(chosen)
            if rng.random() < 0.25 and (b, a) not in chosen:
                chosen[b, a] = T0 + len(chosen)
    return [f"{a},{b},{at}" for (a, b), at in list(chosen.items())[:edges]]


def write_csv(path: Path, header: str, lines: list[str]) -> Path:
    path.write_text(header + "\n" + "".join(f"{line}\n" for line in lines))
    return path


async def seed_accounts(db_url: str) -> None:
    accounts = io.StringIO("user_id\n" + "".join(f"{u}\n" for u in USERS))
    await import_graph(db_url, accounts, None, QUIET)


async def run_import_command(db_url: str, edges: Path, *extra: str) -> tuple[int, str]:
    """`follow-server import` in its own process; its exit status and stderr."""
    args = ("import", "--database-url", db_url, "--edges", str(edges), "--no-progress", *extra)
    async with follow_server(*args, stop_timeout=120) as importing:
        code = await asyncio.wait_for(importing.process.wait(), 300)
        await asyncio.sleep(0.1)  # the last lines
        return code, importing.text()


async def test_service_writes_keep_completing_during_an_import(
    db_url: str, make_service: ServiceFactory, tmp_path: Path
) -> None:
    """A 100,000-edge import (its own process) into the database of a running service while
    8 users of the imported graph follow and unfollow through gRPC without pause, among
    them the celebrity most of the graph follows and users whose own follows the import
    adds: every call succeeds (or, on a machine too loaded to hand it a connection within the
    service's 2 s, answers OVERLOADED; counted and printed), none waits more than a
    generous 5 s, and most succeed (the import's batches
    hold their users' locks for a fraction of a second; the worst is printed), calls keep
    completing while the import runs, and afterwards every invariant holds (counts equal
    the lists, both copies, mutual state) and the checker finds nothing."""
    await seed_accounts(db_url)
    lines = graph_edges(100_000)
    edges = write_csv(tmp_path / "edges.csv", "follower_id,target_id,followed_at", lines)
    running = await make_service()
    clients = USERS[1 : 1 + CLIENTS]
    latencies: list[tuple[float, float]] = []  # (finished at, seconds)
    overloaded: list[float] = []  # calls answered RESOURCE_EXHAUSTED / OVERLOADED
    stop = asyncio.Event()

    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = pb_grpc.FollowServiceStub(channel)

        async def client(i: int) -> None:
            me = clients[i]
            # The celebrity, and two users the import's followers lock in their batches.
            targets = [CELEBRITY, USERS[2 + CLIENTS + i], USERS[100 + i]]
            rng = random.Random(i)
            while not stop.is_set():
                them = rng.sample(targets, 2)
                for call in (
                    stub.Follow(pb.FollowRequest(user_id=me, target_ids=them), timeout=30),
                    stub.Unfollow(pb.UnfollowRequest(user_id=me, target_ids=them[:1]), timeout=30),
                ):
                    started = time.perf_counter()
                    try:
                        response = await call
                    except grpc.aio.AioRpcError as exc:
                        # The service's own bound on waiting for a connection (2 s): counted
                        # as a wait that long, and as an answer that was not a success.
                        if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                            raise
                        overloaded.append(time.perf_counter() - started)
                    else:
                        if isinstance(response, pb.FollowResponse):
                            assert {r.code for r in response.results} == {pb.RESULT_CODE_OK}
                    latencies.append((time.perf_counter(), time.perf_counter() - started))

        background = [asyncio.create_task(client(i)) for i in range(CLIENTS)]
        try:
            await asyncio.sleep(0.5)
            began = time.perf_counter()
            code, output = await run_import_command(db_url, edges)
            ended = time.perf_counter()
            await asyncio.sleep(0.3)
        finally:
            stop.set()
            await asyncio.gather(*background)
    assert code == 0, output
    during = [s for at, s in latencies if began <= at <= ended]
    worst = max(s for _, s in latencies)
    print(
        f"\n[import live] {len(lines):,} edges in {ended - began:.1f}s; {len(during)} calls"
        f" completed meanwhile, others' worst call {worst * 1000:.0f} ms,"
        f" {len(overloaded)} answered OVERLOADED"
    )
    assert len(during) >= 20, "the service's writes stopped while the import ran"
    assert len(overloaded) <= len(latencies) // 10, overloaded
    assert worst < 5.0, worst

    conn = await asyncpg.connect(db_url)
    try:
        await assert_sound(conn, CAP)
        assert (await check(conn, max_following=CAP)).total == 0
        # Every imported edge is there, but those the clients unfollowed after it came.
        stored = await conn.fetchval("SELECT count(*) FROM following")
        assert len(lines) - 3 * CLIENTS <= stored <= len(lines) + 3 * CLIENTS
    finally:
        await conn.close()


async def test_an_import_killed_mid_merge_leaves_a_sound_graph_and_a_rerun_completes_it(
    db_url: str, tmp_path: Path
) -> None:
    """kill -9 of `follow-server import` once some of its batches have committed: what
    is there is a sound graph (counts equal lists, both copies, mutual state) holding part
    of the edges; running the same import again adds exactly the rest."""
    await seed_accounts(db_url)
    lines = graph_edges(60_000)
    edges = write_csv(tmp_path / "edges.csv", "follower_id,target_id,followed_at", lines)
    conn = await asyncpg.connect(db_url)
    try:
        args = ("import", "--database-url", db_url, "--edges", str(edges), "--no-progress")
        async with follow_server(*args) as importing:
            async with asyncio.timeout(120):
                while not await conn.fetchval("SELECT count(*) > 0 FROM following"):
                    assert importing.process.returncode is None, importing.text()
                    await asyncio.sleep(0.01)
            importing.process.send_signal(signal.SIGKILL)
            await importing.process.wait()
        half = await conn.fetchval("SELECT count(*) FROM following")
        assert 0 < half < len(lines), "the kill did not land mid-merge"
        await assert_sound(conn, CAP)

        with edges.open() as stream:
            report = await import_graph(db_url, None, stream, QUIET)
        assert report.edges_already_present == half
        assert report.edges_added == len(lines) - half
        assert await conn.fetchval("SELECT count(*) FROM following") == len(lines)
        await assert_sound(conn, CAP)
    finally:
        await conn.close()


async def test_an_exception_mid_merge_leaves_a_sound_graph_and_a_rerun_completes_it(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure in the middle of the merge (the batch after two committed ones raises)
    rolls back that batch only: the graph holds the first two batches' edges, sound; a
    re-run adds the rest. (Committed batches are counted, not tries: on a loaded machine
    a try may run past its time budget and be tried again smaller.)"""
    await seed_accounts(db_url)
    lines = graph_edges(30_000)
    real = merge._write_batch
    committed = 0

    async def failing(*args: object, **kwargs: object) -> None:
        nonlocal committed
        if committed == 2:
            raise RuntimeError("boom")
        await real(*args, **kwargs)  # type: ignore[arg-type]
        committed += 1

    monkeypatch.setattr(merge, "_write_batch", failing)
    with pytest.raises(RuntimeError, match="boom"):
        await import_graph(db_url, None, io.StringIO("\n".join(lines)), QUIET)
    monkeypatch.setattr(merge, "_write_batch", real)
    conn = await asyncpg.connect(db_url)
    try:
        half = await conn.fetchval("SELECT count(*) FROM following")
        assert 0 < half < len(lines)
        await assert_sound(conn, CAP)
        report = await import_graph(db_url, None, io.StringIO("\n".join(lines)), QUIET)
        assert (report.edges_already_present, report.edges_added) == (half, len(lines) - half)
        await assert_sound(conn, CAP)
    finally:
        await conn.close()


async def pending_deletion(conn: asyncpg.Connection, user_id: str) -> None:
    """An account deleted whose cleanup has not run yet: tombstone, no account, no counter
    row (what DeleteAccounts commits), its edges still there."""
    await conn.execute("INSERT INTO account_tombstones (user_id) VALUES ($1)", user_id)
    for table in ("follow_count_deltas", "follow_counts", "accounts"):
        await conn.execute(f"DELETE FROM {table} WHERE user_id = $1", user_id)


async def test_accounts_being_deleted_are_refused_then_importable_once_cleaned(
    db_url: str,
) -> None:
    """While an account's deletion is pending, importing the id again is a bad row ('is
    being deleted'), and so is every edge naming it; by default that aborts the import,
    changing nothing; with --skip-bad-rows the rest goes in. Once the cleanup has run the
    same import creates a new account with only the new edges, none of the old ones."""
    await import_graph(
        db_url, io.StringIO("a\nb\nc\n"), io.StringIO(f"a,b,{T0}\nb,c,{T0}\nc,b,{T0}\n"), QUIET
    )
    conn = await asyncpg.connect(db_url)
    try:
        await pending_deletion(conn, "b")
        accounts = "user_id\nd\nb\n"
        edges = f"d,b,{T0 + 1}\nb,d,{T0 + 2}\nd,a,{T0 + 3}\n"
        with pytest.raises(ImportAbortedError) as raised:
            await import_graph(db_url, io.StringIO(accounts), io.StringIO(edges), QUIET)
        bad = [(b.source, b.line, b.problem) for b in raised.value.report.bad_rows]
        assert bad == [
            (
                "accounts",
                3,
                "account b is being deleted (its edges are still being removed);"
                " import it again later",
            ),
            (
                "edges",
                1,
                "target_id: account b is being deleted (its edges are still being"
                " removed); import it again later",
            ),
            (
                "edges",
                2,
                "follower_id: account b is being deleted (its edges are still being"
                " removed); import it again later",
            ),
        ]
        assert not await conn.fetchval("SELECT true FROM accounts WHERE user_id = 'd'")

        skipping = ImportOptions(progress=False, skip_bad_rows=True)
        report = await import_graph(db_url, io.StringIO(accounts), io.StringIO(edges), skipping)
        assert (report.accounts_written, report.edges_added) == (1, 1)

        assert await finish_pending_deletions(db_url) == 1
        await assert_sound(conn, CAP)
        report = await import_graph(db_url, io.StringIO(accounts), io.StringIO(edges), QUIET)
        assert report.edges_added == 2
        rows = await conn.fetch("SELECT user_id, target_id FROM following ORDER BY 1, 2")
        assert [tuple(r) for r in rows] == [("b", "d"), ("d", "a"), ("d", "b")]
        await assert_sound(conn, CAP)
    finally:
        await conn.close()


async def test_an_account_deleted_between_the_checks_and_the_merge_gets_no_edges(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An account deleted through the service after the import checked its rows but before
    the merge reached them: the merge, holding its locks, finds the account gone and
    refuses those edges as bad rows ('was deleted while the import ran'), imports the rest,
    and ends with ImportIncompleteError; once the deletion's cleanup has run the graph is
    sound and holds no edge of the deleted account."""
    await import_graph(db_url, io.StringIO("a\nb\nc\n"), None, QUIET)
    real = merge.write_edges

    async def delete_first(*args: object, **kwargs: object) -> None:
        pool = await create_pool(db_url, 2)
        try:
            await Store(pool).delete_accounts(["c"])
        finally:
            await pool.close()
        await real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(transaction, "write_edges", delete_first)
    edges = f"a,b,{T0}\na,c,{T0}\nc,a,{T0}\nb,a,{T0 + 1}\n"
    with pytest.raises(ImportIncompleteError) as raised:
        await import_graph(db_url, None, io.StringIO(edges), QUIET)
    report = raised.value.report
    assert [(b.line, b.problem) for b in report.bad_rows] == [
        (2, "target_id: account c was deleted while the import ran"),
        (3, "follower_id: account c was deleted while the import ran"),
    ]
    assert report.edges_added == 2
    await finish_pending_deletions(db_url)
    conn = await asyncpg.connect(db_url)
    try:
        rows = await conn.fetch("SELECT user_id, target_id, mutual_since FROM following")
        assert sorted((r[0], r[1], r[2] is not None) for r in rows) == [
            ("a", "b", True),
            ("b", "a", True),
        ]
        await assert_sound(conn, CAP)
    finally:
        await conn.close()


async def test_a_second_import_at_once_is_refused(db_url: str) -> None:
    """One import per database at a time (on Citus the staging tables have fixed names):
    a second one while the first holds the import lock fails at once, changing nothing."""
    holder = await asyncpg.connect(db_url)
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", 0x696D706F7274)
        with pytest.raises(transaction.ImportBusyError):
            await import_graph(db_url, io.StringIO("a\n"), None, QUIET)
        assert not await holder.fetchval("SELECT true FROM accounts")
    finally:
        await holder.close()


async def test_follows_made_between_the_checks_and_the_merge_count_against_the_cap(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The service follows for users of the import after its checks: under the merge's
    locks an edge the service added is counted as present, and a follower the service took
    closer to the cap keeps its earliest new follows; the later ones are refused as bad rows
    ('following limit reached ... while the import ran'), and the counts stay exact."""
    await import_graph(db_url, io.StringIO("a\nb\nc\nd\ne\n"), None, QUIET)
    real = merge.write_edges

    async def follow_first(*args: object, **kwargs: object) -> None:
        pool = await create_pool(db_url, 2)
        try:
            store = Store(pool)
            await store.follow("a", ["e"], 3)
            await store.follow("b", ["a"], 3)
        finally:
            await pool.close()
        await real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(transaction, "write_edges", follow_first)
    edges = f"a,d,{T0 + 2}\na,b,{T0}\na,c,{T0 + 1}\nb,a,{T0}\nc,a,{T0}\n"
    capped = ImportOptions(progress=False, max_following=3)
    with pytest.raises(ImportIncompleteError) as raised:
        await import_graph(db_url, None, io.StringIO(edges), capped)
    report = raised.value.report
    assert [(b.line, b.problem) for b in report.bad_rows] == [
        (
            1,
            "following limit reached: a would follow more than 3 users"
            " (the service added follows while the import ran)",
        ),
    ]
    assert (report.edges_added, report.edges_already_present) == (3, 1)
    conn = await asyncpg.connect(db_url)
    try:
        rows = await conn.fetch("SELECT user_id, target_id FROM following ORDER BY 1, 2")
        assert [tuple(r) for r in rows] == [
            ("a", "b"),
            ("a", "c"),
            ("a", "e"),
            ("b", "a"),
            ("c", "a"),
        ]
        await assert_sound(conn, 3)
    finally:
        await conn.close()
