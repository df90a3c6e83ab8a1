"""The importer's connections (server.importer.pair): jobs run on both at once, each after
the job it waits for, and an error in one job stops the other and is raised; into a graph
in use the one connection rests after each statement."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import asyncpg
import pytest

from server.importer import pair
from server.importer.pair import Job, run_jobs


@pytest.fixture
async def conns(db_url: str) -> AsyncIterator[list[pair.RestingConnection]]:
    both = [await pair.connect(db_url), await pair.connect(db_url)]
    yield both
    for conn in both:
        await conn.close()


async def test_jobs_run_on_both_connections_each_after_the_one_it_waits_for(
    conns: list[pair.RestingConnection],
) -> None:
    """Two independent jobs take one connection each; a job waiting for another runs only
    once that one has finished (else its table would not exist); each job's status is its
    last statement's."""
    conn = conns[0]
    await conn.execute("CREATE TABLE ran (job text, pid int)")
    log = "INSERT INTO ran SELECT '{0}', pg_backend_pid() FROM pg_sleep(0.2)"
    jobs = [
        Job("made", (log.format("made"), "CREATE TABLE made (x int)")),
        Job("other", (log.format("other"),)),
        Job("filled", ("INSERT INTO made SELECT generate_series(1, 3)",), after=("made",)),
    ]
    status = await run_jobs(conns, jobs)
    assert status == {"made": "CREATE TABLE", "other": "INSERT 0 1", "filled": "INSERT 0 3"}
    pids = {r["pid"] for r in await conn.fetch("SELECT pid FROM ran")}
    assert len(pids) == 2
    assert await conn.fetchval("SELECT count(*) FROM made") == 3


async def test_an_error_in_one_job_cancels_the_other_and_is_raised(
    conns: list[pair.RestingConnection],
) -> None:
    """A failing statement ends the run: the other connection's statement is cancelled
    (a 60 s sleep would otherwise hold the test) and the error is raised."""
    jobs = [Job("sleeps", ("SELECT pg_sleep(60)",)), Job("fails", ("SELECT 1 / 0",))]
    with pytest.RaisesGroup(asyncpg.DivisionByZeroError):
        await run_jobs(conns, jobs)
    for conn in conns:
        assert await conn.fetchval("SELECT 1") == 1


async def test_a_job_waiting_for_a_job_not_given_is_refused(
    conns: list[pair.RestingConnection],
) -> None:
    """Waiting for a job that is not in the list would wait forever: refused at once."""
    with pytest.raises(ValueError, match="not given"):
        await run_jobs(conns, [Job("late", ("SELECT 1",), after=("never",))])


async def test_a_resting_connection_rests_after_each_statement_as_long_as_it_took(
    conns: list[pair.RestingConnection],
) -> None:
    """With rest_ratio 1 (the importer into a graph in use), an execute returns only after
    a rest as long as the statement took (a 0.2 s statement: at least 0.4 s in all); the
    rest happens after the statement's work, so the statement's status is unchanged."""
    conn = conns[0]
    conn.rest_ratio = 1.0
    began = time.perf_counter()
    status = await conn.execute("SELECT pg_sleep(0.2)")
    assert time.perf_counter() - began >= 0.4
    assert status == "SELECT 1"
    assert pair.pause_after(5.0, 1.0) == pair.MAX_PAUSE  # a stalled statement rests 1 s
