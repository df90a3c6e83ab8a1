"""`follow-server migrate`: bring the database's schema up to date and exit.

The server does the same at every start; this is for operators who want it as its own step,
for example right after adding Citus to an existing single-node database: the migrations see
the `citus` extension and distribute every table, rows included (server.migrations).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from server import logs
from server.config import Parser, add_database_flags
from server.database import open_database, redact
from server.migrations import apply_migrations


async def _run(args: argparse.Namespace) -> int:
    database = await open_database(args.database_url, args.data_dir)
    try:
        report = await apply_migrations(database.url)
    finally:
        await asyncio.to_thread(database.close)
    print(f"follow-server migrate: {redact(database.url)}")
    print(f"  migrations applied now: {report.applied or 'none (up to date)'}")
    if report.distributed:
        for placed in report.distributed:
            with_ = f", co-located with {placed.colocated_with}" if placed.colocated_with else ""
            print(f"  distributed {placed.table}: {placed.placement}{with_}")
    return 0


def main(argv: Sequence[str]) -> None:
    parser = Parser(
        prog="follow-server migrate",
        description="Apply pending schema migrations (and, on Citus, distribute the tables).",
    )
    add_database_flags(parser)
    args = parser.parse_args(argv)
    logs.setup_logging(args.log_level, args.log_format)
    sys.exit(asyncio.run(_run(args)))
