"""Command-line flags, each with a FOLLOW_* environment equivalent, into one Settings object.

A flag given on the command line wins over its environment variable, which wins over the
default.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from server import rules


@dataclass(frozen=True, slots=True)
class Settings:
    grpc_listen: str = "127.0.0.1:50051"
    database_url: str | None = None
    data_dir: Path = Path("var/pgdata")
    max_following: int = rules.DEFAULT_MAX_FOLLOWING
    log_level: str = "INFO"
    db_pool_size: int = 10
    grace_seconds: float = 10.0


def _env(name: str, default: str | None) -> str | None:
    return os.environ.get(f"FOLLOW_{name.upper()}", default)


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def add_database_flags(parser: argparse.ArgumentParser) -> None:
    """Flags every subcommand that opens the database shares."""
    d = Settings()
    parser.add_argument(
        "--database-url",
        default=_env("database_url", None),
        help="PostgreSQL URL (FOLLOW_DATABASE_URL); without it an embedded server is started",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(_env("data_dir", str(d.data_dir)) or d.data_dir),
        help="embedded PostgreSQL data folder, kept across restarts (FOLLOW_DATA_DIR)",
    )
    parser.add_argument(
        "--log-level",
        default=(_env("log_level", d.log_level) or d.log_level).upper(),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        type=str.upper,
        help="log level (FOLLOW_LOG_LEVEL)",
    )


def build_parser() -> argparse.ArgumentParser:
    d = Settings()
    parser = argparse.ArgumentParser(
        prog="follow-server",
        description="Follow/fan relationship service: gRPC follow.v1 over PostgreSQL.",
    )
    parser.add_argument(
        "--grpc-listen",
        default=_env("grpc_listen", d.grpc_listen),
        metavar="HOST:PORT",
        help="gRPC listen address (FOLLOW_GRPC_LISTEN, default %(default)s)",
    )
    add_database_flags(parser)
    parser.add_argument(
        "--max-following",
        type=_positive_int,
        default=int(_env("max_following", str(d.max_following)) or d.max_following),
        help="how many users one user may follow (FOLLOW_MAX_FOLLOWING, default %(default)s)",
    )
    parser.add_argument(
        "--db-pool-size",
        type=_positive_int,
        default=int(_env("db_pool_size", str(d.db_pool_size)) or d.db_pool_size),
        help="database connections per process (FOLLOW_DB_POOL_SIZE, default %(default)s)",
    )
    parser.add_argument(
        "--grace-seconds",
        type=float,
        default=float(_env("grace_seconds", str(d.grace_seconds)) or d.grace_seconds),
        help="how long shutdown waits for in-flight calls (FOLLOW_GRACE_SECONDS)",
    )
    return parser


def parse_settings(argv: Sequence[str] | None = None) -> Settings:
    args = build_parser().parse_args(argv)
    return Settings(
        grpc_listen=args.grpc_listen,
        database_url=args.database_url or None,
        data_dir=args.data_dir,
        max_following=args.max_following,
        log_level=args.log_level,
        db_pool_size=args.db_pool_size,
        grace_seconds=args.grace_seconds,
    )
