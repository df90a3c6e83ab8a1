"""`follow-server`: run the service (default, or `serve`), or one of the operator
subcommands, each a module with its own `main(argv)`."""

from __future__ import annotations

import asyncio
import importlib
import logging
import sys
from collections.abc import Sequence

from server import logs
from server.app import serve_on, serve_v4_alone
from server.config import Settings, parse_settings
from server.database import Database, open_database, redact
from server.runner import run
from server.tls import TlsConfigError
from server.workers import supervise

log = logging.getLogger(__name__)

# subcommand -> module whose main(argv) runs it
SUBCOMMANDS: dict[str, str] = {
    "check": "server.checker",
    "import": "server.importer",
    "migrate": "server.migrate",
}


def setup_logging(level: str, log_format: str = "text") -> None:
    logs.setup_logging(level, log_format)


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in SUBCOMMANDS:
        importlib.import_module(SUBCOMMANDS[args[0]]).main(args[1:])
        return
    if args and args[0] == "serve":
        args = args[1:]
    settings = parse_settings(args)
    setup_logging(settings.log_level, settings.log_format)
    try:
        run(serve(settings))
    except TlsConfigError as exc:
        sys.exit(f"follow-server: error: {exc}")


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully: the shim alone
    (--grpc-target), N workers (--workers), or one server over its database."""
    if settings.grpc_target:
        await serve_v4_alone(settings)
        return
    if settings.workers > 1:
        await supervise(settings)
        return
    database: Database = await open_database(settings.database_url, settings.data_dir)
    try:
        log.info("database: %s%s", redact(database.url), " (embedded)" if database.embedded else "")
        await serve_on(settings, database.url)
    finally:
        await asyncio.to_thread(database.close)
    log.info("stopped")


if __name__ == "__main__":
    main()
