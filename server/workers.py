"""`--workers N`: N server processes sharing the gRPC port (and the v4 port) with SO_REUSEPORT.

One Python process runs one event loop on one core; past that, a second core only helps
with a second process. The parent does what must happen once and serves no calls itself:

- it starts the embedded PostgreSQL (or takes --database-url) and applies the migrations,
  then hands the database URL to the children; the page-token key is per database
  (server.store.cursor_key), so a token made by one worker is read by any other;
- it turns a port 0 into one concrete port that every worker then binds (holding a
  SO_REUSEPORT placeholder socket, bound but never listening, so nothing else takes it);
- it starts the workers (multiprocessing "spawn": a fresh interpreter each, and the
  settings, secret key included, travel over a pipe rather than the command line);
- on SIGTERM or SIGINT it sends SIGTERM to every worker, each of which finishes its
  in-flight calls within --grace-seconds, and stops the embedded database last.

The kernel spreads new connections over the workers' listening sockets. A worker that
exits on its own (it could not bind, it crashed) stops the whole server with exit status 1:
a half-sized server that looks healthy is worse than a restart by the supervisor.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import multiprocessing
import os
import signal
import socket
import sys
from multiprocessing.connection import wait as wait_any
from multiprocessing.process import BaseProcess

from server import logs, runner
from server.app import serve_on
from server.config import Settings
from server.database import Database, open_database, redact
from server.errors import ConfigError, StartupError
from server.migrations import apply_migrations

log = logging.getLogger(__name__)

# Past the grace a worker's in-flight calls are given up; this much more for its pool and
# embedded-free shutdown, then it is killed.
STOP_MARGIN_SECONDS = 15.0


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def _reserve(address: str) -> tuple[str, socket.socket | None]:
    """`address` with a concrete port, and the placeholder socket holding a port 0 turned
    into one (None when the port was given)."""
    host, port = _split(address)
    if port != 0:
        return address, None
    family, kind, proto, _, sockaddr = socket.getaddrinfo(
        host.strip("[]") or "0.0.0.0",  # noqa: S104 - ":PORT" asks for every interface
        0,
        type=socket.SOCK_STREAM,
    )[0]
    placeholder = socket.socket(family, kind, proto)
    placeholder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    placeholder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    placeholder.bind(sockaddr)
    return f"{host}:{placeholder.getsockname()[1]}", placeholder


def _worker_settings(settings: Settings, database_url: str, index: int) -> Settings:
    metrics = settings.metrics_listen
    if metrics:
        # One scrape target per worker: each has its own registry (port + index).
        host, port = _split(metrics)
        metrics = f"{host}:{port + index if port else 0}"
    return dataclasses.replace(settings, database_url=database_url, metrics_listen=metrics)


def worker_main(settings: Settings, index: int) -> None:
    """A worker process: one server over the parent's database, until SIGTERM."""
    logs.setup_logging(settings.log_level, settings.log_format)
    if settings.database_url is None:
        raise ValueError("a worker needs the database URL its parent opened")
    try:
        runner.run(serve_on(settings, settings.database_url, worker=index))
    except (ConfigError, StartupError) as exc:
        # One line, like the parent's; the parent then stops the others and exits 1.
        logs.print_fatal(f"worker {index}: {exc}", settings.log_format)
        sys.exit(exc.exit_code)


async def supervise(settings: Settings) -> None:
    """Run `settings.workers` workers until SIGTERM or SIGINT; exit 1 if one fails."""
    database: Database = await open_database(settings.database_url, settings.data_dir, create=True)
    placeholders: list[socket.socket] = []
    processes: list[BaseProcess] = []
    failed = False
    try:
        log.info("database: %s%s", redact(database.url), " (embedded)" if database.embedded else "")
        await apply_migrations(database.url)
        grpc_listen, held = _reserve(settings.grpc_listen)
        placeholders += [held] if held else []
        http_listen = settings.http_listen
        if http_listen:
            http_listen, held = _reserve(http_listen)
            placeholders += [held] if held else []
        shared = dataclasses.replace(settings, grpc_listen=grpc_listen, http_listen=http_listen)
        context = multiprocessing.get_context("spawn")
        for index in range(settings.workers):
            process = context.Process(
                target=worker_main,
                args=(_worker_settings(shared, database.url, index), index),
                name=f"follow-worker-{index}",
            )
            process.start()
            processes.append(process)
        log.info(
            "%d workers (pids %s) sharing gRPC %s%s",
            len(processes),
            ", ".join(str(p.pid) for p in processes),
            grpc_listen,
            f" and v4 {http_listen}" if http_listen else "",
        )
        failed = await _until_signal_or_exit(processes)
        if failed:
            log.error("a worker exited on its own; stopping the others")
    finally:
        failed = not await asyncio.to_thread(_stop, processes, settings.grace_seconds) or failed
        for placeholder in placeholders:
            placeholder.close()
        await asyncio.to_thread(database.close)
    log.info("stopped")
    if failed:
        sys.exit(1)


async def _until_signal_or_exit(processes: list[BaseProcess]) -> bool:
    """Wait for SIGTERM/SIGINT (False) or for any worker to exit (True)."""
    stop = runner.stop_event()
    # Woken by a worker's exit, or by the wake-up pipe written to when a signal arrives.
    wake_read, wake_write = os.pipe()
    stopped = asyncio.ensure_future(stop.wait())
    sentinels = [*(p.sentinel for p in processes), wake_read]

    def watch() -> None:
        wait_any(sentinels)

    watcher = asyncio.ensure_future(asyncio.to_thread(watch))
    try:
        await asyncio.wait({stopped, watcher}, return_when=asyncio.FIRST_COMPLETED)
        return not stop.is_set()
    finally:
        os.write(wake_write, b"x")  # lets the watcher thread return
        stopped.cancel()
        await asyncio.wait({watcher})
        os.close(wake_read)
        os.close(wake_write)
        runner.forget_stop_signals()


def _stop(processes: list[BaseProcess], grace: float) -> bool:
    """SIGTERM every worker, wait for each (grace plus a margin), kill stragglers. True when
    every worker exited with status 0."""
    for process in processes:
        if process.exitcode is None and process.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGTERM)
    clean = True
    for process in processes:
        process.join(grace + STOP_MARGIN_SECONDS)
        if process.exitcode is None:
            log.error("worker pid %s did not stop in time; killing it", process.pid)
            process.kill()
            process.join()
        if process.exitcode != 0:
            log.error("worker pid %s exited with status %s", process.pid, process.exitcode)
            clean = False
    return clean
