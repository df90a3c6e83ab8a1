"""A throwaway Citus cluster (a coordinator and workers on this machine) for tests and benches.

The service's scale-out path is Citus with its per-user tables distributed on user_id (see
server.migrations), and what Citus accepts, routes to one shard or refuses can only be learnt
from a real cluster: an embedded single PostgreSQL says nothing about it. Citus 13.2 runs on
PostgreSQL 15-17, not on the 18 that the embedded pgserver wheel ships, so this drives a
system PostgreSQL's binaries (the Debian PostgreSQL 15 by default; FOLLOW_CITUS_PG_BIN picks
another) with initdb and pg_ctl.

Everything lives in one temporary folder and listens on 127.0.0.1 only, on free ports, with
trust authentication from 127.0.0.1: nothing is reachable from beyond this machine, and
nothing survives `stop()`. PostgreSQL refuses to run as root, so as root the servers run as
the `postgres` user (runuser); any other user runs them directly.

    with CitusCluster() as cluster:
        url = cluster.url                                  # the coordinator's `follow` database
        scratch = cluster.create_database("scratch_1")     # another one, Citus set up in it

`python -m tests.support.citus` starts one, prints the coordinator's URL and keeps it up until
SIGINT or SIGTERM (for manual runs and the benchmark).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType

DEFAULT_PG_BIN = "/usr/lib/postgresql/15/bin"
DATABASE = "follow"
HOST = "127.0.0.1"
SUPERUSER = "postgres"
_RUN_AS = "postgres"  # the unprivileged system user the servers run as when we are root
_INSTALL_HINT = (
    "run ../shared/citus/install.sh (or install Citus 13.2 for PostgreSQL 15-17 from its "
    "packages) and/or point FOLLOW_CITUS_PG_BIN at that PostgreSQL's bin folder"
)

# Tuned for tests, never for data anyone keeps: no durability, fast deadlock detection.
DEFAULT_SETTINGS: dict[str, str] = {
    "shared_preload_libraries": "'citus'",
    "listen_addresses": f"'{HOST}'",
    # The data is thrown away with the folder: durability only costs time here.
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "shared_buffers": "64MB",
    # Every coordinator session may open connections to each worker, and tests open many.
    "max_connections": "200",
    # Writes of several owners in one transaction commit with two-phase commit on workers.
    "max_prepared_transactions": "200",
    # Connections one multi-shard statement may open per worker; Citus' default (16) times
    # a few dozen test connections would exhaust the workers' max_connections.
    "citus.max_adaptive_executor_pool_size": "4",
    # Calls take their locks in one order (server.store), so deadlocks should not happen;
    # if one did, find it fast: 50 ms locally, and Citus' distributed detector at its
    # smallest accepted factor (2 x deadlock_timeout; it refuses 1).
    "deadlock_timeout": "50ms",
    "citus.distributed_deadlock_detection_factor": "2",
    # Keep connections to the workers open between statements: Citus' default of one
    # cached connection per worker makes every multi-shard statement of a busy coordinator
    # open (and then close) new worker backends (measured by make bench-citus: GetInfo(20)
    # 10 -> 122 calls/s with 4). The README's runbook recommends the same.
    "citus.max_cached_conns_per_worker": "8",
    # Loopback only, trust auth: TLS between nodes would only add handshakes.
    "citus.node_conninfo": "'sslmode=disable'",
    # No calls home from a test cluster.
    "citus.enable_statistics_collection": "off",
}


class CitusUnavailableError(RuntimeError):
    """Citus (or PostgreSQL to run it on) is not installed where this harness looks."""


def pg_bin() -> Path:
    """The bin folder of the PostgreSQL that has Citus (FOLLOW_CITUS_PG_BIN or Debian's 15)."""
    return Path(os.environ.get("FOLLOW_CITUS_PG_BIN") or DEFAULT_PG_BIN)


def _pkglibdir(bin_dir: Path) -> Path:
    """Where that PostgreSQL loads extension libraries from: what its own pg_config says
    (packagers put it in different places), else the Debian layout next to bin/."""
    pg_config = bin_dir / "pg_config"
    if pg_config.exists():
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [str(pg_config), "--pkglibdir"], capture_output=True, text=True, check=True
            ).stdout.strip()
            if out:
                return Path(out)
    return bin_dir.parent / "lib"


