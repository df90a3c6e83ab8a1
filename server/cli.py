"""`follow-server`: run the service (default, or `serve`), or one of the operator
subcommands, each a module with its own `main(argv)`."""

from __future__ import annotations

import asyncio
import importlib
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

from server import logs
from server.app import serve
from server.config import parse_settings
from server.tls import TlsConfigError

# subcommand -> module whose main(argv) runs it
SUBCOMMANDS: dict[str, str] = {
    "check": "server.checker",
    "import": "server.importer",
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


def run(main: Coroutine[Any, Any, None]) -> None:
    """asyncio.run on uvloop where it is installed: grpc.aio and asyncpg both run on it, and
    its loop costs less per call than the default one."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)


if __name__ == "__main__":
    main()
