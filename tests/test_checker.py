"""The invariant checker (server/checker.py) finds each kind of corruption and repairs it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator

import asyncpg
import pytest

from server.app import RunningService
from server.checker import check
from server.store import AccountInput
from tests.conftest import ServiceFactory, skip_on_citus


@pytest.fixture
async def graph(make_service: ServiceFactory) -> RunningService:
    """a<->b mutual, a->c, c->d, d->a, plus an isolated e: a small graph built through the API."""
    return await make_service()


async def _build(running: RunningService) -> None:
    await running.core.import_accounts([AccountInput(u, None, None) for u in "abcde"])
    for user, targets in {"a": ["b", "c"], "b": ["a"], "c": ["d"], "d": ["a"]}.items():
        results = await running.core.follow(user, targets)
        assert all(r.code == 0 for r in results)


@pytest.fixture
async def conn(db_url: str, graph: RunningService) -> AsyncIterator[asyncpg.Connection]:
    await _build(graph)
    connection = await asyncpg.connect(db_url)
    yield connection
    await connection.close()


async def test_clean_graph_has_no_violations(conn: asyncpg.Connection) -> None:
    """A graph written only by the service satisfies every invariant."""
    report = await check(conn)
    assert report.total == 0, report.violations
    assert set(report.violations) >= {
        "edge_to_missing_account",
        "missing_edge_copy",
        "edge_time_mismatch",
        "mutual_asymmetric",
        "counter_rows",
        "counts_differ",
        "over_cap",
    }


CORRUPTIONS = {
    "missing_edge_copy": "DELETE FROM followers WHERE user_id = 'c' AND follower_id = 'a'",
    "edge_time_mismatch": "UPDATE followers SET followed_at = followed_at - interval '1 day'"
    " WHERE user_id = 'd' AND follower_id = 'c'",
    "mutual_asymmetric": "UPDATE following SET mutual_since = NULL"
    " WHERE user_id = 'a' AND target_id = 'b'",
    "counts_differ": "UPDATE follow_counts SET followers = followers + 7 WHERE user_id = 'e'",
    "counter_rows": "DELETE FROM follow_counts WHERE user_id = 'e'",
    "edge_to_missing_account": "INSERT INTO following (user_id, target_id, followed_at)"
    " VALUES ('e', 'ghost', now())",
}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(
            name,
            marks=skip_on_citus(
                "Citus refuses this corruption's own UPDATE (followed_at - interval: a STABLE"
                " function over a column in an UPDATE)"
            ),
        )
        if name == "edge_time_mismatch"
        else name
        for name in sorted(CORRUPTIONS)
    ],
)
async def test_each_corruption_is_found_and_repaired(conn: asyncpg.Connection, name: str) -> None:
    """Each kind of damage is reported under its invariant, and --repair leaves none."""
    before = await conn.fetch(
        "SELECT user_id, following, followers, mutual FROM follow_totals ORDER BY user_id"
    )
    await conn.execute(CORRUPTIONS[name])
    report = await check(conn)
    assert report.violations[name] > 0
    assert report.samples[name], "a violation comes with an example row"

    repaired = await check(conn, repair=True)
    assert repaired.total == 0, repaired.violations
    assert name in repaired.repaired
    after = await conn.fetch(
        "SELECT user_id, following, followers, mutual FROM follow_totals ORDER BY user_id"
    )
    # Every corruption above is repaired back to the graph the service wrote.
    assert after == before


async def test_over_cap_is_reported_not_repaired(conn: asyncpg.Connection) -> None:
    """A user over the cap is a violation the checker reports but does not 'fix'."""
    report = await check(conn, max_following=1, repair=True)
    assert report.violations["over_cap"] == 1  # a follows b and c
    assert report.samples["over_cap"][0]["user_id"] == "a"
    assert await conn.fetchval("SELECT count(*) FROM following WHERE user_id = 'a'") == 2


async def test_cli_exit_codes(conn: asyncpg.Connection, db_url: str) -> None:
    """`follow-server check` exits 0 on a clean graph, 1 with violations, 0 after --repair."""
    env = {**os.environ, "FOLLOW_DATABASE_URL": db_url}

    def run(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "server", "check", *extra],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    clean = run()
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "total violations: 0" in clean.stdout
    await conn.execute(CORRUPTIONS["counts_differ"])
    broken = run()
    assert broken.returncode == 1
    assert "counts_differ" in broken.stdout
    assert "1 violation(s)" in broken.stdout
    fixed = run("--repair")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert "repaired 1" in fixed.stdout
