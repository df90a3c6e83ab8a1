"""The importer's two connections, and statements run on both at once.

The set-based steps of an import (the checks over millions of staged rows, the new edge
tables and their indexes) are each one statement, which PostgreSQL mostly runs on one core
(INSERT ... SELECT takes no parallel plan; CREATE INDEX can). Many of them do not depend on
each other: the bad-row check and the edges' de-duplication read the same staged rows, and
the following table, the followers table and each of their indexes are built from
import_new. So on one PostgreSQL, for an import into empty edge tables (an initial load:
into a graph a service is using, the importer keeps to one core,
server.importer.staging.Staging.detect), the importer opens a second connection and runs
such statements two at a time (run_jobs). On 2 cores that cut the checks of 5,000,000 edges
from 21 to 16 s; the build of the new edge tables took as long as on one connection (see
the README's import figures). The relations both connections read are regular unlogged
tables (server.importer.staging: `shared`), since a temporary table is its session's alone.

Both connections get the importer's session settings (SESSION).

Into a graph a service is using (not paired), the importer's one connection keeps to one
core (ONE_CORE: no parallel workers) and rests after each statement (RestingConnection,
ImportOptions.pause_ratio times as long as the statement took, as the merge does after each
batch): on a small machine a set-based check over the staged rows otherwise holds a core
for seconds while the service's calls share the other (bench-ops measured the slowest calls
of other users during a live import in these steps, meeting no lock of the import's).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import asyncpg

if TYPE_CHECKING:
    Conn = asyncpg.Connection[asyncpg.Record]

# Set-based steps over millions of rows want memory for sorts, hashes and the temporary
# staging tables (temp_buffers only counts before the first temporary table is touched).
# JIT compiling would cost more than it saves on these plans (seconds of LLVM on a busy
# machine). On Citus these apply to the coordinator's own work; the workers keep theirs.
# The merge's many short transactions commit without waiting for their WAL flush: a crash
# may lose the last few batches whole (never part of one), which a re-run adds again.
SESSION = """
SET synchronous_commit = off;
SET work_mem = '256MB';
SET maintenance_work_mem = '1GB';
SET temp_buffers = '1GB';
SET jit = off;
"""
SERVER_SETTINGS = {"application_name": "follow-server import"}
# Into a graph in use: one core for the importer's statements (an INSERT ... SELECT takes no
# parallel plan anyway; a SELECT, an ANALYZE's neighbours and CREATE INDEX could).
ONE_CORE = "SET max_parallel_workers_per_gather = 0; SET max_parallel_maintenance_workers = 0"

MAX_PAUSE = 1.0  # seconds: a statement or batch slowed by a stall must not make it sleep long


def pause_after(seconds: float, ratio: float) -> float:
    """How long the importer rests after a statement or a merge batch that took `seconds`
    (ImportOptions.pause_ratio times as long, at most MAX_PAUSE): the duty cycle that leaves
    the CPU to the service."""
    return min(seconds * ratio, MAX_PAUSE)


if TYPE_CHECKING:
    _Connection = asyncpg.Connection[asyncpg.Record]
else:  # generic in the type stubs only
    _Connection = asyncpg.Connection


class RestingConnection(_Connection):
    """The importer's connection: with `rest_ratio` > 0, each `execute` is followed by a
    rest of pause_after(its seconds, rest_ratio). Set while no transaction holds locks that
    the service's calls wait for (the staging steps, the bulk step, ANALYZE); 0 during the
    merge's batches, which rest between their transactions instead (server.importer.merge)."""

    rest_ratio = 0.0

    async def execute(
        self,
        query: str,
        *args: object,
        timeout: float | None = None,  # noqa: ASYNC109 - asyncpg's own signature
    ) -> str:
        began = time.perf_counter()
        status = await super().execute(query, *args, timeout=timeout)
        await self.rest(time.perf_counter() - began)
        return status

    async def rest(self, seconds: float) -> None:
        """Rest after `seconds` of work (nothing when rest_ratio is 0)."""
        if self.rest_ratio > 0:
            await asyncio.sleep(pause_after(seconds, self.rest_ratio))


def rests(conn: Conn) -> bool:
    """Whether `conn` rests after each statement (the importer's, into a graph in use)."""
    return isinstance(conn, RestingConnection) and conn.rest_ratio > 0


async def connect(database_url: str) -> RestingConnection:
    """A connection with the importer's session settings (and without the service pool's
    per-statement timeout: a set-based statement over millions of rows may run minutes)."""
    conn = await asyncpg.connect(
        database_url, server_settings=SERVER_SETTINGS, connection_class=RestingConnection
    )
    await conn.execute(SESSION)
    return conn


# A step of a job that is not one statement (a COPY, say): called with the connection.
Step = Callable[["Conn"], Awaitable[str]]


@dataclass(frozen=True, slots=True)
class Job:
    """Statements (or steps) run in order on one connection, once the jobs named in `after`
    have finished: each commits on its own, unless the job brackets them in BEGIN ...
    COMMIT (or a step in a transaction)."""

    name: str
    statements: tuple[str | Step, ...]
    after: tuple[str, ...] = ()


async def run_jobs(conns: Sequence[Conn], jobs: Sequence[Job]) -> dict[str, str]:
    """Run `jobs` on `conns`, each connection taking the first job in `jobs`' order whose
    `after` jobs have finished (so list the longest first). The status of each job's last
    statement, by name. An error in one job cancels the others and is raised."""
    pending = list(jobs)
    done: dict[str, str] = {}
    changed = asyncio.Condition()

    def ready() -> Job | None:
        return next((j for j in pending if all(a in done for a in j.after)), None)

    async def work(conn: Conn) -> None:
        while True:
            async with changed:
                await changed.wait_for(lambda: not pending or ready() is not None)
                job = ready()
                if job is None:
                    return
                pending.remove(job)
            status = ""
            for statement in job.statements:
                if isinstance(statement, str):
                    status = await conn.execute(statement)
                else:
                    status = await statement(conn)
            async with changed:
                done[job.name] = status
                changed.notify_all()

    names = {j.name for j in jobs}
    unknown = [a for j in jobs for a in j.after if a not in names]
    if unknown:
        raise ValueError(f"jobs wait for jobs that are not given: {unknown}")
    async with asyncio.TaskGroup() as group:
        for conn in conns:
            group.create_task(work(conn))
    return done
