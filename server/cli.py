"""`follow-server`: run the service (default, or `serve`), or one of the operator
subcommands, each a module with its own `main(argv)`.

Every mistake and every failed start ends here as one line on stderr (one JSON object with
--log-format json) and an exit status: 2 for a usage or configuration mistake (found before
anything is started wherever it can be: addresses, ports, TLS files, the data folder, the
database URL), 1 for a failure at run time. No traceback reaches the operator for either.
"""

from __future__ import annotations

import asyncio
import errno
import importlib
import logging
import os
import socket
import sys
from collections.abc import Sequence

from server import logs, tls
from server.config import PROGRAM, Settings, parse_settings, requested_log_format, split_host_port
from server.database import Database, open_database, redact
from server.errors import ConfigError, StartupError
from server.runner import run

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
    log_format = requested_log_format(args)
    # The embedded PostgreSQL is started and stopped through subprocesses; gRPC's fork
    # handlers only print "skipping fork() handlers" for them (no process here forks to run
    # gRPC in the child).
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
    program = PROGRAM
    try:
        if args and args[0] in SUBCOMMANDS:
            program = f"{PROGRAM} {args[0]}"
            importlib.import_module(SUBCOMMANDS[args[0]]).main(args[1:])
            return
        if args and args[0] == "serve":
            args = args[1:]
        elif args and not args[0].startswith("-"):
            raise ConfigError(
                f"unknown command {args[0]!r}: the commands are serve (the default),"
                f" {', '.join(SUBCOMMANDS)} (see {PROGRAM} --help)"
            )
        settings = parse_settings(args)
        setup_logging(settings.log_level, settings.log_format)
        preflight(settings)
        run(serve(settings))
    except (ConfigError, StartupError) as exc:
        logs.print_fatal(str(exc), log_format, program)
        sys.exit(exc.exit_code)
    except OSError as exc:
        if exc.filename is None:
            raise
        # A file named on the command line (a subcommand's input) that cannot be opened.
        logs.print_fatal(f"cannot open {exc.filename}: {exc.strerror}", log_format, program)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


def check_can_listen(address: str, flag: str, *, count: int = 1) -> None:
    """Bind (and release) `address` the way the servers will, before anything is started:
    a port already taken is a StartupError, a host that is not this machine's a ConfigError.
    `count` checks that many consecutive ports (one per worker)."""
    host, first = split_host_port(address)
    for port in (first,) if first == 0 else range(first, first + count):
        _probe(host, port, f"{flag} {address}" if count == 1 else f"{flag} port {port}")


def _probe(host: str, port: int, what: str) -> None:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        raise ConfigError(f"{what}: the host name {host!r} does not resolve") from None
    failures: list[OSError] = []
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                failures.append(exc)
    codes = {exc.errno for exc in failures}
    if errno.EADDRINUSE in codes:
        raise StartupError(
            f"{what}: the port is already in use by another process; stop it or choose another port"
        )
    if len(failures) < len(infos):
        return  # at least one of the host's addresses can be bound, as gRPC needs
    if errno.EADDRNOTAVAIL in codes:
        raise ConfigError(
            f"{what}: {host} is not an address of this machine; give one of its own,"
            " 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)"
        )
    if errno.EACCES in codes:
        raise ConfigError(f"{what}: no permission to listen on port {port} (below 1024)")
    raise StartupError(f"{what}: cannot listen: {failures[0].strerror}")


def preflight(settings: Settings) -> None:
    """What can be checked before the database starts: TLS files load, ports are free."""
    tls.load(tls.tls_files(settings.tls_cert, settings.tls_key, settings.tls_client_ca))
    tls.http_ssl_context(settings.http_tls_cert, settings.http_tls_key)
    if not settings.grpc_target:
        check_can_listen(settings.grpc_listen, "--grpc-listen")
    if settings.http_listen:
        check_can_listen(settings.http_listen, "--http-listen")
    if settings.metrics_listen:
        workers = settings.workers if not settings.grpc_target else 1
        check_can_listen(settings.metrics_listen, "--metrics-listen", count=workers)


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully: the shim alone
    (--grpc-target), N workers (--workers), or one server over its database."""
    # Imported here, not at the top: --help, --version and a usage mistake answer without
    # loading the servers (grpc.aio, aiohttp, the servicers), a second or more on a busy host.
    from server.app import serve_on, serve_v4_alone
    from server.workers import supervise

    if settings.grpc_target:
        await serve_v4_alone(settings)
        return
    if settings.workers > 1:
        await supervise(settings)
        return
    database: Database = await open_database(settings.database_url, settings.data_dir, create=True)
    try:
        log.info("database: %s%s", redact(database.url), " (embedded)" if database.embedded else "")
        await serve_on(settings, database.url)
    finally:
        await asyncio.to_thread(database.close)
    log.info("stopped")


if __name__ == "__main__":
    main()
