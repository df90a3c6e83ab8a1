"""`follow-server import`: the command line over server.importer.transaction.import_graph
(exit 1 on bad rows, on rows the merge refused, or when another import is running)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from server import logs, rules
from server.config import (
    Parser,
    add_database_flags,
    add_progress_flags,
    input_file,
    positive_float,
    positive_int,
)
from server.database import Database, open_database, redact
from server.importer.options import DEFAULT_BATCH_SECONDS, DEFAULT_PAUSE_RATIO, ImportOptions
from server.importer.report import ImportAbortedError, ImportIncompleteError, ImportReport
from server.importer.transaction import ImportBusyError, import_graph

# The package's name, as before the split: the log lines keep naming "server.importer".
log = logging.getLogger("server.importer")

MAX_REPORTED_ROWS = 50


def non_negative_float(text: str) -> float:
    """A number >= 0 (--pause-ratio)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="follow-server import",
        description=(
            "Bulk-load accounts and follow edges from CSV into the database while the "
            "service runs: everything is checked first (any bad row aborts, changing "
            "nothing, unless --skip-bad-rows), then written in short batches (an initial "
            "load of both files into an empty database is worked out in memory and "
            "swapped in at once). Safe to re-run, and an interrupted import is completed "
            "by running it again: edges already present are skipped."
        ),
    )
    parser.add_argument(
        "--accounts",
        metavar="FILE",
        type=input_file,
        help="accounts CSV: user_id[,nick[,face_url]] ('-' for stdin)",
    )
    parser.add_argument(
        "--edges",
        metavar="FILE",
        type=input_file,
        help=(
            "follow edges CSV: follower_id,target_id[,followed_at] with followed_at as Unix "
            "seconds (fraction allowed) or ISO-8601; missing means now ('-' for stdin)"
        ),
    )
    add_database_flags(parser, create=True)
    parser.add_argument(
        "--skip-bad-rows",
        action="store_true",
        help="import the good rows and report the bad ones (default: any bad row aborts)",
    )
    parser.add_argument(
        "--max-following",
        type=positive_int,
        default=int(os.environ.get("FOLLOW_MAX_FOLLOWING", rules.DEFAULT_MAX_FOLLOWING)),
        help="how many users one user may follow; edges beyond it are bad rows "
        "(FOLLOW_MAX_FOLLOWING, default %(default)s)",
    )
    parser.add_argument(
        "--batch-seconds",
        type=positive_float,
        default=DEFAULT_BATCH_SECONDS,
        help="how long each merge transaction should hold its users' locks; batches grow "
        "or shrink to it (default %(default)s)",
    )
    parser.add_argument(
        "--pause-ratio",
        type=non_negative_float,
        default=DEFAULT_PAUSE_RATIO,
        help="after each merge batch, and into a graph in use after each statement before"
        " them, rest this many times as long as it took, leaving the CPU to the service's"
        " calls (0: no rest; default %(default)s)",
    )
    parser.add_argument(
        "--exclusive",
        action="store_true",
        help="for a maintenance window: merge the edges in large batches that hold the edge"
        " tables EXCLUSIVE (the service's reads go on, its writes wait for each batch,"
        " seconds); no per-user locks, several times faster into a populated graph"
        " (one PostgreSQL; on Citus the live batches run)",
    )
    parser.add_argument(
        "--batch-log",
        metavar="FILE",
        help="write one CSV line per try of a merge batch of edges: when it began"
        " (monotonic clock), its seconds, edges, followers, follower range and outcome",
    )
    add_progress_flags(parser)
    return parser


def _open(name: str | None) -> tuple[TextIO | None, int | None]:
    if name is None:
        return None, None
    if name == "-":
        return sys.stdin, None
    path = Path(name)
    return path.open(newline="", encoding="utf-8"), path.stat().st_size


async def _run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    database: Database = await open_database(
        args.database_url or None, args.data_dir, create=args.create_database
    )
    accounts, accounts_size = _open(args.accounts)
    edges, edges_size = _open(args.edges)
    try:
        log.info(
            "importing into %s (database ready in %.1fs)",
            redact(database.url),
            time.perf_counter() - started,
        )
        options = ImportOptions(
            args.skip_bad_rows,
            args.max_following,
            args.progress,
            args.batch_seconds,
            args.pause_ratio,
            exclusive=args.exclusive,
            batch_log=args.batch_log,
        )
        try:
            report = await import_graph(
                database.url,
                accounts,
                edges,
                options,
                accounts_size=accounts_size,
                edges_size=edges_size,
            )
        except ImportIncompleteError as exc:
            _print_bad_rows(exc.report)
            _print_summary(exc.report)
            print(f"import incomplete: {exc}", file=sys.stderr)
            return 1
        except ImportAbortedError as exc:
            _print_bad_rows(exc.report)
            print(f"import aborted: {exc}; use --skip-bad-rows to import the rest", file=sys.stderr)
            return 1
        except ImportBusyError as exc:
            print(f"follow-server import: error: {exc}; wait for it to finish", file=sys.stderr)
            return 1
    finally:
        for stream in (accounts, edges):
            if stream is not None and stream is not sys.stdin:
                stream.close()
        await asyncio.to_thread(database.close)
    _print_bad_rows(report)
    _print_summary(report)
    return 0


def _print_summary(report: ImportReport) -> None:
    log.info("phases: %s", ", ".join(f"{k} {v:.2f}s" for k, v in report.phases.items()))
    log.info("in-memory load: %s", report.in_memory)
    print(
        f"imported {report.accounts_written} account(s) and {report.edges_added} new edge(s)"
        f" ({report.edges_already_present} already present,"
        f" {report.bad_row_count} bad row(s) skipped) in {report.batches} batch(es)"
        f" (largest {report.largest_batch} edges, longest {report.longest_batch:.2f}s),"
        f" {report.seconds:.1f}s ({report.edges_per_second:,.0f} edges/s)",
        file=sys.stderr,
    )


def _print_bad_rows(report: ImportReport) -> None:
    for bad in report.bad_rows[:MAX_REPORTED_ROWS]:
        print(bad, file=sys.stderr)
    if report.bad_row_count > MAX_REPORTED_ROWS:
        more = report.bad_row_count - MAX_REPORTED_ROWS
        print(f"... and {more} more bad row(s)", file=sys.stderr)


def main(argv: Sequence[str]) -> None:
    args = build_parser().parse_args(argv)
    if args.accounts is None and args.edges is None:
        build_parser().error("give --accounts, --edges or both")
    if args.accounts == "-" and args.edges == "-":
        build_parser().error("only one of --accounts and --edges can be read from stdin")
    logs.setup_logging(args.log_level, args.log_format)
    sys.exit(asyncio.run(_run(args)))
