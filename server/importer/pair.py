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
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
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


async def connect(database_url: str) -> Conn:
    """A connection with the importer's session settings (and without the service pool's
    per-statement timeout: a set-based statement over millions of rows may run minutes)."""
    conn = await asyncpg.connect(database_url, server_settings=SERVER_SETTINGS)
    await conn.execute(SESSION)
    return conn


@dataclass(frozen=True, slots=True)
class Job:
    """Statements run in order on one connection, once the jobs named in `after` have
    finished: each commits on its own, unless the job brackets them in BEGIN ... COMMIT."""

    name: str
    statements: tuple[str, ...]
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
                status = await conn.execute(statement)
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