def citus_missing_reason(bin_dir: Path | None = None) -> str | None:
    """Why a cluster cannot start here (a sentence to skip tests with), or None if it can."""
    bin_dir = bin_dir or pg_bin()
    for tool in ("initdb", "pg_ctl", "postgres", "psql"):
        if not (bin_dir / tool).exists():
            return f"PostgreSQL not found: no {tool} in {bin_dir}; {_INSTALL_HINT}"
    libdir = _pkglibdir(bin_dir)
    if not (libdir / "citus.so").exists():
        return f"Citus is not installed: no citus.so in {libdir}; {_INSTALL_HINT}"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(_RUN_AS)
        except KeyError:
            return f"running as root, but there is no `{_RUN_AS}` user to run PostgreSQL as"
    return None


def citus_available() -> bool:
    """True if a CitusCluster can start on this machine (for skipping tests)."""
    return citus_missing_reason() is None


def _free_ports(count: int) -> list[int]:
    """Ports the kernel calls free now. Held open together so they differ; another process
    could still take one before PostgreSQL binds it, which start() then reports."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass(frozen=True, slots=True)
class Node:
    """One PostgreSQL server of the cluster."""

    name: str
    port: int
    data: Path
    log: Path

    def url(self, database: str = DATABASE) -> str:
        return f"postgresql://{SUPERUSER}@{HOST}:{self.port}/{database}"


class CitusCluster:
    """A coordinator and `workers` workers in one temporary folder, Citus set up in the
    `follow` database; `stop()` (or leaving the `with` block) ends the servers and deletes
    the folder, also after a start that failed halfway."""

    def __init__(
        self,
        workers: int = 2,
        *,
        bin_dir: Path | None = None,
        settings: dict[str, str] | None = None,
        parent: Path | None = None,
    ) -> None:
        self.bin_dir = bin_dir or pg_bin()
        # Where the temporary folder goes (the system's temporary folder unless given; the
        # test suite puts it in memory, /dev/shm, where a busy disk cannot slow it down).
        self.parent = parent
        self.worker_count = workers
        self.settings = {**DEFAULT_SETTINGS, **(settings or {})}
        self.root: Path | None = None
        self.coordinator: Node | None = None
        self.workers: list[Node] = []

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> CitusCluster:
        """initdb and start every node, then create `follow` with Citus set up in it."""
        reason = citus_missing_reason(self.bin_dir)
        if reason:
            raise CitusUnavailableError(reason)
        if self.root is not None:
            raise RuntimeError("this cluster is already started")
        try:
            self._start_nodes()
            self.create_database(DATABASE)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_nodes(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="follow-citus-", dir=self.parent))
        if os.geteuid() == 0:
            # The servers run as the unprivileged user, who must own every data folder.
            user = pwd.getpwnam(_RUN_AS)
            os.chown(self.root, user.pw_uid, user.pw_gid)
        ports = _free_ports(1 + self.worker_count)
        names = ["coordinator"] + [f"worker{i}" for i in range(1, self.worker_count + 1)]
        nodes = [
            Node(name, port, self.root / name, self.root / f"{name}.log")
            for name, port in zip(names, ports, strict=True)
        ]
        self.coordinator, self.workers = nodes[0], nodes[1:]
        _on_each(nodes, self._initdb)
        _on_each(
            nodes,
            lambda node: self._pg_ctl(
                node, "-w", "-t", "60", "-l", str(node.log), "start", what=f"start {node.name}"
            ),
        )

    def _initdb(self, node: Node) -> None:
        assert self.root is not None
        self._run_as_owner(
            [
                str(self.bin_dir / "initdb"),
                "-D", str(node.data),
                "-U", SUPERUSER,
                "--auth=trust",
                "-E", "UTF8",
                "--locale=C",
                "--no-sync",
            ],
            what=f"initdb {node.name}",
        )  # fmt: skip
        settings = {
            **self.settings,
            "port": str(node.port),
            # Sockets in our own folder: the system's socket folder may be missing or shared.
            "unix_socket_directories": f"'{self.root}'",
        }
        with (node.data / "postgresql.conf").open("a") as conf:
            conf.write("\n# tests.support.citus\n")
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
        # Trust, but only from 127.0.0.1 (clients and the nodes' own connections to each
        # other); nothing else may connect at all.
        (node.data / "pg_hba.conf").write_text(f"host all all {HOST}/32 trust\n")

    def stop(self) -> None:
        """Stop every node that runs (fast: sessions are ended) and delete the folder.
        Safe to call twice and after a failed start; keeps going past a node that fails."""
        if self.root is None:
            return
        for node in [n for n in (self.coordinator, *self.workers) if n is not None]:
            if (node.data / "postmaster.pid").exists():
                with contextlib.suppress(RuntimeError):
                    self._pg_ctl(node, "-w", "-t", "60", "-m", "fast", "stop", what="stop")
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None
        self.coordinator = None
        self.workers = []

    def __enter__(self) -> CitusCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- addresses -------------------------------------------------------------------------

    def _coordinator(self) -> Node:
        if self.coordinator is None:
            raise RuntimeError("the cluster is not running: call start() first")
        return self.coordinator

    @property
    def url(self) -> str:
        """The coordinator's `follow` database, for asyncpg (what the service connects to)."""
        return self._coordinator().url()

    @property
    def worker_urls(self) -> list[str]:
        """Each worker's `follow` database (to look at shards; the service never connects)."""
        return [w.url() for w in self.workers]

    def url_for(self, database: str) -> str:
        """The coordinator's URL for another database of the cluster."""
        return self._coordinator().url(database)

    # -- databases -------------------------------------------------------------------------

    def create_database(self, name: str, *, citus: bool = True) -> str:
        """CREATE DATABASE `name` on every node and (unless citus=False) set Citus up in it;
        returns its coordinator URL. Citus metadata (nodes, distributed tables) is kept per
        database, so each scratch database is a cluster of its own for the service."""
        nodes = [self._coordinator(), *self.workers]
        _on_each(nodes, lambda node: self.sql(node, f'CREATE DATABASE "{name}"'))
        if citus:
            self.enable_citus(name)
        return self.url_for(name)

    def copy_database(self, name: str, template: str) -> str:
        """CREATE DATABASE `name` as a copy of `template` (which `seal_template` made one)
        on every node; returns its coordinator URL. Each node copies its own part (the
        coordinator's Citus metadata, the workers' shards), and the copy's coordinator
        reaches the workers' database of the same name, so the copy is a ready Citus
        database, made in a fraction of a second where setting one up takes seconds."""
        _on_each(
            [self._coordinator(), *self.workers],
            lambda node: self.sql(node, f'CREATE DATABASE "{name}" TEMPLATE "{template}"'),
        )
        return self.url_for(name)

    def seal_template(self, name: str) -> None:
        """Make the database `name` (set up as wanted: Citus, schema, rows) a template on
        every node, for `copy_database(..., template=name)`. PostgreSQL copies a database
        only while nobody is connected to it, and Citus keeps sessions in every Citus
        database (its maintenance daemon on each node, and the daemons' connections to the
        other nodes): so connections to it are refused from now on, on every node, then the
        sessions still in it are ended. Nothing reconnects, so it stays copyable; it is
        removed with the cluster (`drop_database` refuses a template)."""
        nodes = [self._coordinator(), *self.workers]
        _on_each(
            nodes,
            lambda node: self.sql(
                node, f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false IS_TEMPLATE true'
            ),
        )
        _on_each(
            nodes,
            lambda node: self.sql(
                node,
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                f" WHERE datname = '{name}' AND pid <> pg_backend_pid()",
            ),
        )

    def enable_citus(self, name: str) -> None:
        """Make the existing database `name` a Citus one: the extension on every node, then
        the coordinator told its own address and the workers'. Also what an operator does to
        a single-node database that is moving onto Citus."""
        coordinator = self._coordinator()
        _on_each(
            [coordinator, *self.workers],
            lambda node: self.sql(node, "CREATE EXTENSION IF NOT EXISTS citus", database=name),
        )
        self.sql(
            coordinator,
            f"SELECT citus_set_coordinator_host('{HOST}', {coordinator.port})",
            database=name,
        )
        for worker in self.workers:
            self.sql(coordinator, f"SELECT citus_add_node('{HOST}', {worker.port})", database=name)

    def drop_database(self, name: str) -> None:
        """DROP DATABASE `name` on every node, ending any session still in it."""
        _on_each(
            [self._coordinator(), *self.workers],
            lambda node: self.sql(node, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'),
        )

    def sql(self, node: Node, statement: str, *, database: str = "postgres") -> str:
        """Run one statement on one node with psql (synchronous, so usable from sync
        fixtures, the CLI and start() alike); returns its unaligned output."""
        result = subprocess.run(
            [
                str(self.bin_dir / "psql"),
                "-X", "-q", "-A", "-t",
                "-v", "ON_ERROR_STOP=1",
                "-h", HOST, "-p", str(node.port), "-U", SUPERUSER, "-d", database,
                "-c", statement,
            ],
            capture_output=True,
            text=True,
            check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(
                f"{node.name}: {statement!r} failed: {result.stderr.strip() or result.stdout}"
            )
        return result.stdout

    # -- processes -------------------------------------------------------------------------

    def _pg_ctl(self, node: Node, *args: str, what: str) -> None:
        try:
            self._run_as_owner([str(self.bin_dir / "pg_ctl"), "-D", str(node.data), *args], what)
        except RuntimeError as e:
            raise RuntimeError(f"{e}\n--- {node.log} (last lines):\n{_tail(node.log)}") from None

    def _run_as_owner(self, command: list[str], what: str) -> None:
        """Run a server tool as the user that owns the data (root may not run PostgreSQL)."""
        assert self.root is not None
        if os.geteuid() == 0:
            command = ["runuser", "-u", _RUN_AS, "--", *command]
        result = subprocess.run(
            command,
            cwd=self.root,  # the owner may not be allowed into our working directory
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{what} failed ({result.returncode}): {result.stderr.strip() or result.stdout}"
            )


def _on_each(nodes: Iterable[Node], work: Callable[[Node], object]) -> None:
    """Run `work` on every node at once (initdb, CREATE DATABASE and CREATE EXTENSION take
    a second or so each, and nodes are independent); raises the first failure after all
    have finished, so nothing is still running when the caller cleans up."""
    with ThreadPoolExecutor() as pool:
        futures = [pool.submit(work, node) for node in nodes]
    for future in futures:
        future.result()


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def main(argv: list[str] | None = None) -> int:
    """Start a cluster, print the coordinator URL (the only line on stdout), serve until
    SIGINT or SIGTERM, then stop it and delete its folder."""
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.citus",
        description="Run a throwaway Citus cluster on 127.0.0.1 until interrupted.",
    )
    parser.add_argument("--workers", type=int, default=2, help="worker nodes (default 2)")
    args = parser.parse_args(argv)

    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    # Handlers before the start, so a signal during it still stops what was started.
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        with CitusCluster(args.workers) as cluster:
            print(cluster.url, flush=True)
            for url in cluster.worker_urls:
                print(f"worker: {url}", file=sys.stderr, flush=True)
            print("Citus cluster running; Ctrl-C (or SIGTERM) stops it", file=sys.stderr)
            while not stopping.wait(0.5):
                pass
    except CitusUnavailableError as e:
        print(f"cannot start a Citus cluster: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
