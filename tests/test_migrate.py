"""server.migrate: `follow-server migrate` applies pending migrations and says so; a second
run finds nothing to do."""

from __future__ import annotations

import asyncio
import os
import sys

import asyncpg

from server.migrations import MIGRATIONS
from tests.helpers import REPO


async def run_migrate(*args: str) -> tuple[int, str, str]:
    """`follow-server migrate ARGS` as a process: exit status, stdout, stderr."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FOLLOW_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "server",
        "migrate",
        *args,
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_migrate_applies_then_finds_nothing_to_do(db_url: str) -> None:
    conn = await asyncpg.connect(db_url)
    try:
        # The scratch database is migrated already: start from an empty one.
        await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    finally:
        await conn.close()
    code, out, err = await run_migrate("--database-url", db_url)
    assert code == 0, out + err
    assert f"migrations applied now: {[v for v, _, _ in MIGRATIONS]}" in out
    code, out, err = await run_migrate("--database-url", db_url)
    assert code == 0, out + err
    assert "migrations applied now: none (up to date)" in out


async def test_a_bad_flag_is_one_line_and_exit_2(db_url: str) -> None:
    """A mistyped flag gets the one-line error every follow-server command gives (not an
    argparse usage block), exit status 2, and nothing is migrated."""
    code, out, err = await run_migrate("--databse-url", db_url)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    assert "--databse-url" in lines[0]
    assert "follow-server migrate --help" in lines[0]
    assert out == ""
